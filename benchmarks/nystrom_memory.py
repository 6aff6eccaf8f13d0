"""Seconds and peak memory of Nyström self-attention: LeanNystromAttention vs nystrom_attention.

    python benchmarks/nystrom_memory.py                       # M = 1k, 10k, 50k, 100k, 200k
    python benchmarks/nystrom_memory.py --sizes 1000 10000    # a subset
    python benchmarks/nystrom_memory.py --ref-max 10000       # reference only up to 10k
    python benchmarks/nystrom_memory.py --threads 1           # steadier on a shared CPU

Paper widths: dim 1408, 8 heads (dim_head 176), 256 landmarks, 6 pinv iterations, one bag
(1, M, 1408) float32 on CPU. Each measurement runs in a fresh subprocess:

  forward      the module under torch.no_grad() (inference)
  fwd+bwd      y = attn(x); (y * t).sum().backward() with x requiring grad (a training step's share)

Peak memory = the process's peak resident set (ru_maxrss) minus its resident set just before the
measured call, i.e. after torch, the module and the inputs x (and t) are allocated and one small
warm-up call has run. It includes the output y and, for fwd+bwd, dL/dy and dL/dx.

The reference is skipped above --ref-max (default 50k: at 100k it needs ~11 GB). The printed time
exponent is the log-log least-squares slope of the lean seconds over M >= 10k.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

DIM, HEADS, LANDMARKS, ITERS = 1408, 8, 256, 6
LEAN_FILE = Path(__file__).resolve().parents[1] / "pathm3" / "parts" / "lean_nystrom.py"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _lean_class():
    # Loaded from its file so that the measurement does not import the pathm3.parts registry
    # (transformers, the other parts), which would only add noise to the baseline.
    spec = importlib.util.spec_from_file_location("lean_nystrom", LEAN_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.LeanNystromAttention


def measure(impl: str, m: int, mode: str, chunk: int, threads: int) -> dict:
    """One measurement in this process (called in a fresh subprocess)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    kw = dict(dim=DIM, dim_head=DIM // HEADS, heads=HEADS, num_landmarks=LANDMARKS, pinv_iterations=ITERS)
    if impl == "lean":
        attn = _lean_class()(**kw, chunk_size=chunk)
    else:
        from nystrom_attention import NystromAttention

        attn = NystromAttention(**kw)
    train = mode == "fwd+bwd"
    attn.train(train)

    def step(x, t):
        if train:
            (attn(x) * t).sum().backward()
        else:
            with torch.no_grad():
                attn(x)

    small = torch.randn(1, 300, DIM, requires_grad=train)
    step(small, torch.randn_like(small))  # warm-up: kernels, allocator, lazy init
    del small
    attn.zero_grad(set_to_none=False)  # parameter grads exist before the baseline
    x = torch.randn(1, m, DIM, requires_grad=train)
    t = torch.randn(1, m, DIM) if train else None
    base = _rss_bytes()
    t0 = time.perf_counter()
    step(x, t)
    sec = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"impl": impl, "m": m, "mode": mode, "sec": sec, "peak_gb": max(peak, 0) / 1e9,
            "threads": torch.get_num_threads()}


def run_child(impl: str, m: int, mode: str, chunk: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(m), mode, "--chunk", str(chunk), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} M={m} {mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(points: list[tuple[int, float]]) -> float:
    xs = [math.log(m) for m, _ in points]
    ys = [math.log(s) for _, s in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 50_000, 100_000, 200_000])
    ap.add_argument("--ref-max", type=int, default=50_000, help="largest M for the reference (forward)")
    ap.add_argument("--ref-bwd-max", type=int, default=50_000, help="largest M for the reference fwd+bwd")
    ap.add_argument("--chunk", type=int, default=2048, help="LeanNystromAttention chunk_size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--child", nargs=3, metavar=("IMPL", "M", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        impl, m, mode = args.child
        print(json.dumps(measure(impl, int(m), mode, args.chunk, args.threads)))
        return

    rows = []
    import torch

    print(f"dim {DIM}, {HEADS} heads, {LANDMARKS} landmarks, {ITERS} iterations, float32 CPU "
          f"({args.threads or torch.get_num_threads()} threads), lean chunk {args.chunk}", flush=True)
    for m in args.sizes:
        row = {"m": m}
        for impl in ("lean", "reference"):
            for mode in ("forward", "fwd+bwd"):
                limit = args.ref_max if mode == "forward" else min(args.ref_max, args.ref_bwd_max)
                if impl == "reference" and m > limit:
                    continue
                r = run_child(impl, m, mode, args.chunk, args.threads)
                row[(impl, mode)] = r
                print(f"  {impl:9s} M={m:>7,} {mode:8s} {r['sec']:8.2f} s  {r['peak_gb']:6.2f} GB", flush=True)
        rows.append(row)

    def cell(row, key):
        r = row.get(key)
        return f"{r['sec']:.2f} s / {r['peak_gb']:.2f} GB" if r else "skipped"

    keys = [("lean", "forward"), ("lean", "fwd+bwd"), ("reference", "forward"), ("reference", "fwd+bwd")]
    print("\n| M | " + " | ".join(f"{i} {md}" for i, md in keys) + " |")
    print("|---:|" + "---:|" * len(keys))
    for row in rows:
        print(f"| {row['m']:,} | " + " | ".join(cell(row, k) for k in keys) + " |")
    for mode in ("forward", "fwd+bwd"):
        pts = [(r["m"], r[("lean", mode)]["sec"]) for r in rows if r["m"] >= 10_000 and ("lean", mode) in r]
        if len(pts) >= 2:
            print(f"lean {mode} time exponent (log-log slope of seconds vs M over "
                  f"{pts[0][0]:,}..{pts[-1][0]:,}): {slope(pts):.3f}")


if __name__ == "__main__":
    main()
