"""Peak memory of one PathM3 training step at M = 100k patches, and real-size caption time.

    python benchmarks/model_memory.py                 # training step, then FlanT5-XL generation
    python benchmarks/model_memory.py --skip-generation

Training step: ViT-g-width features (1408), the paper's correlation module (1408, 8 heads, 256
landmarks; the memory-lean Nyström attention) and Q-Former (32 queries x 768, 12 layers), a
small T5, forward + backward + AdamW step on one bag of M patches on CPU, no patch dropout
(every patch is used), the Q-Former's layers recomputed in backward
(``model.aggregator.gradient_checkpointing``; ``--no-checkpointing`` keeps its activations).
Reported as the process's peak resident memory (``--patches 200000`` for the 200k figure).

Generation: a FlanT5-XL-sized T5 (d_model 2048, 24+24 layers, random weights, bf16) decodes a
caption for one slide from 32 query embeddings (beam 5, a fixed number of new tokens).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def training_step(m: int, caption_len: int, checkpointing: bool = True) -> None:
    import torch

    from pathm3.config import Config, apply_overrides
    from pathm3.model import Batch
    from pathm3.optim import build_optimizer
    from pathm3.pretrained import build_model
    from pathm3.text import build_word_tokenizer

    cfg = apply_overrides(Config(), [
        "data.classes=[a,b,c]", "model.patch_dropout=0",
        "model.captioner.d_model=256", "model.captioner.num_layers=2", "model.captioner.num_heads=4",
        "model.captioner.d_ff=512", "model.captioner.d_kv=64",
        "model.captioner.vocab_size=512", "model.aggregator.vocab_size=512",
        f"model.aggregator.gradient_checkpointing={checkpointing}",
    ])
    torch.manual_seed(0)
    tok = build_word_tokenizer(["tubular glands with atypical nuclei"] * 4)
    model = build_model(cfg, tok)
    opt = build_optimizer(model, cfg.train)
    feats = torch.randn(1, m, 1408)
    captions = [" ".join(["tubular glands"] * (caption_len // 2))]
    caption_tokens, text = model.tokenize(captions)
    batch = Batch(["slide"], feats, torch.ones(1, m, dtype=torch.bool), torch.tensor([[0.0, 1.0, 0.0]]),
                  captions, caption_tokens, text)
    before = _peak_gb()
    t0 = time.perf_counter()
    model.train()
    out = model(batch)
    out.loss.backward()
    opt.step()
    print(f"training step, M={m}, Q-Former checkpointing {'on' if checkpointing else 'off'}: "
          f"{time.perf_counter() - t0:.1f} s, peak RSS {_peak_gb():.2f} GB "
          f"(inputs and model {before:.2f} GB); goal <= 8 GB", flush=True)


def generation(new_tokens: int, beams: int) -> None:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
    t0 = time.perf_counter()
    with torch.device("meta"):
        t5 = T5ForConditionalGeneration(cfg)
    t5 = t5.to_empty(device="cpu").to(torch.bfloat16)
    for p in t5.parameters():  # random weights of the right scale, cheaply
        p.data.normal_(0, 0.02)
    t5.eval()
    build = time.perf_counter() - t0
    n = sum(p.numel() for p in t5.parameters())
    prefix = torch.randn(1, 32, 2048, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    with torch.no_grad():
        ids = t5.generate(inputs_embeds=prefix, attention_mask=torch.ones(1, 32, dtype=torch.long),
                          num_beams=beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    took = time.perf_counter() - t0
    print(f"FlanT5-XL-size caption ({n / 1e9:.2f}B params, bf16, beam {beams}, {ids.shape[1] - 1} tokens): "
          f"{took:.1f} s on CPU (model built in {build:.1f} s), peak RSS {_peak_gb():.2f} GB", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patches", type=int, default=100_000, help="bag size M for the training step")
    p.add_argument("--caption-tokens", type=int, default=40, help="caption length in the training step")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated in the caption benchmark")
    p.add_argument("--beams", type=int, default=5, help="beam width in the caption benchmark")
    p.add_argument("--no-checkpointing", action="store_true",
                   help="keep every Q-Former activation (model.aggregator.gradient_checkpointing: false)")
    p.add_argument("--skip-generation", action="store_true", help="only the training-step memory")
    p.add_argument("--skip-training", action="store_true", help="only the caption benchmark")
    args = p.parse_args(argv)
    if not args.skip_training:
        training_step(args.patches, args.caption_tokens, not args.no_checkpointing)
    if not args.skip_generation:
        generation(args.new_tokens, args.beams)
    return 0


if __name__ == "__main__":
    sys.exit(main())
