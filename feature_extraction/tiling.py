"""From a tissue mask to the patches of one slide: grid, tissue fraction per patch, preview.

The grid is non-overlapping, one patch footprint (``patch_size_level0``) apart from (0, 0), and
runs to the right and bottom edges of the slide: the last column and row may reach beyond the
slide, and the part outside is read as white (OpenSlide returns transparent pixels there). Such
patches are *edge-padded*; a bag records how many in its ``coords`` attribute ``n_edge_padded``,
and a patch is padded exactly when ``x + patch_size_level0 > level0_width`` or
``y + patch_size_level0 > level0_height``. Outside the slide counts as glass in a patch's tissue
fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MASK_PX_PER_PATCH = 16  # thumbnail pixels per patch side (the mask's resolution)
THUMB_MIN_SIDE = 512  # ... but a small slide's thumbnail is at least this long (or level 0)
THUMB_MAX_SIDE = 4096  # ... and a huge slide's at most this long
PREVIEW_MAX_SIDE = 1500


@dataclass
class Tiling:
    """The kept patches of one slide and how they were chosen."""

    coords: np.ndarray  # (N, 2) int64, level-0 top-left x, y
    tissue: np.ndarray  # (N,) tissue fraction of each kept patch
    n_edge_padded: int  # kept patches that reach beyond the slide
    covered: float  # fraction of the mask's tissue inside kept patches
    mask_fraction: float  # fraction of the thumbnail that is tissue


@dataclass
class SlidePlan:
    """Everything decided about a slide before its patches are read."""

    thumb: np.ndarray  # RGB uint8 thumbnail
    mask: np.ndarray  # bool tissue mask of the thumbnail
    level0_per_px: tuple[float, float]
    tiling: Tiling
    warning: str  # one line, or ''


def plan_slide(slide, patch_size_level0: int, method: str = "saturation", threshold: float = 0.2) -> SlidePlan:
    """Thumbnail, tissue mask and kept patches of an open OpenSlide slide."""
    from feature_extraction.slides import read_thumbnail
    from feature_extraction.tissue import mask_warning, tissue_mask

    w, h = slide.dimensions
    thumb, scale = read_thumbnail(slide, thumbnail_downsample(w, h, patch_size_level0))
    mask = tissue_mask(thumb, method, px_per_patch=patch_size_level0 / scale[0])
    tiling = tile(mask, w, h, patch_size_level0, scale, threshold)
    return SlidePlan(thumb, mask, scale, tiling, mask_warning(mask, method))


def thumbnail_downsample(width: int, height: int, patch_size_level0: int) -> float:
    """Level-0 pixels per thumbnail pixel: ``MASK_PX_PER_PATCH`` pixels per patch, within the
    side limits above, never finer than level 0."""
    longest = max(width, height)
    ds = min(patch_size_level0 / MASK_PX_PER_PATCH, longest / THUMB_MIN_SIDE)
    return max(ds, longest / THUMB_MAX_SIDE, 1.0)


def grid(width: int, height: int, patch_size_level0: int) -> np.ndarray:
    """Top-left level-0 coords (N, 2) of the grid from (0, 0) that covers the slide to its right
    and bottom edges (the last column/row may reach beyond them)."""
    xs = np.arange(0, width, patch_size_level0)
    ys = np.arange(0, height, patch_size_level0)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.int64)


class TissueIntegral:
    """Tissue pixels inside level-0 rectangles, by an integral image of the thumbnail mask."""

    def __init__(self, mask: np.ndarray, level0_per_px: tuple[float, float]):
        import cv2

        self.shape = mask.shape
        self.scale = level0_per_px
        self.integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)
        self.total = float(self.integral[-1, -1])

    def count(self, coords: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(tissue pixels, thumbnail pixels) of each square patch; pixels are rounded to the
        nearest edge, so neighbouring patches share none, and area outside the thumbnail counts
        as non-tissue."""
        h, w = self.shape
        sx, sy = self.scale
        x0, x1 = np.rint(coords[:, 0] / sx).astype(np.int64), np.rint((coords[:, 0] + size) / sx).astype(np.int64)
        y0, y1 = np.rint(coords[:, 1] / sy).astype(np.int64), np.rint((coords[:, 1] + size) / sy).astype(np.int64)
        area = np.maximum((x1 - x0) * (y1 - y0), 1).astype(np.float64)
        x0, x1, y0, y1 = np.clip(x0, 0, w), np.clip(x1, 0, w), np.clip(y0, 0, h), np.clip(y1, 0, h)
        ii = self.integral
        inside = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
        return inside, area


def patch_tissue_fraction(mask: np.ndarray, coords: np.ndarray, patch_size_level0: int,
                          level0_per_px: float | tuple[float, float]) -> np.ndarray:
    """Fraction of tissue under each patch (N,), from the thumbnail mask."""
    scale = level0_per_px if isinstance(level0_per_px, tuple) else (level0_per_px, level0_per_px)
    inside, area = TissueIntegral(mask, scale).count(np.asarray(coords), patch_size_level0)
    return inside / area


def tile(mask: np.ndarray, width: int, height: int, patch_size_level0: int,
         level0_per_px: tuple[float, float], threshold: float) -> Tiling:
    """Keep the grid patches with at least ``threshold`` of tissue (and some tissue at all)."""
    tissue = TissueIntegral(mask, level0_per_px)
    coords = grid(width, height, patch_size_level0)
    inside, area = tissue.count(coords, patch_size_level0)
    keep = (inside > 0) & (inside >= threshold * area)
    coords = coords[keep]
    padded = (coords[:, 0] + patch_size_level0 > width) | (coords[:, 1] + patch_size_level0 > height)
    return Tiling(coords=coords, tissue=inside[keep] / area[keep], n_edge_padded=int(padded.sum()),
                  covered=float(inside[keep].sum()) / tissue.total if tissue.total else 0.0,
                  mask_fraction=tissue.total / max(mask.size, 1))


def render_preview(thumb: np.ndarray, mask: np.ndarray, coords: np.ndarray, patch_size_level0: int,
                   level0_per_px: tuple[float, float], max_side: int = PREVIEW_MAX_SIDE) -> np.ndarray:
    """RGB preview: the thumbnail with the tissue outline (green) and the kept patches (blue),
    at most ``max_side`` pixels on its long side."""
    import cv2

    f = min(1.0, max_side / max(thumb.shape[:2]))
    img = thumb if f == 1.0 else cv2.resize(thumb, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    img = np.ascontiguousarray(img).copy()
    small = cv2.resize(mask.astype(np.uint8), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
    width = max(1, round(max(img.shape[:2]) / 600))
    sx, sy = level0_per_px[0] / f, level0_per_px[1] / f
    for x, y in coords:
        cv2.rectangle(img, (int(x / sx), int(y / sy)),
                      (int(math.ceil((x + patch_size_level0) / sx)) - 1, int(math.ceil((y + patch_size_level0) / sy)) - 1),
                      (40, 90, 220), width)
    contours, _ = cv2.findContours(small, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, (0, 170, 0), max(2, round(max(img.shape[:2]) / 400)))
    return img
