"""The manifest: which slides exist, their label, caption and split.

CSV with the columns ``slide_id,label,caption,split``. ``label`` and ``caption`` may be empty
(PathM3 is built for limited annotation); ``split`` is ``train``, ``val`` or ``test``. Each
row's bag is ``<bags_dir>/<slide_id>.h5``. Multi-label manifests (``data.multilabel``) have one
column per class, named exactly as in ``data.classes``, holding ``1``, ``0`` or empty (unknown)
instead of ``label``. Problems are :class:`~pathm3.errors.DataError`\\ s
naming the manifest file and the row (1-based, counting the header as row 1, as a spreadsheet
shows it).
"""

from __future__ import annotations

import csv
import math
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
    targets: tuple[float, ...]  # one entry per class: 1.0, 0.0 or NaN (unknown); single-label: one-hot
    caption: str | None  # None when there is no caption
    split: str
    bag_path: Path
    row: int  # line number in the CSV (header = 1)

    @property
    def label(self) -> int | None:
        """The class index of a single-label row (one 1, the rest 0), else None."""
        if any(math.isnan(t) for t in self.targets) or sum(self.targets) != 1:
            return None
        return self.targets.index(1.0)

    @property
    def labelled(self) -> bool:
        """Whether any class entry is known."""
        return any(not math.isnan(t) for t in self.targets)


def one_hot(label: int | None, num_classes: int) -> tuple[float, ...]:
    """Targets of a single-label slide (all NaN when unlabelled)."""
    if label is None:
        return (math.nan,) * num_classes
    return tuple(1.0 if i == label else 0.0 for i in range(num_classes))


def read_manifest(
    path: str | os.PathLike,
    bags_dir: str | os.PathLike,
    classes: Sequence[str],
    *,
    splits: Sequence[str] | None = None,
    check_bags: bool = True,
    multilabel: bool = False,
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
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            needed = ["slide_id", "split", *(classes if multilabel else [])]
            missing = [c for c in needed if c not in (reader.fieldnames or [])]
            if missing:
                header = "slide_id,<one column per class>,caption,split" if multilabel else ",".join(COLUMNS)
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}; a manifest has the header {header}")
            slides: list[Slide] = []
            seen: dict[str, int] = {}
            for row_number, row in enumerate(reader, start=2):
                slides.append(_parse_row(row, row_number, path, bags_dir, class_index, seen, check_bags, multilabel))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text CSV file (is it the manifest?)") from None
    if not slides:
        raise DataError(f"{path}: manifest has no rows")
    if splits is not None:
        slides = [s for s in slides if s.split in splits]
    return slides


def write_manifest(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write manifest rows (dicts with the :data:`COLUMNS`; other keys are ignored) atomically."""
    from pathm3.files import write_csv

    rows = list(rows)
    extra = [k for k in (rows[0] if rows else {}) if k not in COLUMNS and k not in ("regions",)]
    columns = [*COLUMNS, *extra]
    return write_csv(path, ({c: "" if r.get(c) is None else r.get(c) for c in columns} for r in rows), columns)


def _parse_row(
    row: dict[str, str | None],
    row_number: int,
    path: Path,
    bags_dir: Path,
    class_index: dict[str, int],
    seen: dict[str, int],
    check_bags: bool,
    multilabel: bool = False,
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
    if multilabel:
        targets = tuple(_finding(row.get(name), name, where) for name in class_index)
    else:
        label_text = (row.get("label") or "").strip()
        label = None
        if label_text:
            if label_text not in class_index:
                known = ", ".join(class_index) or "(none: data.classes is empty)"
                raise DataError(f"{where}: label {label_text!r} is not in data.classes [{known}]")
            label = class_index[label_text]
        targets = one_hot(label, len(class_index))
    caption = (row.get("caption") or "").strip() or None
    bag_path = bags_dir / f"{slide_id}.h5"
    if check_bags and not bag_path.is_file():
        raise DataError(f"{where}: bag not found: {bag_path} (run pathm3-extract or fix data.bags_dir)")
    return Slide(slide_id=slide_id, targets=targets, caption=caption, split=split, bag_path=bag_path, row=row_number)


def _finding(text: str | None, name: str, where: str) -> float:
    value = (text or "").strip()
    if value in ("", "nan", "NA"):
        return math.nan
    if value in ("1", "1.0", "0", "0.0"):
        return float(value)
    raise DataError(f"{where}: column {name!r} must be 1, 0 or empty (unknown), got {value!r}")
