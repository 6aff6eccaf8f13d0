"""Feature extraction: slides (or patch folders) -> tissue patches -> frozen encoder -> HDF5 bags.

    from feature_extraction.extract import ExtractionSettings, find_slides, run
    settings = ExtractionSettings(encoder="tiny-vit", magnification=20)
    results = run(find_slides(["slides/"]), "bags/", settings)

Per slide: open it, resolve the scale, find tissue on a thumbnail, keep the grid patches with
enough tissue, read them in worker processes (each with its own OpenSlide handle) while the
encoder runs, write ``<slide_id>.h5`` atomically, then a preview PNG and a row of
``extraction.csv``. A slide that fails becomes a ``failed`` row with a one-line reason; the run
goes on. A rerun skips slides whose bag is complete and was made with the same settings.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from feature_extraction.encoders import Encoder, load_encoder
from feature_extraction.slides import (
    OPENSLIDE_EXTENSIONS,
    Scale,
    SlideError,
    open_slide,
    read_patch,
    resolve_scale,
    thumbnail,
)
from feature_extraction.tissue import grid, patch_tissue_fraction, tissue_mask
from pathm3.bags import index_grid, inspect_bag, write_bag
from pathm3.errors import DataError, UsageError
from pathm3.files import atomic_output, write_csv

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
DEFAULT_SLIDE_ID_PATTERN = r"^(?P<slide_id>[^_]+)_(?P<rest>.+)$"
CSV_COLUMNS = ("slide_id", "path", "status", "n_patches", "seconds", "error")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ExtractionSettings:
    """Everything that decides what a bag contains (and, below the line, how fast it is made)."""

    encoder: str = "eva-vit-g"
    weights: str | None = None
    magnification: float | None = 20.0
    mpp: float | None = None
    patch_size: int = 224
    source_magnification: float | None = None
    source_mpp: float | None = None
    tissue_threshold: float = 0.5
    precision: str = "fp32"
    feature_dtype: str = "float16"
    patch_folder: bool = False
    slide_id_pattern: str | None = None
    # -- speed and bookkeeping only: not part of the fingerprint
    batch_size: int = 64
    workers: int = 2
    device: str = "cpu"
    overwrite: bool = False
    previews: bool = True
    progress: bool = True

    def fingerprint(self) -> str:
        """Hash of the settings that change a bag's content; stored in every bag for resume."""
        content = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name not in ("batch_size", "workers", "device", "overwrite", "previews", "progress")}
        if content["weights"]:
            content["weights"] = str(Path(content["weights"]).resolve())
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SlideJob:
    """One slide to process: a slide file, or the patch images of one slide."""

    slide_id: str
    path: Path
    patch_files: list[Path] = field(default_factory=list)


@dataclass
class SlideResult:
    slide_id: str
    path: str
    status: str  # done | skipped | failed
    n_patches: int = 0
    seconds: float = 0.0
    error: str = ""


# --------------------------------------------------------------------------------------------
# Finding slides


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
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if "path" not in (reader.fieldnames or []):
            raise UsageError(f"{path}: an input CSV needs a 'path' column (and optionally 'slide_id')")
        jobs = []
        for row_number, row in enumerate(reader, start=2):
            slide = Path((row.get("path") or "").strip())
            if not str(slide):
                raise UsageError(f"{path}: row {row_number}: empty path")
            if not slide.is_absolute():
                slide = (path.parent / slide) if not slide.exists() else slide
            jobs.append(SlideJob((row.get("slide_id") or "").strip() or slide.stem, slide))
    return jobs


def _group_patch_folder(folder: Path, pattern: str | None) -> list[SlideJob]:
    regex = re.compile(pattern or DEFAULT_SLIDE_ID_PATTERN)
    groups: dict[str, list[Path]] = {}
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        m = regex.match(f.stem)
        if not m:
            continue
        sid = m.groupdict().get("slide_id") or m.group(1)
        groups.setdefault(sid, []).append(f)
    return [SlideJob(sid, folder, files) for sid, files in sorted(groups.items())]


def patch_coords_from_names(files: Sequence[Path], pattern: str | None, patch_px: int) -> np.ndarray:
    """Level-0 coords of patch images: from the name (``x``/``y`` groups, or ``..._X_Y``) when it
    holds them, otherwise from the patch index laid out on a square grid of patch-sized cells."""
    regex = re.compile(pattern or DEFAULT_SLIDE_ID_PATTERN)
    tail = re.compile(r"(?:^|[_-])x?(\d+)[_-]y?(\d+)$")
    coords = []
    for f in files:
        m = regex.match(f.stem)
        groups = m.groupdict() if m else {}
        if groups.get("x") is not None and groups.get("y") is not None:
            coords.append((int(groups["x"]), int(groups["y"])))
            continue
        t = tail.search(groups.get("rest") or "")
        if t is None:
            break
        coords.append((int(t.group(1)), int(t.group(2))))
    if len(coords) == len(files):
        return np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    return index_grid(len(files), patch_px)


# --------------------------------------------------------------------------------------------
# Reading patches in worker processes


class _RegionDataset(Dataset):
    """Patches of one slide; each worker opens its own OpenSlide handle on first use."""

    def __init__(self, path: Path, coords: np.ndarray, scale: Scale):
        self.path, self.coords, self.scale = path, coords, scale
        self._slide = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._slide is None:
            self._slide = open_slide(self.path)
        x, y = self.coords[i]
        return torch.from_numpy(read_patch(self._slide, x, y, self.scale).copy())


class _ImageFileDataset(Dataset):
    """Patch images from files, resized to a common size."""

    def __init__(self, files: Sequence[Path], size: int):
        self.files, self.size = list(files), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            rgb = img.convert("RGB")
            if rgb.size != (self.size, self.size):
                rgb = rgb.resize((self.size, self.size), Image.BILINEAR)
            return torch.from_numpy(np.asarray(rgb).copy())


def encode_dataset(dataset: Dataset, encoder: Encoder, settings: ExtractionSettings, desc: str = "") -> np.ndarray:
    """Run the encoder over a dataset of uint8 patches, reading ahead in worker processes."""
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=settings.workers,
        pin_memory=settings.device.startswith("cuda"),
        prefetch_factor=4 if settings.workers > 0 else None,
        persistent_workers=False,
    )
    out = np.empty((len(dataset), encoder.dim), dtype=np.float32)
    done = 0
    with tqdm(total=len(dataset), desc=desc, unit="patch", leave=False, disable=not settings.progress,
              dynamic_ncols=True) as bar:
        for batch in loader:
            feats = encoder.encode(batch.to(settings.device, non_blocking=True))
            out[done: done + len(feats)] = feats.cpu().numpy()
            done += len(feats)
            bar.update(len(feats))
    return out


# --------------------------------------------------------------------------------------------
# One slide


def extract_slide(job: SlideJob, out_dir: Path, settings: ExtractionSettings, encoder: Encoder) -> SlideResult:
    """Process one slide; raises :class:`SlideError` with a one-line reason on failure."""
    t0 = time.perf_counter()
    bag_path = out_dir / f"{job.slide_id}.h5"
    if job.patch_files:
        feats, coords, attrs, extra, preview = _from_patch_files(job, settings, encoder)
    else:
        feats, coords, attrs, extra, preview = _from_slide(job, settings, encoder)
    if not np.isfinite(feats).all():
        raise SlideError("the encoder produced NaN/inf features (try --precision fp32)")
    write_bag(bag_path, feats, coords, dtype=settings.feature_dtype, coords_attrs=attrs["coords"],
              features_attrs=attrs["features"], file_attrs=attrs["file"], extra_datasets=extra)
    if settings.previews and preview is not None:
        _save_png(preview, out_dir / "previews" / f"{job.slide_id}.png")
    return SlideResult(job.slide_id, str(job.path), "done", len(coords), time.perf_counter() - t0)


def _from_slide(job: SlideJob, settings: ExtractionSettings, encoder: Encoder):
    slide = open_slide(job.path)
    try:
        scale = resolve_scale(slide, patch_size=settings.patch_size, magnification=settings.magnification,
                              mpp=settings.mpp, source_magnification=settings.source_magnification,
                              source_mpp=settings.source_mpp)
        thumb, level0_per_px = thumbnail(slide)
        mask = tissue_mask(np.asarray(thumb))
        w, h = slide.dimensions
        all_coords = grid(w, h, scale.patch_size_level0)
        fraction = patch_tissue_fraction(mask, all_coords, scale.patch_size_level0, level0_per_px)
        coords = all_coords[fraction >= settings.tissue_threshold]
        if len(coords) == 0:
            raise SlideError(f"no tissue found ({mask.mean():.1%} of the thumbnail; try a lower --tissue-threshold)")
    finally:
        slide.close()
    feats = encode_dataset(_RegionDataset(job.path, coords, scale), encoder, settings, desc=job.slide_id)
    target_mag = scale.level0_magnification / scale.downsample
    attrs = {
        "coords": {"patch_size": scale.patch_size, "patch_size_level0": scale.patch_size_level0,
                   "level0_magnification": scale.level0_magnification, "target_magnification": target_mag,
                   "level0_width": w, "level0_height": h, "name": job.slide_id, "read_level": scale.level},
        "features": {"encoder": encoder.name, "name": job.slide_id, "pooling": encoder.pooling},
        "file": _file_attrs(job, settings, scale.mpp),
    }
    preview = _preview(thumb, mask, coords, scale.patch_size_level0, level0_per_px)
    return feats, coords, attrs, None, preview


def _from_patch_files(job: SlideJob, settings: ExtractionSettings, encoder: Encoder):
    from PIL import Image

    with Image.open(job.patch_files[0]) as first:
        patch_px = first.size[0]
    coords = patch_coords_from_names(job.patch_files, settings.slide_id_pattern, patch_px)
    feats = encode_dataset(_ImageFileDataset(job.patch_files, encoder.input_size), encoder, settings, desc=job.slide_id)
    mag = settings.magnification or (10.0 / settings.mpp if settings.mpp else 20.0)
    attrs = {
        "coords": {"patch_size": patch_px, "patch_size_level0": patch_px, "level0_magnification": mag,
                   "target_magnification": mag, "level0_width": int(coords[:, 0].max()) + patch_px,
                   "level0_height": int(coords[:, 1].max()) + patch_px, "name": job.slide_id},
        "features": {"encoder": encoder.name, "name": job.slide_id, "pooling": encoder.pooling},
        "file": _file_attrs(job, settings, 10.0 / mag),
    }
    names = np.array([str(f.relative_to(job.path)) for f in job.patch_files], dtype=object)
    return feats, coords, attrs, {"patch_names": names}, None


def _file_attrs(job: SlideJob, settings: ExtractionSettings, mpp: float | None) -> dict:
    return {"mpp": mpp, "slide_path": str(Path(job.path).resolve()),
            "extraction_settings": settings.fingerprint(), "extraction_json": json.dumps(dataclasses.asdict(settings))}


def _preview(thumb, mask: np.ndarray, coords: np.ndarray, ps0: int, level0_per_px: float):
    """Thumbnail with the tissue outline (green) and the kept patches (blue)."""
    from PIL import ImageDraw
    from skimage import measure

    img = thumb.copy()
    draw = ImageDraw.Draw(img)
    for x, y in coords / level0_per_px:
        s = ps0 / level0_per_px
        draw.rectangle([x, y, x + s, y + s], outline=(40, 90, 220), width=max(1, img.width // 600))
    for contour in measure.find_contours(mask.astype(float), 0.5):
        draw.line([(c, r) for r, c in contour], fill=(0, 170, 0), width=max(2, img.width // 400))
    return img


def _save_png(img, path: Path) -> None:
    with atomic_output(path) as tmp:
        img.save(tmp, format="PNG")


# --------------------------------------------------------------------------------------------
# A whole run


def parse_shard(text: str | None) -> tuple[int, int]:
    """``i/n`` (0-based) -> (i, n); without it, torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    if text is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UsageError(f"--shard {text}: expected i/n with 0 <= i < n, e.g. --shard 0/4")
    return int(m.group(1)), int(m.group(2))


def bag_is_current(bag_path: Path, settings: ExtractionSettings) -> int | None:
    """N patches when ``bag_path`` is a complete bag made with these settings, else None."""
    if not bag_path.is_file():
        return None
    try:
        info = inspect_bag(bag_path)
    except DataError:
        return None
    return info.n_patches if info.attrs.get("extraction_settings") == settings.fingerprint() else None


def run(jobs: Sequence[SlideJob], out_dir: str | os.PathLike, settings: ExtractionSettings,
        shard: tuple[int, int] = (0, 1), encoder: Encoder | None = None) -> list[SlideResult]:
    """Process this shard's jobs; returns one result per slide (also recorded in extraction.csv)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.precision not in PRECISIONS:
        raise UsageError(f"--precision {settings.precision}: choose fp32, fp16 or bf16")
    mine = list(jobs)[shard[0]::shard[1]]
    todo, results = [], []
    for job in mine:
        _remove_stale_temporaries(out_dir, job.slide_id)
        n = None if settings.overwrite else bag_is_current(out_dir / f"{job.slide_id}.h5", settings)
        if n is not None:
            results.append(SlideResult(job.slide_id, str(job.path), "skipped", n))
        else:
            todo.append(job)
    record_results(out_dir / "extraction.csv", results)
    if todo and encoder is None:
        encoder = load_encoder(settings.encoder, settings.weights).to(torch.device(settings.device),
                                                                     PRECISIONS[settings.precision])
    with tqdm(total=len(mine), initial=len(results), desc="slides", unit="slide", disable=not settings.progress,
              dynamic_ncols=True) as bar:
        for job in todo:
            try:
                result = extract_slide(job, out_dir, settings, encoder)
            except SlideError as exc:
                result = SlideResult(job.slide_id, str(job.path), "failed", error=str(exc))
            except Exception as exc:  # a corrupt tile, an unreadable image: this slide only
                message = " ".join(str(exc).split()) or "no message"
                result = SlideResult(job.slide_id, str(job.path), "failed", error=f"{type(exc).__name__}: {message}")
            results.append(result)
            record_results(out_dir / "extraction.csv", [result])
            bar.update(1)
    return results


def _remove_stale_temporaries(out_dir: Path, slide_id: str) -> None:
    # Left by a killed run under pathm3.files.temporary_name's pattern (any pid).
    for pattern in (f".{slide_id}.h5.tmp-*", f"previews/.{slide_id}.png.tmp-*"):
        for tmp in out_dir.glob(pattern):
            tmp.unlink(missing_ok=True)


def record_results(csv_path: Path, results: Iterable[SlideResult]) -> None:
    """Insert or update rows of extraction.csv by slide_id, under a file lock (shards share it)."""
    results = list(results)
    if not results:
        return
    lock = os.open(csv_path.parent, os.O_RDONLY)  # lock the folder: no lock file left behind
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows: dict[str, dict] = {}
        if csv_path.is_file():
            with open(csv_path, newline="", encoding="utf-8") as fh:
                rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
        for r in results:
            rows[r.slide_id] = {"slide_id": r.slide_id, "path": r.path, "status": r.status,
                                "n_patches": r.n_patches, "seconds": f"{r.seconds:.2f}", "error": r.error}
        write_csv(csv_path, rows.values(), CSV_COLUMNS)
    finally:
        os.close(lock)  # closing releases the lock

