"""Tissue detection on a low-resolution thumbnail, and the tissue fraction of each patch.

Stained tissue is coloured and glass is grey/white, so the HSV saturation separates them: an Otsu
threshold on saturation (never below a small floor, so an all-tissue image is not split in two),
then a closing and an opening with small disks, small holes filled and specks removed.
"""

from __future__ import annotations

import numpy as np

MIN_SATURATION = 0.05


def tissue_mask(rgb: np.ndarray, min_object_fraction: float = 1e-4) -> np.ndarray:
    """Boolean (H, W) tissue mask of an RGB uint8 thumbnail."""
    from skimage import color, filters, morphology

    sat = color.rgb2hsv(rgb)[..., 1]
    if float(sat.max() - sat.min()) < 1e-6:
        return np.zeros(sat.shape, dtype=bool)
    threshold = max(float(filters.threshold_otsu(sat)), MIN_SATURATION)
    mask = sat > threshold
    radius = max(1, round(min(mask.shape) / 500))
    mask = morphology.closing(mask, morphology.disk(radius))
    mask = morphology.opening(mask, morphology.disk(radius))
    min_size = max(4, int(min_object_fraction * mask.size))
    mask = morphology.remove_small_holes(mask, max_size=min_size)
    mask = morphology.remove_small_objects(mask, max_size=min_size)
    return mask


def patch_tissue_fraction(mask: np.ndarray, coords: np.ndarray, patch_size_level0: int, level0_per_px: float) -> np.ndarray:
    """Fraction of tissue under each patch (N,), from the thumbnail mask by an integral image."""
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.float64)
    integral[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    x0 = np.clip(np.floor(coords[:, 0] / level0_per_px).astype(int), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / level0_per_px).astype(int), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + patch_size_level0) / level0_per_px).astype(int), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + patch_size_level0) / level0_per_px).astype(int), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / area


def grid(width: int, height: int, patch_size_level0: int) -> np.ndarray:
    """Top-left level-0 coords (N, 2) of non-overlapping patches that lie wholly inside the slide."""
    xs = np.arange(0, width - patch_size_level0 + 1, patch_size_level0)
    ys = np.arange(0, height - patch_size_level0 + 1, patch_size_level0)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.int64)
