"""Finding the slides of a run: files, folders, slide-list CSVs and PatchGastric-style patch folders."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from feature_extraction.settings import SlideJob
from feature_extraction.slides import OPENSLIDE_EXTENSIONS
from pathm3.bags import index_grid
from pathm3.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
DEFAULT_SLIDE_ID_PATTERN = r"^(?P<slide_id>[^_]+)_(?P<rest>.+)$"


def compile_slide_id_pattern(pattern: str | None) -> re.Pattern:
    """The ``--slide-id-pattern`` regex; ValueError with a one-line reason when it is unusable."""
    try:
        regex = re.compile(pattern or DEFAULT_SLIDE_ID_PATTERN)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression ({exc})") from None
    if "slide_id" not in regex.groupindex and regex.groups == 0:
        raise ValueError("needs a (?P<slide_id>...) group, e.g. '^(?P<slide_id>[^_]+)_'")
    return regex


def find_slides(inputs: Sequence[str | os.PathLike], patch_folder: bool = False,
                slide_id_pattern: str | None = None) -> list[SlideJob]:
    """Expand files, folders and CSVs (``path`` column, optional ``slide_id``) into jobs."""
    jobs: list[SlideJob] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise UsageError(f"{p}: no such file or folder")
        if patch_folder:
            if not p.is_dir():
                raise UsageError(f"{p}: --patch-folder expects a folder of patch images")
            jobs += _group_patch_folder(p, slide_id_pattern)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in OPENSLIDE_EXTENSIONS)
            jobs += [SlideJob(f.stem, f) for f in files]
        elif p.suffix.lower() == ".csv":
            jobs += _read_slide_csv(p)
        else:
            jobs.append(SlideJob(p.stem, p))
    if not jobs:
        raise UsageError(f"no slides found in {', '.join(map(str, inputs))}")
    seen: dict[str, Path] = {}
    for j in jobs:
        if j.slide_id in seen:
            raise UsageError(f"{j.path}: slide_id {j.slide_id!r} also used by {seen[j.slide_id]}; "
                             "give unique slide_id values in an input CSV")
        seen[j.slide_id] = j.path
    return jobs


def _read_slide_csv(path: Path) -> list[SlideJob]:
    """Jobs from a slide-list CSV; a file that is not a readable text CSV is a usage error."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return _csv_jobs(path, csv.DictReader(fh))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not a text CSV (undecodable byte at position {exc.start}); give a CSV "
                         "with a 'path' column, or the slide files or folders themselves") from None
    except csv.Error as exc:
        raise UsageError(f"{path}: not a readable CSV ({exc}); give a CSV with a 'path' column") from None


def _csv_jobs(path: Path, reader: csv.DictReader) -> list[SlideJob]:
    if "path" not in (reader.fieldnames or []):
        raise UsageError(f"{path}: an input CSV needs a 'path' column (and optionally 'slide_id')")
    jobs = []
    for row_number, row in enumerate(reader, start=2):
        slide = Path((row.get("path") or "").strip())
        if not str(slide) or str(slide) == ".":
            raise UsageError(f"{path}: row {row_number}: empty path")
        if not slide.is_absolute():
            slide = (path.parent / slide) if not slide.exists() else slide
        jobs.append(SlideJob((row.get("slide_id") or "").strip() or slide.stem, slide))
    return jobs


def _group_patch_folder(folder: Path, pattern: str | None) -> list[SlideJob]:
    try:
        regex = compile_slide_id_pattern(pattern)
    except ValueError as exc:
        raise UsageError(f"--slide-id-pattern {pattern}: {exc}") from None
    groups: dict[str, list[Path]] = {}
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        m = regex.match(f.stem)
        if not m:
            continue
        sid = m.groupdict().get("slide_id") or m.group(1)
        if sid:
            groups.setdefault(sid, []).append(f)
    return [SlideJob(sid, folder, files) for sid, files in sorted(groups.items())]


def patch_coords_from_names(files: Sequence[Path], pattern: str | None, patch_px: int) -> np.ndarray:
    """Level-0 coords of patch images: from the name (``x``/``y`` groups, or ``..._X_Y``) when it
    holds them, otherwise from the patch index laid out on a square grid of patch-sized cells."""
    regex = compile_slide_id_pattern(pattern)
    tail = re.compile(r"(?:^|[_-])x?(\d+)[_-]y?(\d+)$")
    coords = []
    for f in files:
        m = regex.match(f.stem)
        groups = m.groupdict() if m else {}
        if (groups.get("x") or "").isdigit() and (groups.get("y") or "").isdigit():
            coords.append((int(groups["x"]), int(groups["y"])))
            continue
        t = tail.search(groups.get("rest") or "")
        if t is None:
            break
        coords.append((int(t.group(1)), int(t.group(2))))
    if len(coords) == len(files):
        return np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    return index_grid(len(files), patch_px)
