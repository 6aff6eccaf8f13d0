"""``pathm3-extract``: the command-line shell over :mod:`feature_extraction.extract`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from feature_extraction.encoders import ENCODERS, encoder_description
from feature_extraction.extract import ExtractionSettings, find_slides, parse_shard, run
from pathm3.errors import UsageError, add_debug_flag, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pathm3-extract",
        description="Tile whole-slide images (or PatchGastric-style patch folders), run a frozen patch "
        "encoder and write one HDF5 bag per slide (<slide_id>.h5), extraction.csv and previews/.",
        epilog="Exit status: 0 when every slide is done or skipped, 1 when any failed (the others are "
        "still processed), 2 on usage errors. Rerunning skips slides whose bag is complete and was made "
        "with the same settings.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="slide files, folders (searched for OpenSlide's extensions) or a CSV with a 'path' "
                   "column and optional 'slide_id' (default: the file stem)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the bags, extraction.csv and previews/")
    p.add_argument("--patch-folder", action="store_true",
                   help="INPUT is a folder of patch images grouped into slides by file name "
                   "({slide_id}_{anything}.jpg, as PatchGastric ships 300x300 px patches at 20x)")
    p.add_argument("--slide-id-pattern", metavar="REGEX",
                   help="with --patch-folder: regex on the file stem with a 'slide_id' group (optional 'x', 'y' "
                   "groups for coordinates); default '^(?P<slide_id>[^_]+)_(?P<rest>.+)$'. Coordinates come "
                   "from the name when it ends in X_Y or x123_y456, otherwise from the patch index")
    p.add_argument("--encoder", choices=ENCODERS, default="eva-vit-g", help=encoder_description())
    p.add_argument("--weights", metavar="FOLDER",
                   help="local folder of the pretrained encoder (eva-vit-g: a BLIP-2 checkpoint or its vision "
                   "tower; hf-vision: a transformers model folder); not used by tiny-vit")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--magnification", type=float, default=None,
                       help="target magnification, e.g. 20 (the default when --mpp is not given)")
    scale.add_argument("--mpp", type=float, default=None, help="target resolution in microns per pixel, e.g. 0.5")
    p.add_argument("--patch-size", type=int, default=224,
                   help="patch side in pixels at the target scale (default 224); resized to the encoder's input")
    p.add_argument("--source-mpp", type=float, help="level-0 microns per pixel, for slides whose metadata lacks it")
    p.add_argument("--source-magnification", type=float,
                   help="level-0 magnification (e.g. 40), for slides whose metadata lacks it")
    p.add_argument("--tissue-threshold", type=float, default=0.5,
                   help="minimum tissue fraction of a patch to keep it (default 0.5); tissue is Otsu on the "
                   "saturation of a low-resolution thumbnail plus small morphology")
    p.add_argument("--batch-size", type=int, default=64, help="patches per encoder batch (default 64)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes reading patches while the encoder runs (default: min(4, CPUs); 0 "
                   "reads in the main process)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="encoder precision (default fp32; bf16 is the usual choice on GPUs)")
    p.add_argument("--feature-dtype", choices=("float16", "float32"), default="float16",
                   help="how features are stored in the bag (default float16)")
    p.add_argument("--shard", metavar="i/n",
                   help="process every n-th slide starting at i (0-based). Under torchrun it comes from "
                   "RANK/WORLD_SIZE, so one command scales over GPUs and nodes")
    p.add_argument("--overwrite", action="store_true", help="redo slides even when a current bag exists")
    p.add_argument("--no-previews", action="store_true", help="do not write previews/<slide_id>.png")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_debug_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.patch_size <= 0 or args.batch_size <= 0 or args.workers < 0:
        raise UsageError("--patch-size and --batch-size must be positive and --workers >= 0")
    if not 0 <= args.tissue_threshold <= 1:
        raise UsageError(f"--tissue-threshold {args.tissue_threshold}: must be between 0 and 1")
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    settings = ExtractionSettings(
        encoder=args.encoder, weights=args.weights,
        magnification=args.magnification if args.mpp is None else None,
        mpp=args.mpp, patch_size=args.patch_size, source_magnification=args.source_magnification,
        source_mpp=args.source_mpp, tissue_threshold=args.tissue_threshold, precision=args.precision,
        feature_dtype=args.feature_dtype, patch_folder=args.patch_folder, slide_id_pattern=args.slide_id_pattern,
        batch_size=args.batch_size, workers=args.workers, device=device, overwrite=args.overwrite,
        previews=not args.no_previews, progress=not args.no_progress,
    )
    if settings.magnification is None and settings.mpp is None:
        settings.magnification = 20.0
    jobs = find_slides(args.inputs, args.patch_folder, args.slide_id_pattern)
    results = run(jobs, args.output, settings, shard=parse_shard(args.shard))
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    print(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed -> "
          f"{os.path.join(args.output, 'extraction.csv')}")
    for r in results:
        if r.status == "failed":
            print(f"failed: {r.slide_id}: {r.error}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
