"""pathm3-heatmap: scores, GeoJSON, overlay and montage on a real slide and a patch folder; the
top patches of a trained model are the ones that carry the signal; M = 100k without M x M."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from feature_extraction.cli import main as extract_main
from pathm3.bags import index_grid, read_bag, write_bag
from pathm3.cli import heatmap_main
from pathm3.config import load_config
from pathm3.errors import run_cli
from conftest import fit, make_batch, tiny_config
from pathm3.pretrained import build_model, save_checkpoint
from pathm3.synthetic import signal_bags
from pathm3.text import build_word_tokenizer

REPO = Path(__file__).resolve().parents[1]


def tiny_checkpoint(path: Path, feature_dim: int = 64) -> Path:
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"model.feature_dim={feature_dim}", "train.terms.weight=0"])
    torch.manual_seed(0)
    tok = build_word_tokenizer(["benign glands", "adenocarcinoma glands"])
    return save_checkpoint(build_model(cfg, tok), path, cfg, list(cfg.data.classes), tok)


def test_real_slide_heatmap_outputs(slides_dir, tmp_path):
    slide = slides_dir / "cmu-1-small-region.svs"
    bags = tmp_path / "bags"
    assert run_cli(extract_main, [str(slide), "--output", str(bags), "--encoder", "tiny-vit", "--workers", "0",
                                  "--no-progress"]) == 0
    bag = bags / "cmu-1-small-region.h5"
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "heat"
    assert run_cli(heatmap_main, ["--checkpoint", str(ckpt), "--bag", str(bag), "--slide", str(slide),
                                  "--output", str(out), "--per-query", "--method", "attention", "--no-progress"]) == 0
    with h5py.File(bag) as f:
        coords = f["coords"][()]
    with open(out / "cmu-1-small-region_scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(coords)
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [tuple(c) for c in coords.tolist()]
    assert sorted(int(r["rank"]) for r in rows) == list(range(1, len(rows) + 1))
    assert abs(sum(float(r["score"]) for r in rows) - 1) < 1e-4  # an attention distribution over patches
    assert sum(k.startswith("query_") for k in rows[0]) == 8
    best = min(rows, key=lambda r: int(r["rank"]))
    assert float(best["score"]) == max(float(r["score"]) for r in rows)

    geo = json.loads((out / "cmu-1-small-region.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(coords)
    f0 = geo["features"][0]
    x, y = coords[0]
    assert f0["geometry"]["coordinates"][0] == [[x, y], [x + 224, y], [x + 224, y + 224], [x, y + 224], [x, y]]
    assert f0["properties"]["objectType"] == "detection"
    assert f0["properties"]["measurements"]["PathM3 attention"] == pytest.approx(float(rows[0]["score"]), rel=1e-6)

    heat = Image.open(out / "cmu-1-small-region_heatmap.png")
    top = Image.open(out / "cmu-1-small-region_top5.png")
    assert heat.size[0] > 500 and top.size[0] > 4 * top.size[1] / 2


def test_patch_folder_bag_montage_comes_from_the_images(slides_dir, tmp_path):
    import openslide

    folder = tmp_path / "patches"
    folder.mkdir()
    slide = openslide.OpenSlide(str(slides_dir / "cmu-1-small-region.svs"))
    for i in range(6):
        slide.read_region((300 * i, 900), 0, (300, 300)).convert("RGB").save(folder / f"abc123_{i:04d}.jpg")
    bags = tmp_path / "bags"
    assert run_cli(extract_main, [str(folder), "--patch-folder", "--output", str(bags), "--encoder", "tiny-vit",
                                  "--workers", "0", "--no-progress"]) == 0
    out = tmp_path / "heat"
    assert run_cli(heatmap_main, ["--checkpoint", str(tiny_checkpoint(tmp_path / "m.safetensors")),
                                  "--bag", str(bags / "abc123.h5"), "--output", str(out), "--top-k", "3",
                                  "--no-progress"]) == 0
    assert (out / "abc123_top3.png").is_file() and (out / "abc123.geojson").is_file()
    assert not (out / "abc123_heatmap.png").exists()  # no slide file, no overlay


def test_trained_model_ranks_the_signal_patches_first(tmp_path):
    train, ytr = signal_bags(100, seed=1)
    cfg = tiny_config("model.feature_dim=32", "model.captioner.type=none", "model.alpha=1.0",
                      "model.aggregator.text_input=never", classes=("a", "b"))
    torch.manual_seed(0)
    model = build_model(cfg)
    fit(model, cfg, len(train), lambda idx: make_batch(model, [train[i] for i in idx], ytr[idx]), 300)
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors", cfg, ["a", "b"])

    test, _, signal = signal_bags(8, seed=7, return_signal=True)
    relative_ranks, top_is_signal, p_at_k = [], [], []
    for i, (bag, sig) in enumerate(zip(test, signal)):
        path = write_bag(tmp_path / f"bag{i}.h5", bag.numpy(), index_grid(len(bag), 224), dtype="float32",
                         coords_attrs={"patch_size_level0": 224})
        out = tmp_path / "heat"
        assert run_cli(heatmap_main, ["--checkpoint", str(ckpt), "--bag", str(path), "--output", str(out),
                                      "--no-progress"]) == 0
        with open(out / f"bag{i}_scores.csv") as fh:
            ranks = np.array([int(r["rank"]) for r in csv.DictReader(fh)])
        top_is_signal.append(ranks[sig].min() == 1)
        p_at_k.append(float((ranks[sig] <= len(sig)).mean()))
        relative_ranks += (ranks[sig] / len(bag)).tolist()
    # One seed, 8 bags of 100-200 patches with 1-4 signal patches each (a random order: P@k ~0.015,
    # median relative rank 0.5). Measured with the default method (random_subsets): P@k 0.625, the
    # top patch a signal patch on 6 of 8 bags; integrated gradients: 0.58, 7 of 8.
    assert np.mean(p_at_k) >= 0.5, p_at_k
    assert sum(top_is_signal) >= 5, top_is_signal
    assert np.median(relative_ranks) < 0.05, relative_ranks


def test_scores_for_a_bag_of_100k_patches():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["model.feature_dim=16", "model.captioner.type=none",
                                                         "train.terms.weight=0"])
    model = build_model(cfg, build_word_tokenizer(["x"])).eval()
    feats = torch.randn(1, 100_000, 16)
    mask = torch.ones(1, 100_000, dtype=torch.bool)
    scores = model.patch_scores(feats, mask)
    assert scores.shape == (1, 100_000)
    assert torch.isfinite(scores).all() and abs(float(scores.sum()) - 1) < 1e-3


def test_demo_end_to_end_finds_the_tumour_regions(tmp_path, capsys):
    """pathm3-demo on a small cohort: every output exists, the model beats chance, and on each
    adenocarcinoma test slide the top-k patches are exactly its k drawn tumour regions."""
    from pathm3.demo import print_report, run_demo

    result = run_demo(tmp_path / "demo", n_slides=40, progress=False)
    print_report(result)
    report = capsys.readouterr().out
    assert "accuracy (image only)" in report and "randomly initialised" in report
    m = result["metrics"]
    assert m["classification"]["image_only"]["accuracy"] >= 0.75
    assert m["captioning"]["bleu_4"] > 0.1
    assert all(Path(p).is_file() for p in result["heatmaps"]) and len(result["heatmaps"]) == 8
    predictions = json.loads(Path(result["predictions"]).read_text())
    assert len(predictions) == m["n_slides"] and all(p["caption_pred"] for p in predictions)

    model_ckpt = result["run_dir"] / "checkpoints" / "best.safetensors"
    tumour = [r for r in result["cohort"].values() if r["split"] == "test" and r["regions"]]
    assert tumour
    for row in tumour:
        out = tmp_path / "heat"
        assert run_cli(heatmap_main, ["--checkpoint", str(model_ckpt), "--bag", str(result["bags"] / f"{row['slide_id']}.h5"),
                                      "--output", str(out), "--no-progress"]) == 0
        with open(out / f"{row['slide_id']}_scores.csv") as fh:
            rows = list(csv.DictReader(fh))
        k = len(row["regions"])
        top = {(int(r["x"]) // 224, int(r["y"]) // 224) for r in rows if int(r["rank"]) <= k}
        assert top == {tuple(c) for c in row["regions"]}, row["slide_id"]


def test_every_method_writes_its_scores_and_class_specific_ones_follow_the_class(trained_run, tmp_path):
    from pathm3.explain import METHODS, patch_scores
    from pathm3.pretrained import load_checkpoint

    ckpt = trained_run / "checkpoints" / "best.safetensors"
    bag = next((trained_run.parents[2] / "cohort" / "bags").glob("*.h5"))
    model, _, classes = load_checkpoint(ckpt)
    feats = torch.from_numpy(read_bag(bag, dtype="float32").features)[None]
    mask = torch.ones(feats.shape[:2], dtype=torch.bool)
    for method in ("attention", "gradient_x_input", "occlusion"):
        assert method in METHODS
        out = tmp_path / method
        assert run_cli(heatmap_main, ["--checkpoint", str(ckpt), "--bag", str(bag), "--output", str(out),
                                      "--method", method, "--no-progress"]) == 0
        with open(next(out.glob("*_scores.csv"))) as fh:
            written = np.array([float(r["score"]) for r in csv.DictReader(fh)])
        expected = patch_scores(model, feats, mask, method)[0].numpy()
        assert np.allclose(written, expected, rtol=1e-5, atol=1e-7), method
        props = json.loads(next(out.glob("*.geojson")).read_text())["features"][0]["properties"]["measurements"]
        assert f"PathM3 {method.replace('_', ' ')}" in props
    other = tmp_path / "other"  # --class: the scores explain that class, not the predicted one
    assert run_cli(heatmap_main, ["--checkpoint", str(ckpt), "--bag", str(bag), "--output", str(other),
                                  "--class", classes[1], "--method", "gradient_x_input", "--no-progress"]) == 0
    with open(next(other.glob("*_scores.csv"))) as fh:
        for_1 = np.array([float(r["score"]) for r in csv.DictReader(fh)])
    assert np.allclose(for_1, patch_scores(model, feats, mask, "gradient_x_input", 1)[0].numpy(), rtol=1e-5, atol=1e-7)


def test_term_heatmap_writes_the_terms_own_patch_scores(trained_run, tmp_path):
    """--term: the CSV's score is that caption term's per-patch score (demo.yaml scores terms on the
    patches); a word that is not a term, or --term with --method, is refused."""
    from pathm3.explain import term_scores
    from pathm3.pretrained import load_checkpoint

    ckpt = trained_run / "checkpoints" / "best.safetensors"
    bag = next((trained_run.parents[2] / "cohort" / "bags").glob("*.h5"))
    model, _, _ = load_checkpoint(ckpt)
    term = model.terms.cfg.terms[0]
    assert run_cli(heatmap_main, ["--checkpoint", str(ckpt), "--bag", str(bag), "--output", str(tmp_path / "t"),
                                  "--term", term, "--no-progress"]) == 0
    with open(next((tmp_path / "t").glob("*_scores.csv"))) as fh:
        written = np.array([float(r["score"]) for r in csv.DictReader(fh)])
    feats = torch.from_numpy(read_bag(bag, dtype="float32").features)[None]
    expected = term_scores(model, feats, torch.ones(feats.shape[:2], dtype=torch.bool), term)[0].numpy()
    assert np.allclose(written, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(written, written[0])  # patches differ
    props = json.loads(next((tmp_path / "t").glob("*.geojson")).read_text())["features"][0]["properties"]
    assert f"PathM3 term {term}" in props["measurements"]
    for extra in (["--term", "no-such-word"], ["--term", term, "--method", "attention"]):
        assert run_cli(heatmap_main, ["--checkpoint", str(ckpt), "--bag", str(bag), "--output",
                                      str(tmp_path / "bad"), "--no-progress", *extra]) == 2
        assert not (tmp_path / "bad").exists()
