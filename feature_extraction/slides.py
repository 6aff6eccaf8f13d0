"""Slides as a source of patches: scale resolution, pyramid-level choice and region reads.

The target scale is a magnification (``--magnification 20``) or a resolution (``--mpp 0.5``).
The slide's own scale comes from its metadata (``openslide.objective-power`` /
``openslide.mpp-x``) or from ``--source-magnification`` / ``--source-mpp``. Magnification and
mpp are related by the usual convention mag = 10 / mpp (20x = 0.5 um/px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPENSLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".czi")


class SlideError(Exception):
    """A slide that cannot be processed; the message is one line for the `failed` row."""


@dataclass(frozen=True)
class Scale:
    """How one slide is tiled: level-0 patch size and the pyramid level read from."""

    level0_magnification: float
    mpp: float | None  # level-0 microns per pixel
    downsample: float  # level-0 pixels per target pixel
    patch_size: int  # pixels at the target scale
    patch_size_level0: int
    level: int  # pyramid level the patches are read from
    level_downsample: float
    read_size: int  # pixels read at `level` (resized to patch_size afterwards)


def open_slide(path: str | Path):
    """Open with OpenSlide, turning its exceptions into a one-line :class:`SlideError`."""
    import openslide

    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError("cannot open: OpenSlide does not recognise this file format") from None
    except openslide.OpenSlideError as exc:
        raise SlideError(f"cannot open: OpenSlide error: {exc}") from None
    except OSError as exc:
        raise SlideError(f"cannot open: {exc.strerror or exc}") from None


def resolve_scale(
    slide,
    *,
    patch_size: int,
    magnification: float | None = None,
    mpp: float | None = None,
    source_magnification: float | None = None,
    source_mpp: float | None = None,
) -> Scale:
    """Work out the level-0 patch footprint and the best level to read it from."""
    props = slide.properties
    meta_mpp = _float(props.get("openslide.mpp-x"))
    meta_mag = _float(props.get("openslide.objective-power"))
    src_mpp = source_mpp or meta_mpp or (10.0 / (source_magnification or meta_mag) if (source_magnification or meta_mag) else None)
    src_mag = source_magnification or meta_mag or (10.0 / src_mpp if src_mpp else None)
    if src_mag is None:
        raise SlideError(
            "no magnification or mpp in the slide metadata; pass --source-magnification or --source-mpp"
        )
    if mpp is not None:
        downsample = mpp / src_mpp
    else:
        downsample = src_mag / (magnification or 20.0)
    if downsample < 0.99:
        have = f"{src_mag:g}x" if magnification is not None or mpp is None else f"{src_mpp:g} um/px"
        raise SlideError(f"scanned at {have}, lower than the requested scale; choose a lower --magnification")
    downsample = max(downsample, 1.0)
    ps0 = int(round(patch_size * downsample))
    w, h = slide.dimensions
    if w < ps0 or h < ps0:
        raise SlideError(f"smaller than one patch ({w}x{h} px at level 0; one patch needs {ps0}x{ps0})")
    return reading_scale(slide, patch_size, ps0, downsample, src_mag, src_mpp)


def reading_scale(slide, patch_size: int, patch_size_level0: int, downsample: float | None = None,
                  level0_magnification: float = 0.0, mpp: float | None = None) -> Scale:
    """How to read patches of a known level-0 footprint (e.g. a bag's): from the smallest pyramid
    level that still has the resolution, never from level 0 when a smaller level will do."""
    downsample = downsample or patch_size_level0 / patch_size
    level = _best_level(slide.level_downsamples, downsample)
    level_ds = float(slide.level_downsamples[level])
    return Scale(
        level0_magnification=level0_magnification,
        mpp=mpp,
        downsample=downsample,
        patch_size=patch_size,
        patch_size_level0=patch_size_level0,
        level=level,
        level_downsample=level_ds,
        read_size=int(math.ceil(patch_size_level0 / level_ds)),
    )


def _best_level(downsamples, target: float) -> int:
    """The smallest level (largest downsample) that still has at least the target resolution."""
    best = 0
    for i, ds in enumerate(downsamples):
        if ds <= target * 1.01 and ds >= downsamples[best]:
            best = i
    return best


def _float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v > 0 and math.isfinite(v) else None


def read_patch(slide, x: int, y: int, scale: Scale) -> np.ndarray:
    """RGB uint8 (patch_size, patch_size, 3) for the patch whose level-0 top-left is (x, y); any
    part beyond the slide is white."""
    from PIL import Image

    region = slide.read_region((int(x), int(y)), scale.level, (scale.read_size, scale.read_size))
    rgb = _flatten_alpha(region)
    if rgb.size != (scale.patch_size, scale.patch_size):
        rgb = rgb.resize((scale.patch_size, scale.patch_size), Image.BILINEAR)
    return np.asarray(rgb)


def _flatten_alpha(img):
    """RGBA from OpenSlide (transparent outside the scanned area) onto white."""
    from PIL import Image

    if img.mode != "RGBA":
        return img.convert("RGB")
    if img.getextrema()[3][0] == 255:  # fully opaque: nothing to composite
        return img.convert("RGB")
    background = Image.new("RGB", img.size, (255, 255, 255))
    background.paste(img, mask=img.getchannel("A"))
    return background


def _white_background(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 RGBA -> (H, W, 3) RGB composited onto white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def read_thumbnail(slide, downsample: float, strip_pixels: int = 1 << 24) -> tuple[np.ndarray, tuple[float, float]]:
    """RGB uint8 thumbnail at ``downsample`` level-0 pixels per pixel, read from the smallest
    pyramid level that has the resolution and shrunk with area averaging, a strip of rows at a
    time (at most ``strip_pixels`` level pixels in memory). Returns it and the level-0 pixels per
    thumbnail pixel along x and y."""
    import cv2

    w, h = slide.dimensions
    tw, th = max(1, round(w / downsample)), max(1, round(h / downsample))
    level = _best_level(slide.level_downsamples, downsample)
    lw, lh = slide.level_dimensions[level]
    level_ds = float(slide.level_downsamples[level])
    rows_per_px = lh / th
    strip_rows = max(1, int(strip_pixels / max(lw, 1) / rows_per_px))  # thumbnail rows per strip
    out = np.empty((th, tw, 3), dtype=np.uint8)
    for r0 in range(0, th, strip_rows):
        r1 = min(th, r0 + strip_rows)
        y0 = int(round(r0 * rows_per_px))
        y1 = min(lh, max(int(round(r1 * rows_per_px)), y0 + 1))
        region = np.asarray(slide.read_region((0, int(y0 * level_ds)), level, (lw, y1 - y0)))
        out[r0:r1] = cv2.resize(_white_background(region), (tw, r1 - r0), interpolation=cv2.INTER_AREA)
    return out, (w / tw, h / th)


def thumbnail(slide, max_size: int = 2048):
    """(RGB PIL image, level-0 pixels per thumbnail pixel) at most ``max_size`` on its long side."""
    from PIL import Image

    w, h = slide.dimensions
    rgb, (sx, _) = read_thumbnail(slide, max(1.0, max(w, h) / max_size))
    return Image.fromarray(rgb), sx


def write_pyramidal_tiff(path: str | Path, img: np.ndarray, mpp: float, levels: int = 3) -> Path:
    """Write RGB ``img`` as a tiled, pyramidal generic TIFF that OpenSlide reads (mpp in the
    resolution tags, each level half the size of the one before). Used by the demo and tests."""
    import tifffile

    path = Path(path)
    with tifffile.TiffWriter(path) as tif:
        for i in range(levels):
            level = np.ascontiguousarray(img[:: 2**i, :: 2**i])
            res = 1e4 / (mpp * 2**i)  # pixels per centimetre
            tif.write(level, tile=(256, 256), photometric="rgb", compression="zlib",
                      compressionargs={"level": 1}, resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=1 if i else 0)
    return path
