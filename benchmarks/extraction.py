"""Does reading and tiling hide behind the encoder? End-to-end vs encoder-only patches/s.

    python benchmarks/extraction.py                                   # tiny-vit on CPU
    python benchmarks/extraction.py --encoder vit-g-random --device cuda --precision bf16

One run, one slide, one encoder: (1) the full extraction of the slide (tissue, tiling, region
reads in worker processes, encoder, bag write) and (2) the encoder alone on random uint8 patches
of the same size, count and batch size. The ratio (1)/(2) is 1.0 when reading is fully hidden.
``vit-g-random`` is an EVA ViT-g/14-sized vision tower (1408-d, 39 layers) with random weights.
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
DEFAULT_SLIDE = REPO.parent / "shared" / "data" / "slides" / "tcga-cr-7395-01a-01-ts1.svs"


def vit_g_random():
    from transformers import Blip2VisionConfig, Blip2VisionModel

    from feature_extraction.encoders import CLIP_MEAN, CLIP_STD, Encoder

    cfg = Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                            image_size=224, patch_size=14)
    return Encoder("vit-g-random", Blip2VisionModel(cfg).eval(), 224, CLIP_MEAN, CLIP_STD, "pooler", 1408)


def main(argv=None) -> int:
    from feature_extraction.encoders import load_encoder, random_patches
    from feature_extraction.extract import PRECISIONS, ExtractionSettings, find_slides, run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slide", default=str(DEFAULT_SLIDE), help="slide to extract (default: the TCGA test slide)")
    p.add_argument("--source-magnification", type=float, default=20, help="for slides without metadata")
    p.add_argument("--encoder", default="tiny-vit", help="tiny-vit, vit-g-random, or eva-vit-g/hf-vision with --weights")
    p.add_argument("--weights", help="encoder folder for eva-vit-g / hf-vision")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="reader processes")
    p.add_argument("--batch-size", type=int, default=64, help="patches per encoder batch")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="encoder precision")
    p.add_argument("--tissue-threshold", type=float, default=0.0, help="0 keeps every grid patch (more patches)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    encoder = vit_g_random() if args.encoder == "vit-g-random" else load_encoder(args.encoder, args.weights)
    encoder.to(device, PRECISIONS[args.precision])
    settings = ExtractionSettings(encoder=args.encoder, weights=args.weights, source_magnification=args.source_magnification,
                                  tissue_threshold=args.tissue_threshold, batch_size=args.batch_size,
                                  workers=args.workers, device=args.device, precision=args.precision,
                                  overwrite=True, previews=False, progress=False)
    jobs = find_slides([args.slide])
    with tempfile.TemporaryDirectory() as out:
        run(jobs, out, settings, encoder=encoder)  # warm-up: caches, kernels, worker start
        t0 = time.perf_counter()
        (result,) = run(jobs, out, settings, encoder=encoder)
        end_to_end = time.perf_counter() - t0
    if result.status != "done":
        print(f"extraction failed: {result.error}", file=sys.stderr)
        return 1
    n = result.n_patches
    # The patch loop alone (reads in worker processes + encoder), without the per-slide work
    # (thumbnail, tissue mask, preview, bag write) that a large slide amortises.
    from feature_extraction.extract import _RegionDataset, encode_dataset
    from feature_extraction.slides import open_slide, resolve_scale
    from pathm3.bags import read_bag

    slide = open_slide(args.slide)
    scale = resolve_scale(slide, patch_size=224, magnification=20, source_magnification=args.source_magnification)
    slide.close()
    with tempfile.TemporaryDirectory() as out:
        run(jobs, out, settings, encoder=encoder)
        coords = read_bag(Path(out) / f"{jobs[0].slide_id}.h5").coords
    dataset = _RegionDataset(Path(args.slide), coords, scale)
    encode_dataset(dataset, encoder, settings)  # warm-up
    t0 = time.perf_counter()
    encode_dataset(dataset, encoder, settings)
    patch_loop = time.perf_counter() - t0
    patches = random_patches(min(n, args.batch_size), 224)
    encoder.encode(patches.to(device))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = 0
    while done < n:
        b = min(args.batch_size, n - done)
        encoder.encode(patches[:b].to(device))
        done += b
    if device.type == "cuda":
        torch.cuda.synchronize()
    encoder_only = time.perf_counter() - t0
    e2e_rate, enc_rate, loop_rate = n / end_to_end, n / encoder_only, n / patch_loop
    print(f"slide {Path(args.slide).name}: {n} patches, encoder {args.encoder} on {args.device} ({args.precision}), "
          f"{args.workers} workers, batch {args.batch_size}")
    print(f"end-to-end   {e2e_rate:8.1f} patches/s  ({end_to_end:.2f} s, bag and CSV written)")
    print(f"patch loop   {loop_rate:8.1f} patches/s  ({patch_loop:.2f} s, worker reads + encoder)")
    print(f"encoder only {enc_rate:8.1f} patches/s  ({encoder_only:.2f} s, random tensors)")
    print(f"ratio        {e2e_rate / enc_rate:8.2f}  end-to-end / encoder only (goal >= 0.9)")
    print(f"ratio        {loop_rate / enc_rate:8.2f}  patch loop / encoder only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
