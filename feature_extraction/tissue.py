"""Tissue detection on a low-resolution thumbnail (OpenCV, uint8 throughout).

Two methods, chosen with ``--tissue-method``:

* ``saturation`` (default, brightfield H&E/IHC): stained tissue is coloured and glass is
  grey/white, so the HSV saturation separates them. Median-blurred saturation, an Otsu threshold
  clamped to [13, 30] of 255 (the floor keeps an all-tissue or all-glass image from being split by
  noise; the cap keeps pale stroma and thin margins that Otsu alone would drop).
* ``otsu-dark`` (fluorescence, dark background): stained nuclei are bright on black, so an Otsu
  threshold on the brightest channel finds them, and tissue is where a patch-sized window around a
  pixel is at least 5% nuclei (DAPI shows nuclei only, not the tissue between them).

Both then close small gaps, open away specks, fill holes smaller than one patch and drop objects
smaller than an eighth of a patch. Kernel sizes are in patch units (``px_per_patch`` thumbnail
pixels per patch side), so the mask looks the same at any thumbnail resolution.
"""

from __future__ import annotations

import numpy as np

TISSUE_METHODS = ("saturation", "otsu-dark")
SATURATION_RANGE = (13, 30)  # bounds of the Otsu threshold on saturation (0-255)
MIN_BRIGHTNESS = 10  # floor of the Otsu threshold on brightness (0-255) for otsu-dark
MIN_NUCLEI_DENSITY = 0.05  # otsu-dark: bright fraction of a patch-sized window that makes it tissue
FULL_MASK_WARNING = 0.95  # a mask covering more of the thumbnail than this gets a warning


def tissue_mask(rgb: np.ndarray, method: str = "saturation", px_per_patch: float = 16.0) -> np.ndarray:
    """Boolean (H, W) tissue mask of an RGB uint8 thumbnail."""
    import cv2

    if method not in TISSUE_METHODS:
        raise ValueError(f"unknown tissue method {method!r}; choose one of {', '.join(TISSUE_METHODS)}")
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if method == "saturation":
        channel, bounds = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1], SATURATION_RANGE
    else:
        channel, bounds = rgb.max(axis=2), (MIN_BRIGHTNESS, 255)
    channel = cv2.medianBlur(channel, _odd(min(px_per_patch / 8, 5)))
    if int(channel.max()) - int(channel.min()) < 2:
        return np.zeros(channel.shape, dtype=bool)
    otsu = cv2.threshold(channel, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0]
    mask = (channel > min(max(otsu, bounds[0]), bounds[1])).astype(np.uint8)
    if method == "otsu-dark":  # nuclei -> tissue: where a patch-sized window holds enough of them
        window = _odd(px_per_patch)
        mask = (cv2.blur(mask.astype(np.float32), (window, window)) > MIN_NUCLEI_DENSITY).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disk(px_per_patch / 3))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disk(px_per_patch / 32))
    area = px_per_patch**2
    mask = _fill_small_holes(mask, max_area=area)
    return _remove_small_objects(mask, min_area=area / 8)


def mask_warning(mask: np.ndarray, method: str) -> str:
    """A one-line warning for masks that are probably wrong, or '' when the mask looks plausible."""
    covered = float(mask.mean()) if mask.size else 0.0
    if covered <= FULL_MASK_WARNING:
        return ""
    hint = ("a fluorescence or dark-background slide? try --tissue-method otsu-dark" if method == "saturation"
            else "no background found; check the slide or use --tissue-method saturation")
    return f"tissue mask covers {covered:.0%} of the thumbnail ({hint})"


def _odd(size: float) -> int:
    return max(3, int(round(size)) | 1)


def _disk(radius: float) -> np.ndarray:
    import cv2

    r = max(1, int(round(radius)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """Set background components smaller than ``max_area`` that do not touch the border."""
    import cv2

    background = (mask == 0).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
    x, y, w, h, area = (stats[:, i] for i in range(5))
    inner = (x > 0) & (y > 0) & (x + w < mask.shape[1]) & (y + h < mask.shape[0])
    fill = inner & (area <= max_area)
    fill[0] = False  # label 0 is the tissue itself
    return (mask.astype(bool) | fill[labels]).astype(np.uint8)


def _remove_small_objects(mask: np.ndarray, min_area: float) -> np.ndarray:
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False
    return keep[labels]
