"""PatchGastric protocol of the PathM3 paper: three subtypes and a stratified 20/40/40 split.

    python -m pathm3.datasets.patchgastric --captions captions.csv --bags DIR --output manifest.csv [--seed 0]

Keeps well differentiated tubular (283 slides), moderately differentiated tubular (265) and poorly
differentiated adenocarcinoma (non-solid + solid, 145), drops the other subtypes, and writes the
manifest (``slide_id,label,caption,split``) with a split stratified by class.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from pathm3.errors import ArgumentParser, DataError, add_debug_flag, number, run_cli
from pathm3.files import read_csv
from pathm3.manifest import write_manifest
from pathm3.text import GRADE_WORDS, clean_caption, strip_class_words

CLASSES = (
    "well differentiated tubular adenocarcinoma",
    "moderately differentiated tubular adenocarcinoma",
    "poorly differentiated adenocarcinoma",
)
SUBTYPE_TO_CLASS = {
    "Well differentiated tubular adenocarcinoma": CLASSES[0],
    "Moderately differentiated tubular adenocarcinoma": CLASSES[1],
    "Poorly differentiated adenocarcinoma, non-solid type": CLASSES[2],
    "Poorly differentiated adenocarcinoma, solid type": CLASSES[2],
}
SPLIT_FRACTIONS = (("train", 0.2), ("val", 0.4), ("test", 0.4))


def read_captions(path: Path) -> list[dict]:
    """Rows of the official captions CSV (``id,subtype,text``) kept by the 3-class protocol."""
    rows = read_csv(path, ("id", "subtype", "text"), "the PatchGastric captions file")
    kept, seen = [], {}
    for row_number, r in enumerate(rows, start=2):
        if (r["subtype"] or "").strip() not in SUBTYPE_TO_CLASS:
            continue
        sid = (r["id"] or "").strip()
        if not sid:
            raise DataError(f"{path}: row {row_number}: empty id")
        if sid in seen:
            raise DataError(f"{path}: row {row_number}: id {sid!r} repeats row {seen[sid]}")
        seen[sid] = row_number
        if not (r["text"] or "").strip():
            raise DataError(f"{path}: row {row_number} ({sid}): no caption text")
        kept.append({"slide_id": sid, "label": SUBTYPE_TO_CLASS[r["subtype"].strip()],
                     "caption": clean_caption(r["text"])})
    if not kept:
        raise DataError(f"{path}: no row has one of the subtypes {', '.join(SUBTYPE_TO_CLASS)}; "
                        "is this the official PatchGastric captions file?")
    return kept


def stratified_split(labels: Sequence[str], seed: int) -> list[str]:
    """20/40/40 train/val/test within each class (rounded, remainder to test)."""
    rng = np.random.default_rng(seed)
    split = [""] * len(labels)
    for cls in sorted(set(labels)):
        idx = [i for i, l in enumerate(labels) if l == cls]
        rng.shuffle(idx)
        n_train = round(SPLIT_FRACTIONS[0][1] * len(idx))
        n_val = round(SPLIT_FRACTIONS[1][1] * len(idx))
        for k, i in enumerate(idx):
            split[i] = "train" if k < n_train else "val" if k < n_train + n_val else "test"
    return split


def build_manifest(captions: Path, bags: Path, output: Path, seed: int = 0) -> dict:
    """Write the manifest; returns counts per class and split, and caption/bag statistics."""
    rows = read_captions(captions)
    splits = stratified_split([r["label"] for r in rows], seed)
    write_manifest([{**r, "split": s} for r, s in zip(rows, splits)], output)
    with_word = sum(bool(GRADE_WORDS.search(r["caption"])) for r in rows)
    after = sum(bool(GRADE_WORDS.search(strip_class_words(r["caption"], CLASSES))) for r in rows)
    return {
        "classes": Counter(r["label"] for r in rows),
        "splits": Counter(splits),
        "captions_with_class_words": with_word,
        "captions_with_class_words_after_stripping": after,
        "distinct_captions": len({r["caption"] for r in rows}),
        "missing_bags": sum(not (bags / f"{r['slide_id']}.h5").is_file() for r in rows),
        "n": len(rows),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m pathm3.datasets.patchgastric", description=__doc__.splitlines()[0])
    p.add_argument("--captions", required=True, type=Path, help="official captions CSV (id,subtype,text)")
    p.add_argument("--bags", required=True, type=Path, help="folder of <slide_id>.h5 bags (set as data.bags_dir)")
    p.add_argument("--output", required=True, type=Path, help="manifest CSV to write")
    p.add_argument("--seed", type=number(int, 0), default=0, help="split seed (default 0; the paper uses 3 seeds)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    stats = build_manifest(args.captions, args.bags, args.output, args.seed)
    print(f"{stats['n']} slides -> {args.output}")
    for cls in CLASSES:
        print(f"  {stats['classes'][cls]:4d}  {cls}")
    print("  split: " + ", ".join(f"{k} {stats['splits'][k]}" for k, _ in SPLIT_FRACTIONS))
    print(f"  {stats['captions_with_class_words']} captions name the class "
          f"({stats['captions_with_class_words_after_stripping']} after --strip-class-words); "
          f"{stats['distinct_captions']} distinct captions")
    if stats["missing_bags"]:
        print(f"  note: {stats['missing_bags']} slides have no bag in {args.bags} yet (run pathm3-extract)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
