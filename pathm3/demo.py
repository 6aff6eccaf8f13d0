"""``pathm3-demo``: the whole PathM3 pipeline on an embedded synthetic cohort, offline, on CPU.

1. Draws a small cohort of pyramidal TIFF slides: pink tissue with scattered nuclei on glass;
   adenocarcinoma slides also hold a few regions of crowded, dark, atypical nuclei. Each slide
   has a caption that describes it.
2. ``pathm3-extract`` with the ``tiny-vit`` encoder -> one HDF5 bag per slide.
3. ``pathm3-train`` with ``configs/demo.yaml`` -> checkpoints; the test split is evaluated.
4. ``pathm3-predict`` and ``pathm3-heatmap`` on the test slides.

Every model here is small and randomly initialised; the point is to show the pipeline working end
to end, not pathology. The README says how to run it on real slides with real weights.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from pathm3.errors import ArgumentParser, UsageError, add_debug_flag, number, run_cli
from pathm3.synthetic import CAPTIONS, CLASSES

REPO = Path(__file__).resolve().parents[1]
CELL = 224  # one 20x patch
GLASS = np.array([238, 236, 240])
STROMA = np.array([236, 166, 200])
NUCLEUS = np.array([118, 70, 160])
TUMOUR = np.array([72, 36, 110])


def draw_slide(label: int, rng: np.random.Generator, cells: int = 7) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """An RGB slide of ``cells`` x ``cells`` patches: tissue ellipse, nuclei, and (label 1) tumour regions.

    Returns the image and the (col, row) cells of the tumour regions."""
    import cv2

    size = cells * CELL
    noise = lambda n, sd: rng.standard_normal((n, 3), dtype=np.float32) * sd  # noqa: E731
    img = (GLASS + noise(size * size, 3)).reshape(size, size, 3)
    yy, xx = np.ogrid[0:size, 0:size]
    cy, cx = size / 2 + rng.uniform(-CELL, CELL, 2)
    ry, rx = size * rng.uniform(0.34, 0.44, 2)
    tissue = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    img[tissue] = STROMA + noise(int(tissue.sum()), 10)
    img = np.clip(img, 0, 255).astype(np.uint8)

    def blob(y: float, x: float, ry: float, rx: float, angle: float, colour: np.ndarray) -> None:
        # a filled ellipse at sub-pixel precision (OpenCV's fixed point: 4 fractional bits)
        centre, axes = (round(x * 16), round(y * 16)), (round(rx * 16), round(ry * 16))
        cv2.ellipse(img, centre, axes, angle, 0, 360, colour.tolist(), thickness=-1, shift=4)

    for _ in range(int(tissue.sum() / 900)):  # scattered normal nuclei
        r, c = rng.integers(0, size, 2)
        if tissue[r, c]:
            radius = rng.uniform(2.5, 4)
            blob(r, c, radius, radius, 0.0, NUCLEUS)
    regions: list[tuple[int, int]] = []
    if label == 1:
        inside = [(c, r) for r in range(cells) for c in range(cells)
                  if tissue[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL].mean() > 0.95]
        for idx in rng.choice(len(inside), size=min(3, len(inside)), replace=False):
            c, r = inside[idx]
            regions.append((c, r))
            for _ in range(260):  # crowded, large, dark, irregular nuclei
                y, x = r * CELL + rng.integers(0, CELL), c * CELL + rng.integers(0, CELL)
                blob(y, x, rng.uniform(4, 8), rng.uniform(3, 6), np.degrees(rng.uniform(0, np.pi)), TUMOUR)
    return img, regions


def _write_slide(path: Path, label: int, seed: np.random.SeedSequence) -> tuple[list[tuple[int, int]], int]:
    """Draw one slide into ``path``; returns its tumour regions and which caption it gets."""
    from feature_extraction.slides import write_pyramidal_tiff

    rng = np.random.default_rng(seed)
    img, regions = draw_slide(label, rng)
    write_pyramidal_tiff(path, img, mpp=0.5)
    return regions, int(rng.integers(3))


def write_cohort(out: Path, n_slides: int, seed: int = 0) -> dict[str, dict]:
    """Slides in ``out/slides`` with labels, captions and a stratified 60/20/20 split.

    Slides are drawn in parallel (one process per core, at most 4), each from its own seed, so the
    cohort is the same whatever the number of processes."""
    from concurrent.futures import ProcessPoolExecutor

    (out / "slides").mkdir(parents=True, exist_ok=True)
    sids, labels = [f"demo-{i:03d}" for i in range(n_slides)], [i % 2 for i in range(n_slides)]
    paths = [out / "slides" / f"{sid}.tiff" for sid in sids]
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        drawn = list(pool.map(_write_slide, paths, labels, np.random.SeedSequence(seed).spawn(n_slides)))
    rows: dict[str, dict] = {}
    for sid, label, (regions, caption) in zip(sids, labels, drawn):
        cls = CLASSES[label]
        rows[sid] = {"slide_id": sid, "label": cls, "caption": CAPTIONS[cls][caption], "regions": regions}
    for label in (0, 1):
        same = [sid for sid, lab in zip(sids, labels) if lab == label]
        for k, sid in enumerate(same):
            n = len(same)
            rows[sid]["split"] = "train" if k < round(0.6 * n) else "val" if k < round(0.8 * n) else "test"
    return rows


def run_demo(output: str | Path = "demo_output", n_slides: int = 60, seed: int = 0, progress: bool = True) -> dict:
    """Run the whole demo; returns the test metrics and the paths written."""
    from feature_extraction.extract import ExtractionSettings, find_slides, run
    from pathm3.config import load_config
    from pathm3.evaluate import predict, write_predictions
    from pathm3.heatmap import export
    from pathm3.manifest import one_hot, read_manifest, write_manifest
    from pathm3.pretrained import load_checkpoint
    from pathm3.train import train_one

    config = REPO / "configs" / "demo.yaml"
    if not config.is_file():
        raise UsageError(f"{config}: demo config not found; run pathm3-demo from a checkout of the repository")
    out = Path(output)
    t0 = time.perf_counter()
    step = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731

    step(f"1/5 drawing {n_slides} synthetic slides -> {out / 'slides'}")
    rows = write_cohort(out, n_slides, seed)
    manifest = write_manifest(list(rows.values()), out / "manifest.csv")

    step("2/5 pathm3-extract (tiny-vit encoder, 20x, 224 px patches)")
    # workers=0: the demo's slides hold ~24 patches each, too few to pay for a reader process per slide
    settings = ExtractionSettings(encoder="tiny-vit", magnification=20, workers=0, progress=progress)
    results = run(find_slides([out / "slides"]), out / "bags", settings)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise UsageError(f"demo extraction failed for {failed[0].slide_id}: {failed[0].error}")

    step("3/5 pathm3-train --config configs/demo.yaml")
    cfg = load_config(config, [f"data.manifest={manifest}", f"data.bags_dir={out / 'bags'}",
                               f"train.output_dir={out / 'runs'}", f"train.seed={seed}"])
    run_dir = train_one(cfg, seed, progress=progress)
    metrics = json.loads((run_dir / "metrics.json").read_text())

    step("4/5 pathm3-predict on the test slides")
    model, cfg, classes = load_checkpoint(run_dir / "checkpoints" / "best.safetensors")
    test = read_manifest(manifest, out / "bags", classes, splits=["test"])
    unlabelled = [type(s)(s.slide_id, one_hot(None, len(classes)), None, s.split, s.bag_path, s.row) for s in test]
    preds = predict(model, unlabelled, classes, progress=False)
    predictions = write_predictions(preds, classes, out / "predictions.json")

    step("5/5 pathm3-heatmap on one test slide of each class")
    heatmaps = []
    for cls in classes:
        s = next(s for s in test if classes[s.label] == cls)
        written = export(model, classes, s.bag_path, out / "heatmaps", slide_path=out / "slides" / f"{s.slide_id}.tiff")
        heatmaps += list(written.values())
    step("done")
    return {"metrics": metrics, "run_dir": run_dir, "manifest": manifest, "predictions": predictions,
            "heatmaps": heatmaps, "bags": out / "bags", "slides": out / "slides", "cohort": rows,
            "seconds": time.perf_counter() - t0}


def print_report(result: dict) -> None:
    m = result["metrics"]
    cls = (m.get("classification") or {})
    cap = m.get("captioning") or {}
    acc = lambda key: f"{cls[key]['accuracy']:.3f}" if cls.get(key) else "n/a"  # noqa: E731
    val = lambda key: f"{cap[key]:.3f}" if cap.get(key) is not None else "n/a"  # noqa: E731
    print()
    print(f"PathM3 demo: test split, {m['n_slides']} slides ({result['seconds']:.0f} s in all)")
    print("| accuracy (image only) | accuracy (image + text) | BLEU-4 | METEOR | ROUGE-L | CIDEr |")
    print("|---|---|---|---|---|---|")
    print(f"| {acc('image_only')} | {acc('image_text')} | {val('bleu_4')} | {val('meteor')} | {val('rouge_l')} | {val('cider')} |")
    print()
    print("Wrote:")
    for label, key in [("slides", "slides"), ("bags + extraction.csv + previews/", "bags"), ("manifest", "manifest"),
                       ("run (config, checkpoints, metrics.csv/json, predictions.csv)", "run_dir"),
                       ("predictions", "predictions")]:
        print(f"  {label:62s} {result[key]}")
    for path in result["heatmaps"]:
        print(f"  {'heatmap output':62s} {path}")
    print()
    print("All models here are small and randomly initialised (tiny-vit encoder, tiny Q-Former and T5):")
    print("the demo shows the pipeline, not pathology. For real slides, download BLIP-2 FlanT5-XL and")
    print("the other weights listed in README.md ('Weights: which files go where'), then run")
    print("pathm3-extract --encoder eva-vit-g --weights weights/blip2-flan-t5-xl ... and")
    print("pathm3-train --config configs/pathm3_patchgastric.yaml.")


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="pathm3-demo", description=__doc__.splitlines()[0])
    p.add_argument("--output", default="demo_output", help="folder for everything the demo writes (default demo_output)")
    p.add_argument("--slides", type=number(int, 10), default=60, help="number of synthetic slides, at least 10 so that train, val and test hold both classes (default 60)")
    p.add_argument("--seed", type=number(int, 0), default=0, help="seed of the cohort and the training")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_debug_flag(p)
    args = p.parse_args(argv)
    print_report(run_demo(args.output, args.slides, args.seed, progress=not args.no_progress))
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
