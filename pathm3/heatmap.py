"""Attention heatmaps: where in the slide the model looked, in forms a pathologist can open.

For one bag: ``<slide_id>_scores.csv`` (x, y, score, rank per patch), ``<slide_id>.geojson``
(the patches as level-0 squares with their score, which QuPath imports as detections) and, with
the slide file, ``<slide_id>_heatmap.png`` (thumbnail + coloured overlay) and
``<slide_id>_top5.png`` (the top-k patches at the bag's magnification); for patch-folder bags
the montage comes from the patch images. Scores come from a method of :mod:`pathm3.explain`:
the aggregator's own per-patch scores (``attention``: the Q-Former's cross-attention, ABMIL's
attention, ...) or a class-specific one that explains the predicted class or ``class_name``
(e.g. one finding of a multi-label model); never an M x M matrix.
"""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pathm3.bags import Bag, read_bag, read_patch_names
from pathm3.data import check_feature_width
from pathm3.errors import DataError, UsageError
from pathm3.files import atomic_output, write_csv, write_text
from pathm3.model import PathM3
from pathm3.runtime import autocast, to_numpy


@dataclass
class BagExplanation:
    """Scores and predictions of one bag."""

    bag: Bag
    scores: np.ndarray  # (M,)
    per_query: np.ndarray | None  # (K, M)
    predicted: str  # class name (multi-label: the ;-joined findings at the model's thresholds)
    probabilities: np.ndarray  # (C,)
    caption: str | None
    method: str = "attention"  # the scoring method (pathm3.explain), "... for <class>" with a class

    @property
    def ranks(self) -> np.ndarray:
        """1 = highest score."""
        order = np.argsort(-self.scores, kind="stable")
        ranks = np.empty(len(order), dtype=np.int64)
        ranks[order] = np.arange(1, len(order) + 1)
        return ranks


# The method pathm3-heatmap uses unless --method says otherwise: the most faithful one on the
# known-truth cohorts (benchmarks/known_truth.py; README "Benchmarks").
DEFAULT_METHOD = "random_subsets"


def resolve_method(method: str | None, class_name: str | None) -> str:
    """The scoring method of a heatmap: ``method``, else the default; with ``--class`` a
    class-agnostic default gives way to ``gradient_x_input`` (a class needs class-specific scores)."""
    from pathm3.explain import CLASS_AGNOSTIC, METHODS

    if method is None:
        method = DEFAULT_METHOD if class_name is None or DEFAULT_METHOD not in CLASS_AGNOSTIC else "gradient_x_input"
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose one of {', '.join(METHODS)}")
    if class_name is not None and method in CLASS_AGNOSTIC:
        raise UsageError(f"--method {method} scores patches for no class in particular; with --class use one of "
                         f"{', '.join(m for m in METHODS if m not in CLASS_AGNOSTIC)}")
    return method


@torch.no_grad()
def explain(model: PathM3, classes: Sequence[str], bag_path: str | os.PathLike, per_query: bool = False,
            caption: bool = True, class_name: str | None = None, thresholds: np.ndarray | None = None,
            precision: str = "fp32", method: str | None = None, term: str | None = None) -> BagExplanation:
    """Patch scores (``method``, see :mod:`pathm3.explain`; class-specific ones explain
    ``class_name``, else the predicted class; or, with ``term``, that caption term's own patch
    scores), predicted class(es) and generated caption for one bag, on the model's device."""
    from pathm3.evaluate import decide
    from pathm3.explain import patch_scores, term_scores

    method = resolve_method(method, class_name) if term is None else f"term {term}"
    model.eval()
    check_feature_width([bag_path], model.cfg.feature_dim)
    bag = read_bag(bag_path, dtype="float32")
    device = next(model.parameters()).device
    feats = torch.from_numpy(bag.features)[None].to(device)  # (1, M, D)
    mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=device)
    with autocast(device, precision):
        out = model.infer(feats, mask, generate=caption)
        # the class to explain: the one asked for, else the predicted one (from this pass's logits)
        target = int(out.logits[0].argmax()) if class_name is None else list(classes).index(class_name)
        if term is not None:
            scores = term_scores(model, feats, mask, term)
        else:
            scores = out.scores if method == "attention" else patch_scores(model, feats, mask, method, target)
    per = to_numpy(out.query_scores[0]) if (per_query and out.query_scores is not None) else None
    probs = to_numpy(out.probabilities[0])
    chosen = decide(probs, model.multilabel, thresholds)
    predicted = ";".join(c for c, on in zip(classes, chosen) if on) or "none" if model.multilabel \
        else classes[int(chosen)]
    label = method if class_name is None else f"{method} for {class_name}"
    return BagExplanation(bag, to_numpy(scores[0]), per, predicted, probs,
                          out.captions[0] if out.captions else None, label)


def write_scores_csv(ex: BagExplanation, path: Path) -> Path:
    ranks = ex.ranks
    queries = range(len(ex.per_query)) if ex.per_query is not None else range(0)
    fields = ["x", "y", "score", "rank"] + [f"query_{k}" for k in queries]
    rows = ({"x": int(x), "y": int(y), "score": f"{ex.scores[i]:.8g}", "rank": int(ranks[i]),
             **{f"query_{k}": f"{ex.per_query[k, i]:.8g}" for k in queries}}
            for i, (x, y) in enumerate(ex.bag.coords))
    return write_csv(path, rows, fields)


def write_geojson(ex: BagExplanation, path: Path) -> Path:
    """A FeatureCollection of level-0 squares; QuPath: File > Import objects from file."""
    size = int(ex.bag.attrs.get("patch_size_level0") or ex.bag.attrs.get("patch_size") or 224)
    ranks = ex.ranks
    measure = f"PathM3 {ex.method.split(' for ')[0].replace('_', ' ')}"
    features = []
    for i, (x, y) in enumerate(ex.bag.coords.tolist()):
        square = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [square]},
            "properties": {"objectType": "detection", "name": f"rank {int(ranks[i])}",
                           "measurements": {measure: float(ex.scores[i]), "PathM3 rank": int(ranks[i])}},
        })
    return write_text(path, json.dumps({"type": "FeatureCollection", "features": features}))


def _title(ex: BagExplanation) -> str:
    title = f"{ex.bag.slide_id}: predicted {ex.predicted} ({ex.probabilities.max():.0%}); scores: {ex.method}"
    if ex.caption:
        title += "\n" + "\n".join(textwrap.wrap(f"“{ex.caption}”", 90))
    return title


def write_heatmap_png(ex: BagExplanation, slide_path: Path, path: Path) -> Path:
    """Slide thumbnail with the patch scores as a translucent overlay and a colorbar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from feature_extraction.slides import open_slide, thumbnail

    slide = open_slide(slide_path)
    try:
        thumb, per_px = thumbnail(slide, max_size=960)  # the figure is 960 px wide
    finally:
        slide.close()
    size = float(ex.bag.attrs.get("patch_size_level0") or 224)
    heat = np.full((thumb.size[1], thumb.size[0]), np.nan)
    lo, hi = float(ex.scores.min()), float(ex.scores.max())
    norm = (ex.scores - lo) / (hi - lo) if hi > lo else np.zeros_like(ex.scores)
    for (x, y), v in zip(ex.bag.coords, norm):
        x0, y0 = int(x / per_px), int(y / per_px)
        x1, y1 = int(np.ceil((x + size) / per_px)), int(np.ceil((y + size) / per_px))
        heat[y0:y1, x0:x1] = v
    fig, ax = plt.subplots(figsize=(8, 8 * thumb.size[1] / thumb.size[0] + 1.2), dpi=120)
    ax.imshow(thumb)
    im = ax.imshow(heat, cmap="inferno", alpha=0.55, vmin=0, vmax=1)
    cbar = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
    cbar.set_label(f"{ex.method} (min-max scaled)")
    ax.set_title(_title(ex), fontsize=9, loc="left")
    ax.axis("off")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def top_patches(ex: BagExplanation, k: int, slide_path: Path | None = None) -> list[tuple[np.ndarray, float, tuple[int, int]]]:
    """The k highest-scoring patches as RGB arrays, read from the slide at the bag's magnification or
    from the patch images of a patch-folder bag."""
    from PIL import Image

    order = np.argsort(-ex.scores, kind="stable")[:k]
    out = []
    names = read_patch_names(ex.bag.path) if ex.bag.path is not None else None
    if slide_path is None and names is None:
        raise DataError(f"{ex.bag.path}: give --slide to read the top patches (this bag has no patch image names)")
    if slide_path is not None:
        from feature_extraction.slides import open_slide, read_patch, reading_scale

        slide = open_slide(slide_path)
        ps0 = int(ex.bag.attrs.get("patch_size_level0") or 224)
        scale = reading_scale(slide, int(ex.bag.attrs.get("patch_size") or ps0), ps0)
        try:
            for i in order:
                x, y = (int(v) for v in ex.bag.coords[i])
                out.append((read_patch(slide, x, y, scale), float(ex.scores[i]), (x, y)))
        finally:
            slide.close()
    else:
        root = Path(str(ex.bag.attrs.get("slide_path", "")))
        for i in order:
            file = root / names[i]
            if not file.is_file():
                raise DataError(f"{file}: patch image not found (the bag's slide_path attribute points to {root})")
            with Image.open(file) as img:
                out.append((np.asarray(img.convert("RGB")), float(ex.scores[i]), tuple(int(v) for v in ex.bag.coords[i])))
    return out


def write_montage(ex: BagExplanation, patches, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(patches), figsize=(2.6 * len(patches), 3.4), dpi=120, squeeze=False)
    for ax, (img, score, (x, y)) in zip(axes[0], patches):
        ax.imshow(img)
        ax.set_title(f"{score:.3g}\n({x}, {y})", fontsize=8)
        ax.axis("off")
    fig.suptitle(_title(ex), fontsize=9, x=0.01, ha="left")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def check_slide(slide_path: str | os.PathLike) -> None:
    """Open and close the slide; a :class:`DataError` naming it when OpenSlide cannot read it."""
    from feature_extraction.slides import SlideError, open_slide

    if not Path(slide_path).is_file():
        raise DataError(f"{slide_path}: slide file not found")
    try:
        open_slide(slide_path).close()
    except SlideError as exc:
        raise DataError(f"{slide_path}: {exc} (give the slide file the bag was extracted from)") from None


def export(model: PathM3, classes: Sequence[str], bag_path: str | os.PathLike, out_dir: str | os.PathLike,
           slide_path: str | os.PathLike | None = None, top_k: int = 5, per_query: bool = False,
           class_name: str | None = None, thresholds: np.ndarray | None = None, precision: str = "fp32",
           method: str | None = None, term: str | None = None) -> dict[str, Path]:
    """Write every output for one bag; returns {kind: path}. The slide is opened first, so a slide
    that cannot be read leaves nothing written."""
    if slide_path is not None:
        check_slide(slide_path)
    ex = explain(model, classes, bag_path, per_query=per_query, class_name=class_name, thresholds=thresholds,
                 precision=precision, method=method, term=term)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sid = ex.bag.slide_id
    written = {"scores": write_scores_csv(ex, out / f"{sid}_scores.csv"),
               "geojson": write_geojson(ex, out / f"{sid}.geojson")}
    slide = Path(slide_path) if slide_path else None
    if slide is not None:
        written["heatmap"] = write_heatmap_png(ex, slide, out / f"{sid}_heatmap.png")
    if slide is not None or read_patch_names(ex.bag.path) is not None:
        written["top"] = write_montage(ex, top_patches(ex, top_k, slide), out / f"{sid}_top{top_k}.png")
    return written
