"""``pathm3-extract``: the command-line shell over :mod:`feature_extraction.extract`.

Every flag is checked where it enters (argparse types), and every refusal is one ``error:`` line
naming the flag or path and the fix, exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from feature_extraction.encoders import ENCODERS, encoder_description
from feature_extraction.inputs import compile_slide_id_pattern
from feature_extraction.tissue import TISSUE_METHODS
from pathm3.errors import ArgumentParser, UsageError, add_debug_flag, number, run_cli


def _shard(text: str) -> str:
    m = re.fullmatch(r"\s*(\d+)/(\d+)\s*", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return text


def _regex(text: str) -> str:
    try:
        compile_slide_id_pattern(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="pathm3-extract",
        description="Tile whole-slide images (or PatchGastric-style patch folders), run a frozen patch "
        "encoder and write one HDF5 bag per slide (<slide_id>.h5), extraction.csv and previews/.",
        epilog="Exit status: 0 when every slide is done or skipped, 1 when any failed (the others are "
        "still processed), 2 on usage errors. Rerunning skips slides whose bag is complete and was made "
        "with the same settings. Several runs (torchrun ranks, or plain processes) may share one --output: "
        "each slide is claimed by one of them.",
    )
    positive = lambda example: number(float, 0, low_open=True, example=example)  # noqa: E731
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="slide files, folders (searched for OpenSlide's extensions) or a CSV with a 'path' "
                   "column and optional 'slide_id' (default: the file stem)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the bags, extraction.csv and previews/")
    p.add_argument("--patch-folder", action="store_true",
                   help="INPUT is a folder of patch images grouped into slides by file name "
                   "({slide_id}_{anything}.jpg, as PatchGastric ships 300x300 px patches at 20x)")
    p.add_argument("--slide-id-pattern", metavar="REGEX", type=_regex,
                   help="with --patch-folder: regex on the file stem with a 'slide_id' group (optional 'x', 'y' "
                   "groups for coordinates); default '^(?P<slide_id>[^_]+)_(?P<rest>.+)$'. Coordinates come "
                   "from the name when it ends in X_Y or x123_y456, otherwise from the patch index")
    p.add_argument("--encoder", choices=ENCODERS, default="eva-vit-g", help=encoder_description())
    p.add_argument("--weights", metavar="FOLDER",
                   help="local folder of the pretrained encoder (eva-vit-g: a BLIP-2 checkpoint or its vision "
                   "tower; hf-vision: a transformers model folder); not used by the random encoders")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--magnification", type=positive("20"), default=None,
                       help="target magnification, e.g. 20 (the default when --mpp is not given)")
    scale.add_argument("--mpp", type=positive("0.5"), default=None,
                       help="target resolution in microns per pixel, e.g. 0.5")
    p.add_argument("--patch-size", type=number(int, 1, example="224"), default=224,
                   help="patch side in pixels at the target scale (default 224); resized to the encoder's input")
    p.add_argument("--source-mpp", type=positive("0.25"),
                   help="level-0 microns per pixel, for slides whose metadata lacks it")
    p.add_argument("--source-magnification", type=positive("40"),
                   help="level-0 magnification (e.g. 40), for slides whose metadata lacks it")
    p.add_argument("--tissue-method", choices=TISSUE_METHODS, default="saturation",
                   help="how tissue is found on the thumbnail: 'saturation' (default; brightfield H&E/IHC: "
                   "coloured tissue on white glass) or 'otsu-dark' (fluorescence: bright nuclei on a dark "
                   "background). extraction.csv warns when the mask covers > 95%% of the thumbnail")
    p.add_argument("--tissue-threshold", type=number(float, 0, 1, example="0.2"), default=0.2,
                   help="minimum tissue fraction of a kept patch, 0 to 1 (default 0.2). Patches at the right "
                   "and bottom edges that reach beyond the slide are padded with white, not dropped")
    p.add_argument("--batch-size", type=number(int, 1, example="64"), default=64, help="patches per encoder batch (default 64)")
    p.add_argument("--workers", type=number(int, 0, example="2"), default=min(4, os.cpu_count() or 1),
                   help="worker processes reading patches while the encoder runs (default: min(4, CPUs); 0 "
                   "reads in the main process)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="encoder precision (default fp32; bf16 is the usual choice on GPUs)")
    p.add_argument("--feature-dtype", choices=("float16", "float32"), default="float16",
                   help="how features are stored in the bag (default float16)")
    p.add_argument("--shard", metavar="i/n", type=_shard,
                   help="process every n-th slide starting at i (0-based). Under torchrun it comes from "
                   "RANK/WORLD_SIZE, so one command scales over GPUs and nodes")
    p.add_argument("--overwrite", action="store_true", help="redo slides even when a current bag exists")
    p.add_argument("--no-previews", action="store_true", help="do not write previews/<slide_id>.png")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_debug_flag(p)
    return p


def check_output(path: str) -> None:
    """Refuse an --output that is a file, or that cannot be created or written (nothing is created)."""
    target = Path(path).absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == target else f"cannot be created: {existing} is a file"
        raise UsageError(f"--output {path}: {where}, not a folder; choose another --output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output {path}: {existing} is not writable; choose another --output")


def check_device(device: str) -> str:
    """The torch device name (cuda -> cuda:LOCAL_RANK under torchrun), or a usage error."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is visible to PyTorch; use --device cpu")
        if parsed.index is None and "LOCAL_RANK" in os.environ:
            return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.slide_id_pattern and not args.patch_folder:
        raise UsageError("--slide-id-pattern: only used with --patch-folder; add --patch-folder or drop it")
    from feature_extraction.extract import ExtractionSettings, find_slides, parse_shard, run

    check_output(args.output)
    shard = parse_shard(args.shard)
    settings = ExtractionSettings(
        encoder=args.encoder, weights=args.weights,
        magnification=args.magnification if args.mpp is None else None,
        mpp=args.mpp, patch_size=args.patch_size, source_magnification=args.source_magnification,
        source_mpp=args.source_mpp, tissue_method=args.tissue_method, tissue_threshold=args.tissue_threshold,
        precision=args.precision, feature_dtype=args.feature_dtype, patch_folder=args.patch_folder,
        slide_id_pattern=args.slide_id_pattern, batch_size=args.batch_size, workers=args.workers,
        device=check_device(args.device), overwrite=args.overwrite, previews=not args.no_previews,
        progress=not args.no_progress,
    )
    if settings.magnification is None and settings.mpp is None:
        settings.magnification = 20.0
    jobs = find_slides(args.inputs, args.patch_folder, args.slide_id_pattern)
    results = run(jobs, args.output, settings, shard=shard)
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    where = f"shard {shard[0]}/{shard[1]}: " if shard[1] > 1 else ""
    print(f"{where}{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed -> "
          f"{os.path.join(args.output, 'extraction.csv')}")
    for r in results:
        if r.status == "failed":
            print(f"failed: {r.slide_id}: {r.error}", file=sys.stderr)
        elif r.warning:
            print(f"warning: {r.slide_id}: {r.warning}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
