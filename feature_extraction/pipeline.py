"""One slide, in two halves that a run overlaps: :func:`prepare` (open, thumbnail, tissue mask,
grid, preview; no encoder needed) and :func:`finish` (read the patches in worker processes while
the encoder runs, then write the bag and the preview).

Every failure that belongs to the slide surfaces as :class:`SlideError` with a one-line reason,
including unreadable regions and patch images inside DataLoader workers: a worker returns the
reason with the batch instead of raising, so no worker traceback ends up in extraction.csv.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from feature_extraction.encoders import Encoder
from feature_extraction.inputs import patch_coords_from_names
from feature_extraction.settings import ExtractionSettings, SlideJob, SlideResult
from feature_extraction.slides import Scale, SlideError, open_slide, read_patch, resolve_scale
from feature_extraction.tiling import plan_slide, render_preview
from pathm3.bags import write_bag
from pathm3.files import atomic_output


@dataclass
class PreparedSlide:
    """A slide ready for the encoder: its patch source, coords and everything written beside them."""

    job: SlideJob
    dataset: Dataset
    coords: np.ndarray
    coords_attrs: dict
    file_attrs: dict
    extra: dict | None = None
    preview_png: bytes | None = None
    warning: str = ""
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# Patch sources (each item: a uint8 (H, W, 3) tensor and '' or a one-line error)


class RegionDataset(Dataset):
    """Patches of one slide; each worker opens its own OpenSlide handle on first use."""

    def __init__(self, path: Path, coords: np.ndarray, scale: Scale):
        self.path, self.coords, self.scale = path, coords, scale
        self._slide = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        x, y = (int(v) for v in self.coords[i])
        try:
            if self._slide is None:
                self._slide = open_slide(self.path)
            return torch.from_numpy(read_patch(self._slide, x, y, self.scale).copy()), ""
        except Exception as exc:  # noqa: BLE001 - reported as the slide's one-line error
            return self._blank(), f"cannot read the region at level-0 ({x}, {y}): {one_line(exc)}"

    def _blank(self) -> torch.Tensor:
        return torch.zeros((self.scale.patch_size, self.scale.patch_size, 3), dtype=torch.uint8)


class ImageFileDataset(Dataset):
    """Patch images from files, resized to a common size."""

    def __init__(self, files: Sequence[Path], size: int):
        self.files, self.size = list(files), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return torch.from_numpy(load_image(self.files[i], self.size)), ""
        except SlideError as exc:
            return torch.zeros((self.size, self.size, 3), dtype=torch.uint8), str(exc)


def load_image(path: Path, size: int | None = None) -> np.ndarray:
    """RGB uint8 array of an image file (resized to size x size); SlideError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if size is not None and rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.BILINEAR)
            return np.array(rgb)
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
        raise SlideError(f"{path}: cannot read this patch image ({one_line(exc)})") from None


def one_line(exc: BaseException) -> str:
    """An exception as one line: a wrapped worker traceback is reduced to its last line."""
    text = str(exc)
    if "Traceback" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
    text = " ".join(text.split())
    return text or type(exc).__name__


# --------------------------------------------------------------------------------------------
# First half: everything before the encoder


def prepare(job: SlideJob, settings: ExtractionSettings, input_size: int) -> PreparedSlide:
    """Open the slide (or patch folder) and decide its patches; raises :class:`SlideError`."""
    t0 = time.perf_counter()
    prepared = _prepare_patch_files(job, settings, input_size) if job.patch_files else _prepare_slide(job, settings)
    prepared.seconds = time.perf_counter() - t0
    return prepared


def _prepare_slide(job: SlideJob, settings: ExtractionSettings) -> PreparedSlide:
    slide = open_slide(job.path)
    try:
        scale = resolve_scale(slide, patch_size=settings.patch_size, magnification=settings.magnification,
                              mpp=settings.mpp, source_magnification=settings.source_magnification,
                              source_mpp=settings.source_mpp)
        plan = plan_slide(slide, scale.patch_size_level0, settings.tissue_method, settings.tissue_threshold)
        w, h = slide.dimensions
    finally:
        slide.close()
    tiles = plan.tiling
    if len(tiles.coords) == 0:
        raise SlideError(f"no tissue found (mask covers {tiles.mask_fraction:.1%} of the thumbnail; try a lower "
                         f"--tissue-threshold or another --tissue-method)")
    coords_attrs = {
        "patch_size": scale.patch_size, "patch_size_level0": scale.patch_size_level0,
        "level0_magnification": scale.level0_magnification,
        "target_magnification": scale.level0_magnification / scale.downsample,
        "level0_width": w, "level0_height": h, "name": job.slide_id, "read_level": scale.level,
        "n_edge_padded": tiles.n_edge_padded, "edge_padding": "white",
    }
    file_attrs = {**_file_attrs(job, settings, scale.mpp), "tissue_covered": tiles.covered,
                  "tissue_mask_fraction": tiles.mask_fraction, "warning": plan.warning or None}
    preview = None
    if settings.previews:
        preview = _png(render_preview(plan.thumb, plan.mask, tiles.coords, scale.patch_size_level0,
                                      plan.level0_per_px))
    return PreparedSlide(job, RegionDataset(job.path, tiles.coords, scale), tiles.coords, coords_attrs, file_attrs,
                         preview_png=preview, warning=plan.warning)


def _prepare_patch_files(job: SlideJob, settings: ExtractionSettings, input_size: int) -> PreparedSlide:
    from PIL import Image

    first = job.patch_files[0]
    try:
        with Image.open(first) as img:
            patch_px = img.size[0]
    except Exception as exc:  # noqa: BLE001
        raise SlideError(f"{first}: cannot read this patch image ({one_line(exc)})") from None
    coords = patch_coords_from_names(job.patch_files, settings.slide_id_pattern, patch_px)
    mag = settings.target_magnification
    coords_attrs = {"patch_size": patch_px, "patch_size_level0": patch_px, "level0_magnification": mag,
                    "target_magnification": mag, "level0_width": int(coords[:, 0].max()) + patch_px,
                    "level0_height": int(coords[:, 1].max()) + patch_px, "name": job.slide_id}
    names = np.array([str(f.relative_to(job.path)) for f in job.patch_files], dtype=object)
    return PreparedSlide(job, ImageFileDataset(job.patch_files, input_size), coords, coords_attrs,
                         _file_attrs(job, settings, 10.0 / mag), extra={"patch_names": names})


def _file_attrs(job: SlideJob, settings: ExtractionSettings, mpp: float | None) -> dict:
    return {"mpp": mpp, "slide_path": str(Path(job.path).resolve()),
            "extraction_settings": settings.fingerprint(), "extraction_json": json.dumps(dataclasses.asdict(settings))}


def _png(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return buf.tobytes() if ok else b""


# --------------------------------------------------------------------------------------------
# Second half: patches through the encoder, then the outputs


def open_batches(dataset: Dataset, settings: ExtractionSettings) -> Iterator:
    """Start reading: a DataLoader iterator (its worker processes start here and read ahead)."""
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=settings.workers,
        pin_memory=settings.device.startswith("cuda"),
        prefetch_factor=4 if settings.workers > 0 else None,
        persistent_workers=False,
    )
    return iter(loader)


def encode_batches(batches: Iterator, n: int, encoder: Encoder, settings: ExtractionSettings,
                   desc: str = "") -> np.ndarray:
    """Run the encoder over (patches, errors) batches; the first error is raised as SlideError."""
    out = np.empty((n, encoder.dim), dtype=np.float32)
    done = 0
    with tqdm(total=n, desc=desc, unit="patch", leave=False, disable=not settings.progress,
              dynamic_ncols=True) as bar:
        for patches, errors in batches:
            bad = next((e for e in errors if e), None)
            if bad:
                raise SlideError(bad)
            feats = encoder.encode(patches.to(settings.device, non_blocking=True))
            out[done: done + len(feats)] = feats.cpu().numpy()
            done += len(feats)
            bar.update(len(feats))
    return out


def encode_dataset(dataset: Dataset, encoder: Encoder, settings: ExtractionSettings, desc: str = "") -> np.ndarray:
    """Run the encoder over a whole dataset of (patch, error) items."""
    return encode_batches(open_batches(dataset, settings), len(dataset), encoder, settings, desc)


def finish(prepared: PreparedSlide, batches: Iterator, encoder: Encoder, out_dir: Path,
           settings: ExtractionSettings) -> SlideResult:
    """Encode a prepared slide from its started ``batches``, write its bag and preview."""
    t0 = time.perf_counter()
    job = prepared.job
    feats = encode_batches(batches, len(prepared.coords), encoder, settings, desc=job.slide_id)
    if not np.isfinite(feats).all():
        raise SlideError("the encoder produced NaN/inf features (try --precision fp32)")
    write_bag(out_dir / f"{job.slide_id}.h5", feats, prepared.coords, dtype=settings.feature_dtype,
              coords_attrs=prepared.coords_attrs, file_attrs=prepared.file_attrs, extra_datasets=prepared.extra,
              features_attrs={"encoder": encoder.name, "name": job.slide_id, "pooling": encoder.pooling})
    if prepared.preview_png:
        with atomic_output(out_dir / "previews" / f"{job.slide_id}.png") as tmp:
            tmp.write_bytes(prepared.preview_png)
    seconds = prepared.seconds + time.perf_counter() - t0
    return SlideResult(job.slide_id, str(job.path), "done", len(prepared.coords), seconds, warning=prepared.warning)


def extract_slide(job: SlideJob, out_dir: Path, settings: ExtractionSettings, encoder: Encoder) -> SlideResult:
    """Prepare, encode and write one slide in turn; raises :class:`SlideError` on failure."""
    prepared = prepare(job, settings, encoder.input_size)
    return finish(prepared, open_batches(prepared.dataset, settings), encoder, Path(out_dir), settings)
