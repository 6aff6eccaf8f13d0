"""Nyström vs exact self-attention for the correlation module: time and peak memory against M.

Each (method, M, pass) runs in a fresh process so its peak resident memory is its own:

    python benchmarks/correlation.py                      # M = 1k, 10k, 50k, 100k
    python benchmarks/correlation.py --sizes 1000 10000 --exact-max 10000

Both methods are the same pre-norm residual block, E = MSA(LN(E)) + E, at the paper's width
(1408, 8 heads); "exact" uses torch's scaled_dot_product_attention. Exact attention above
``--exact-max`` patches is skipped (quadratic time), and reported as such.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _worker(method: str, m: int, backward: bool, dim: int, heads: int, landmarks: int, repeats: int) -> dict:
    import torch
    from torch import nn

    from pathm3.parts.nystrom import NystromBlock

    torch.manual_seed(0)
    if method == "nystrom":
        block = NystromBlock(dim, heads, landmarks, 6, 0.0, chunk_size=2048)
        nn.init.normal_(block.attn.to_out[0].weight, std=0.02)  # not the identity start
    else:
        block = _ExactBlock(dim, heads)
    x = torch.randn(1, m, dim, requires_grad=backward)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats + 1):  # first run warms up
        t0 = time.perf_counter()
        if backward:
            block(x).sum().backward()
        else:
            with torch.no_grad():
                block(x)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": min(times[1:]), "peak_mb_over_inputs": (peak - base) / 1024, "peak_rss_mb": peak / 1024}


class _ExactBlock:
    def __init__(self, dim: int, heads: int):
        import torch
        from torch import nn

        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.heads = heads
        self.torch = torch

    def __call__(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = self.torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, h, n, d/h)
        return x + self.out(y.transpose(1, 2).reshape(b, n, d))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000, 100000], help="bag sizes M")
    p.add_argument("--dim", type=int, default=1408, help="embedding width (paper: 1408)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (paper: 8)")
    p.add_argument("--landmarks", type=int, default=256, help="Nyström landmarks (paper: 256)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up (best is kept)")
    p.add_argument("--exact-max", type=int, default=50000, help="largest M to run exact attention at")
    p.add_argument("--output", help="also write the results as JSON here")
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "M", "BACKWARD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        method, m, backward = args.worker
        print(json.dumps(_worker(method, int(m), backward == "1", args.dim, args.heads, args.landmarks, args.repeats)))
        return 0

    rows = []
    print(f"{'M':>7} {'pass':>9} {'nystrom s':>10} {'exact s':>9} {'speed-up':>8} {'nystrom MB':>10} {'exact MB':>9}")
    for m in args.sizes:
        for backward in (False, True):
            res = {}
            for method in ("nystrom", "exact"):
                if method == "exact" and m > args.exact_max:
                    res[method] = None
                    continue
                cmd = [sys.executable, __file__, "--worker", method, str(m), "1" if backward else "0",
                       "--dim", str(args.dim), "--heads", str(args.heads), "--landmarks", str(args.landmarks),
                       "--repeats", str(args.repeats)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                res[method] = json.loads(out.stdout.strip().splitlines()[-1])
            n, e = res["nystrom"], res["exact"]
            row = {"M": m, "pass": "fwd+bwd" if backward else "fwd", "nystrom": n, "exact": e,
                   "speedup": (e["seconds"] / n["seconds"]) if e else None}
            rows.append(row)
            es = f"{e['seconds']:9.2f}" if e else f"{'skipped':>9}"
            em = f"{e['peak_mb_over_inputs']:9.0f}" if e else f"{'-':>9}"
            sp = f"{row['speedup']:7.1f}x" if e else f"{'-':>8}"
            print(f"{m:>7} {row['pass']:>9} {n['seconds']:10.2f} {es} {sp} {n['peak_mb_over_inputs']:10.0f} {em}", flush=True)
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
