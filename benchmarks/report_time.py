"""Seconds per report on CPU: a 1B-parameter causal LM captioner beside a FlanT5-XL-sized one.

    OMP_NUM_THREADS=2 python benchmarks/report_time.py                # 3 reports per model
    OMP_NUM_THREADS=2 python benchmarks/report_time.py --reports 1 --models llama-1b

Each model is the real captioner part (:mod:`pathm3.parts.causal_lm`, :mod:`pathm3.parts.t5`)
built as from a folder that holds only its config.json: empty (parameters on the meta device),
then given random bf16 weights of the usual scale in seconds (a real folder gives real ones; the
time per token is the same). A report: 32 projected query tokens, the prompt "Describe the
slide:", greedy decoding of exactly ``--new-tokens`` tokens (``min_new_tokens``), batch 1, after
one short warm-up. Each model runs in its own process, so the peak RSS is its own. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

PROMPT = "Describe the slide:"
QUERY_TOKENS, QUERY_WIDTH = 32, 768  # the Q-Former's 32 queries of width 768


def architectures() -> dict:
    from transformers import LlamaConfig, T5Config

    return {
        "llama-1b": ("causal_lm", "Llama-style 1B (causal_lm)", LlamaConfig(
            vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=32, tie_word_embeddings=False)),
        "flan-t5-xl": ("t5", "FlanT5-XL-shaped (t5)", T5Config(
            vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)),
    }


def random_bf16(module) -> None:
    """Give every parameter still on the meta device random bf16 values: N(0, 0.02) repeated from
    one random pool (fast), norm weights 1, biases 0; tied parameters stay tied."""
    import torch
    from torch import nn

    pool = (torch.randn(1 << 22) * 0.02).to(torch.bfloat16)
    made: dict[int, nn.Parameter] = {}
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in made:
                data = torch.empty(p.shape, dtype=torch.bfloat16)
                flat = data.view(-1)
                if p.ndim == 1:
                    flat.fill_(1.0 if name == "weight" else 0.0)
                else:
                    for start in range(0, flat.numel(), pool.numel()):
                        chunk = flat[start:start + pool.numel()]
                        chunk.copy_(pool[: chunk.numel()])
                made[id(p)] = nn.Parameter(data, requires_grad=False)
            m._parameters[name] = made[id(p)]


def one(name: str, reports: int, new_tokens: int) -> dict:
    """Time ``reports`` reports of one model, in this process."""
    import torch

    from pathm3.parts import CAPTIONERS
    from pathm3.parts.generation import generation_kwargs, special_ids
    from pathm3.text import build_word_tokenizer

    kind, label, arch = architectures()[name]
    folder = tempfile.mkdtemp()
    arch.save_pretrained(folder)  # config.json only: the captioner is built empty
    part = CAPTIONERS[kind]
    cfg = part.Config.model_validate({"type": kind, "pretrained": folder, "prompt": PROMPT, "num_beams": 1,
                                      "max_new_tokens": new_tokens})
    tok = build_word_tokenizer([PROMPT, "tubular adenocarcinoma with atypical glands"], 64)
    t0 = time.perf_counter()
    captioner = part(cfg, QUERY_WIDTH, tok)
    random_bf16(captioner.language_model)
    captioner.eval()
    built = time.perf_counter() - t0
    lm = captioner.language_model
    _, eos, pad = special_ids(tok)
    gen = generation_kwargs(cfg, {}) | {"min_new_tokens": new_tokens, "eos_token_id": eos, "pad_token_id": pad}
    tokens = torch.randn(1, QUERY_TOKENS, QUERY_WIDTH)

    def report(**override) -> tuple[float, int]:
        t = time.perf_counter()
        with torch.no_grad():
            inputs, attn = captioner.prompt_inputs(tokens)  # (1, 32 + prompt, d)
            ids = lm.generate(inputs_embeds=inputs, attention_mask=attn, **(gen | override))
        return time.perf_counter() - t, ids.shape[1] - (1 if kind == "t5" else 0)  # T5 starts with its start token

    report(max_new_tokens=2, min_new_tokens=2)  # warm-up
    runs = [report() for _ in range(reports)]
    seconds = sum(s for s, _ in runs) / reports
    generated = runs[-1][1]
    return {"model": label, "params": sum(p.numel() for p in lm.parameters()), "dtype": "bf16",
            "s_per_report": seconds, "tokens": generated, "tokens_per_s": generated / seconds, "built_s": built,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reports", type=int, default=3, help="reports per model (default 3)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per report (default 64)")
    p.add_argument("--models", nargs="+", default=["llama-1b", "flan-t5-xl"], choices=["llama-1b", "flan-t5-xl"])
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one model in this process, print JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.reports, args.new_tokens)), flush=True)
        return 0
    rows = []
    for name in args.models:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--reports", str(args.reports),
                              "--new-tokens", str(args.new_tokens)], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(f"Greedy, {QUERY_TOKENS} query tokens + prompt {PROMPT!r}, {args.new_tokens} new tokens, "
          f"{args.reports} report(s) per model, CPU\n")
    print("| model | params | dtype | s/report | tokens/s | peak RSS | built in |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['dtype']} | {r['s_per_report']:.1f} | "
              f"{r['tokens_per_s']:.2f} | {r['peak_rss_gb']:.1f} GB | {r['built_s']:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
