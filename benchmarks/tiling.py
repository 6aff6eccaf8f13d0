"""Tissue detection + tiling per slide: this project's pipeline beside a CLAM-style reference.

    python benchmarks/tiling.py                 # the shared real slides + a synthetic 8880x11868 TIFF
    python benchmarks/tiling.py --runs 7 --no-large

For each slide, in one process, each method runs ``--runs`` times (median seconds reported):
open the slide (with a fresh OpenSlide tile cache, so no run reuses another's decoded tiles), find
tissue on a low-resolution image, and list the kept patches (224 px at 20x). No encoder, no files.

Coverage, for each method against its own tissue mask (and against the other method's mask):
the fraction of mask pixels inside kept patches, and the mean tissue fraction of a kept patch.

The CLAM-style reference is written here from the description of CLAM's tissue segmentation and
patching (Lu et al. 2021, Methods, and the CLAM README's default presets), not from its code:
the slide level closest to a 64x downsample; HSV saturation, median blur (7), binary threshold
(8 of 255); morphological closing (4 x 4); outer contours and their holes; a contour is kept when
its area minus its holes exceeds ``a_t`` reference areas (a 512 x 512 patch at level 0, scaled to
the segmentation level), and its holes are the 8 largest of at least 16 reference areas; then a
grid (patch = step) over each kept contour's bounding box, keeping a patch when any of 4 points a
quarter patch from its centre lies in the contour and its centre is not in a hole. One deviation:
``a_t`` is 1 here, not the README's default of 100, which would discard all tissue on these small
test slides (the whole CMU crop holds about 25 reference areas); ``--clam-a-t`` changes it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SLIDES = REPO.parent / "shared" / "data" / "slides"
# (file, level-0 magnification to assume when the metadata has none, tissue method)
REAL = [("cmu-1-small-region.svs", None, "saturation"), ("tcga-cr-7395-01a-01-ts1.svs", 20, "saturation"),
        ("slideio-test3-dapi.ndpi", None, "saturation"), ("slideio-test3-dapi.ndpi", None, "otsu-dark")]


@dataclass
class Result:
    """Kept patches of one method, and the mask they were chosen from."""

    coords: np.ndarray  # (N, 2) level-0 top-left
    mask: np.ndarray  # bool tissue mask
    scale: tuple[float, float]  # level-0 pixels per mask pixel (x, y)


def open_fresh(path: Path):
    """An OpenSlide handle with its own empty tile cache."""
    import openslide

    slide = openslide.OpenSlide(str(path))
    slide.set_cache(openslide.OpenSlideCache(64 << 20))
    return slide


def patch_footprint(slide, source_mag: float | None) -> int:
    from feature_extraction.slides import resolve_scale

    return resolve_scale(slide, patch_size=224, magnification=20, source_magnification=source_mag).patch_size_level0


def ours(path: Path, source_mag: float | None, method: str, threshold: float) -> Result:
    from feature_extraction.tiling import plan_slide

    slide = open_fresh(path)
    plan = plan_slide(slide, patch_footprint(slide, source_mag), method, threshold)
    slide.close()
    return Result(plan.tiling.coords, plan.mask, plan.level0_per_px)


# ---------------------------------------------------------------------------------------------
# CLAM-style reference


CLAM_A_T = 1.0


def clam_style(path: Path, source_mag: float | None, *_ignored) -> Result:
    import cv2

    slide = open_fresh(path)
    ps0 = patch_footprint(slide, source_mag)
    level = slide.get_best_level_for_downsample(64)
    ds = float(slide.level_downsamples[level])
    rgb = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
    saturation = cv2.medianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1], 7)
    binary = cv2.morphologyEx((saturation > 8).astype(np.uint8), cv2.MORPH_CLOSE, np.ones((4, 4), np.uint8))
    tissue, holes = _filtered_contours(binary, ds, a_t=CLAM_A_T)
    width, height = slide.dimensions
    slide.close()
    coords = []
    for contour, contour_holes in zip(tissue, holes):
        coords += _contour_patches(contour * ds, [h * ds for h in contour_holes], ps0)
    mask = np.zeros(binary.shape, np.uint8)
    for contour, contour_holes in zip(tissue, holes):
        cv2.drawContours(mask, [contour], -1, 1, thickness=cv2.FILLED)
        cv2.drawContours(mask, contour_holes, -1, 0, thickness=cv2.FILLED)
    scale = (width / binary.shape[1], height / binary.shape[0])
    return Result(np.asarray(coords, dtype=np.int64).reshape(-1, 2), mask.astype(bool), scale)


def _filtered_contours(binary: np.ndarray, ds: float, ref_patch: int = 512, a_t: float = 100,
                       a_h: float = 16, max_holes: int = 8):
    """Foreground contours whose tissue area (minus holes) passes the area filter, and their holes."""
    import cv2

    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return [], []
    hierarchy = hierarchy[0]
    ref_area = ref_patch**2 / (ds * ds)  # one reference patch, in pixels of this level
    tissue, holes = [], []
    for i, (_, _, _, parent) in enumerate(hierarchy):
        if parent != -1:
            continue
        kids = [contours[j] for j in range(len(contours)) if hierarchy[j][3] == i]
        kids = sorted(kids, key=cv2.contourArea, reverse=True)[:max_holes]
        kids = [k for k in kids if cv2.contourArea(k) > a_h * ref_area]
        area = cv2.contourArea(contours[i]) - sum(cv2.contourArea(k) for k in kids)
        if area > 0 and area > a_t * ref_area:
            tissue.append(contours[i])
            holes.append(kids)
    return tissue, holes


def _contour_patches(contour: np.ndarray, holes: list[np.ndarray], ps0: int) -> list[tuple[int, int]]:
    """Grid over the contour's bounding box; the 4-point test and the centre-not-in-a-hole test."""
    import cv2

    contour = contour.astype(np.float32)
    holes = [h.astype(np.float32) for h in holes]
    x, y, w, h = cv2.boundingRect(contour.astype(np.int32))
    shift = ps0 // 4
    kept = []
    for py in range(y, y + h, ps0):
        for px in range(x, x + w, ps0):
            cx, cy = px + ps0 // 2, py + ps0 // 2
            points = ((cx - shift, cy - shift), (cx + shift, cy + shift), (cx + shift, cy - shift), (cx - shift, cy + shift))
            if not any(cv2.pointPolygonTest(contour, (float(a), float(b)), False) >= 0 for a, b in points):
                continue
            if any(cv2.pointPolygonTest(hole, (float(cx), float(cy)), False) > 0 for hole in holes):
                continue
            kept.append((px, py))
    return kept


# ---------------------------------------------------------------------------------------------
# Measuring


def coverage(result: Result, mask: np.ndarray, scale: tuple[float, float], ps0: int) -> tuple[float, float]:
    """(fraction of ``mask`` inside the union of kept patches, mean tissue fraction per patch)."""
    from feature_extraction.tiling import patch_tissue_fraction

    if len(result.coords) == 0 or not mask.any():
        return 0.0, 0.0
    painted = np.zeros(mask.shape, bool)
    sx, sy = scale
    for x, y in result.coords:
        painted[int(round(y / sy)):int(round((y + ps0) / sy)), int(round(x / sx)):int(round((x + ps0) / sx))] = True
    covered = float((painted & mask).sum() / mask.sum())
    return covered, float(patch_tissue_fraction(mask, result.coords, ps0, scale).mean())


def timed(fn, *args, runs: int) -> tuple[float, Result]:
    seconds, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn(*args)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), result


def large_tiff(folder: Path) -> Path:
    """CMU-1's small region tiled 4 x 4: an 8880 x 11868 pyramidal TIFF (3 levels) of real tissue."""
    from feature_extraction.slides import open_slide, write_pyramidal_tiff

    slide = open_slide(SLIDES / "cmu-1-small-region.svs")
    tile = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    slide.close()
    return write_pyramidal_tiff(folder / "cmu-4x4-8880x11868.tiff", np.tile(tile, (4, 4, 1)), mpp=0.499, levels=3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs per slide and method (median reported)")
    p.add_argument("--threshold", type=float, default=0.2, help="our --tissue-threshold")
    p.add_argument("--no-large", action="store_true", help="skip the synthetic 8880x11868 TIFF")
    p.add_argument("--clam-a-t", type=float, default=CLAM_A_T, help="CLAM-style tissue area filter (reference areas)")
    args = p.parse_args(argv)
    globals()["CLAM_A_T"] = args.clam_a_t

    with tempfile.TemporaryDirectory() as tmp:
        cases = [(SLIDES / f, mag, method) for f, mag, method in REAL]
        if not args.no_large:
            cases.append((large_tiff(Path(tmp)), None, "saturation"))
        timing, cover = [], []
        for path, mag, method in cases:
            slide = open_fresh(path)
            ps0 = patch_footprint(slide, mag)
            size = "x".join(map(str, slide.dimensions))
            slide.close()
            ours_s, mine = timed(ours, path, mag, method, args.threshold, runs=args.runs)
            clam_s, ref = timed(clam_style, path, mag, runs=args.runs)
            name = f"{path.name} ({size})" + (f", {method}" if method != "saturation" else "")
            timing.append(f"| {name} | {ours_s:.3f} | {clam_s:.3f} | {clam_s / ours_s:.1f}x |")
            for label, res, other in (("ours", mine, ref), ("CLAM-style", ref, mine)):
                own_cov, own_tissue = coverage(res, res.mask, res.scale, ps0)
                other_cov, _ = coverage(res, other.mask, other.scale, ps0)
                cover.append(f"| {name} | {label} | {len(res.coords)} | {res.mask.mean():.1%} | {own_cov:.3f} | "
                             f"{own_tissue:.3f} | {other_cov:.3f} |")
    print(f"Tissue + tiling per slide, median of {args.runs} runs in one process (seconds)\n")
    print("| slide | ours | CLAM-style | ours faster by |\n|---|---|---|---|")
    print("\n".join(timing))
    print("\nCoverage (224 px patches at 20x; 'own' = the method's own mask, 'other' = the other method's)\n")
    print("| slide | method | patches | mask of thumbnail | tissue covered (own) | tissue per patch (own) "
          "| tissue covered (other) |\n|---|---|---|---|---|---|---|")
    print("\n".join(cover))
    return 0


if __name__ == "__main__":
    sys.exit(main())
