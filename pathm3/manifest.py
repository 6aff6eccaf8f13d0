"""The manifest: which slides exist, their label, caption and split.

CSV with the columns ``slide_id,label,caption,split``. ``label`` and ``caption`` may be empty
(PathM3 is built for limited annotation); ``split`` is ``train``, ``val`` or ``test``. Each
row's bag is ``<bags_dir>/<slide_id>.h5``. Problems are :class:`~pathm3.errors.DataError`\\ s
naming the manifest file and the row (1-based, counting the header as row 1, as a spreadsheet
shows it).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pathm3.errors import DataError

COLUMNS = ("slide_id", "label", "caption", "split")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Slide:
    """One manifest row, resolved against the bags folder and the class list."""

    slide_id: str
    label: int | None  # index into data.classes, None when unlabelled
    caption: str | None  # None when there is no caption
    split: str
    bag_path: Path
    row: int  # line number in the CSV (header = 1)


def read_manifest(
    path: str | os.PathLike,
    bags_dir: str | os.PathLike,
    classes: Sequence[str],
    *,
    splits: Sequence[str] | None = None,
    check_bags: bool = True,
) -> list[Slide]:
    """Read and check a manifest; return its rows (only ``splits`` when given).

    Every row is checked, whatever ``splits`` says, so a broken row is found before training
    starts rather than when the test split is first read.
    """
    path = Path(path)
    bags_dir = Path(bags_dir)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (set data.manifest in the config)")
    class_index = {name: i for i, name in enumerate(classes)}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("slide_id", "split") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(missing)}; "
                f"a manifest has the header {','.join(COLUMNS)}"
            )
        slides: list[Slide] = []
        seen: dict[str, int] = {}
        for row_number, row in enumerate(reader, start=2):
            slides.append(_parse_row(row, row_number, path, bags_dir, class_index, seen, check_bags))
    if not slides:
        raise DataError(f"{path}: manifest has no rows")
    if splits is not None:
        slides = [s for s in slides if s.split in splits]
    return slides


def write_manifest(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write manifest rows (dicts with the :data:`COLUMNS`; other keys are ignored) atomically."""
    from pathm3.files import write_csv

    return write_csv(path, ({c: r.get(c) or "" for c in COLUMNS} for r in rows), COLUMNS)


def _parse_row(
    row: dict[str, str | None],
    row_number: int,
    path: Path,
    bags_dir: Path,
    class_index: dict[str, int],
    seen: dict[str, int],
    check_bags: bool,
) -> Slide:
    slide_id = (row.get("slide_id") or "").strip()
    where = f"{path}: row {row_number}"
    if not slide_id:
        raise DataError(f"{where}: empty slide_id")
    where = f"{where} ({slide_id})"
    if slide_id in seen:
        raise DataError(f"{where}: slide_id repeats row {seen[slide_id]}")
    seen[slide_id] = row_number
    split = (row.get("split") or "").strip()
    if split not in SPLITS:
        raise DataError(f"{where}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    label_text = (row.get("label") or "").strip()
    label = None
    if label_text:
        if label_text not in class_index:
            known = ", ".join(class_index) or "(none: data.classes is empty)"
            raise DataError(f"{where}: label {label_text!r} is not in data.classes [{known}]")
        label = class_index[label_text]
    caption = (row.get("caption") or "").strip() or None
    bag_path = bags_dir / f"{slide_id}.h5"
    if check_bags and not bag_path.is_file():
        raise DataError(f"{where}: bag not found: {bag_path} (run pathm3-extract or fix data.bags_dir)")
    return Slide(slide_id=slide_id, label=label, caption=caption, split=split, bag_path=bag_path, row=row_number)
