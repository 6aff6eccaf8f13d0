"""Does reading and tiling hide behind the encoder? End-to-end vs encoder-only patches/s.

    python benchmarks/extraction.py                                   # tiny-vit on CPU
    python benchmarks/extraction.py --encoder vit-s-random            # a ViT-S-sized encoder on CPU
    python benchmarks/extraction.py --encoder vit-g-random --device cuda --precision bf16

One process, one encoder: (1) a full ``run()`` over ``--copies`` copies of the slide (linked under
different names, so the second copy's preparation overlaps the first one's encoding, as slides
do in a real run): tissue, tiling, region reads in worker processes, encoder, bags, previews,
extraction.csv; (2) the encoder alone on random uint8 patches in the same batches; (3) the reads
alone (the DataLoader without the encoder). The ratio (1)/(2) is 1.0 when everything but the
encoder is hidden. ``vit-s-random`` (384-d, 12 layers) and ``vit-g-random`` (EVA ViT-g/14-sized,
1408-d, 39 layers) have random weights: benchmark-only.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_SLIDE = REPO.parent / "shared" / "data" / "slides" / "tcga-cr-7395-01a-01-ts1.svs"


def vit_g_random():
    from transformers import Blip2VisionConfig, Blip2VisionModel

    from feature_extraction.encoders import CLIP_MEAN, CLIP_STD, Encoder

    cfg = Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                            image_size=224, patch_size=14)
    return Encoder("vit-g-random", Blip2VisionModel(cfg).eval(), 224, CLIP_MEAN, CLIP_STD, "pooler", 1408)


def batch_sizes(counts: list[int], batch_size: int) -> list[int]:
    """The batches a run makes: per slide, full batches and a remainder."""
    out = []
    for n in counts:
        out += [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    return out


def encoder_only(encoder, batches: list[int], device: torch.device) -> float:
    from feature_extraction.encoders import random_patches

    patches = random_patches(max(batches), encoder.input_size)
    encoder.encode(patches[: batches[0]].to(device))  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for b in batches:
        encoder.encode(patches[:b].to(device))
    _sync(device)
    return time.perf_counter() - t0


def reads_only(slide: Path, settings, source_mag: float) -> tuple[float, int]:
    from feature_extraction.pipeline import open_batches
    from feature_extraction.slides import open_slide, resolve_scale
    from feature_extraction.tiling import plan_slide

    sl = open_slide(slide)
    scale = resolve_scale(sl, patch_size=settings.patch_size, magnification=20, source_magnification=source_mag)
    plan = plan_slide(sl, scale.patch_size_level0, settings.tissue_method, settings.tissue_threshold)
    sl.close()
    from feature_extraction.pipeline import RegionDataset

    dataset = RegionDataset(slide, plan.tiling.coords, scale)
    t0 = time.perf_counter()
    for _ in open_batches(dataset, settings):
        pass
    return time.perf_counter() - t0, len(dataset)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    from feature_extraction.encoders import load_encoder
    from feature_extraction.extract import PRECISIONS, ExtractionSettings, find_slides, run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slide", default=str(DEFAULT_SLIDE), help="slide to extract (default: the TCGA test slide)")
    p.add_argument("--copies", type=int, default=2, help="how many copies of the slide one run processes")
    p.add_argument("--source-magnification", type=float, default=20, help="for slides without metadata")
    p.add_argument("--encoder", default="tiny-vit",
                   help="tiny-vit, vit-s-random, vit-g-random, or eva-vit-g/hf-vision with --weights")
    p.add_argument("--weights", help="encoder folder for eva-vit-g / hf-vision")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="reader processes")
    p.add_argument("--batch-size", type=int, default=64, help="patches per encoder batch")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="encoder precision")
    p.add_argument("--tissue-threshold", type=float, default=0.2, help="minimum tissue fraction of a patch")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    encoder = vit_g_random() if args.encoder == "vit-g-random" else load_encoder(args.encoder, args.weights)
    encoder.to(device, PRECISIONS[args.precision])
    settings = ExtractionSettings(encoder=args.encoder, weights=args.weights, source_magnification=args.source_magnification,
                                  tissue_threshold=args.tissue_threshold, batch_size=args.batch_size,
                                  workers=args.workers, device=args.device, precision=args.precision,
                                  overwrite=True, progress=False)
    slide = Path(args.slide)
    read_s, _ = reads_only(slide, settings, args.source_magnification)  # also warms the OS file cache
    encoder_only(encoder, [args.batch_size], device)  # first-call costs (kernels, allocations) are not the run's
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "slides"
        folder.mkdir()
        for i in range(args.copies):
            (folder / f"copy{i}{slide.suffix}").symlink_to(slide.resolve())
        jobs = find_slides([folder])
        t0 = time.perf_counter()
        results = run(jobs, Path(tmp) / "out", settings, encoder=encoder)
        end_to_end = time.perf_counter() - t0
    failed = [r for r in results if r.status != "done"]
    if failed:
        print(f"extraction failed: {failed[0].error}", file=sys.stderr)
        return 1
    counts = [r.n_patches for r in results]
    n = sum(counts)
    enc_s = encoder_only(encoder, batch_sizes(counts, args.batch_size), device)
    e2e_rate, enc_rate = n / end_to_end, n / enc_s
    print(f"slide {slide.name} x {args.copies}: {n} patches, encoder {args.encoder} on {args.device} "
          f"({args.precision}), {args.workers} workers, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"end-to-end   {e2e_rate:8.2f} patches/s  ({end_to_end:.2f} s: tissue, reads, encoder, bags, previews)")
    print(f"encoder only {enc_rate:8.2f} patches/s  ({enc_s:.2f} s, random tensors, same batches)")
    print(f"reads only   {counts[0] / read_s:8.2f} patches/s  (one copy through the DataLoader, no encoder)")
    print(f"ratio        {e2e_rate / enc_rate:8.3f}  end-to-end / encoder only (goal >= 0.95)")
    print(f"| {args.encoder} | {args.device} | {args.workers} | {args.batch_size} | {n} | {e2e_rate:.2f} | "
          f"{enc_rate:.2f} | {e2e_rate / enc_rate:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
