"""pathm3-extract on real slides, synthetic pyramidal TIFFs and patch folders."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from feature_extraction.cli import main as extract_main
from feature_extraction.extract import ExtractionSettings, find_slides, run
from feature_extraction.slides import write_pyramidal_tiff as write_pyramid
from pathm3.bags import inspect_bag, read_bag, read_patch_names
from pathm3.errors import run_cli

TINY = ["--encoder", "tiny-vit", "--workers", "0", "--no-progress"]


def extract(*args) -> int:
    return run_cli(extract_main, [*map(str, args), *TINY])


def rows(out: Path) -> dict[str, dict]:
    with open(out / "extraction.csv", newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def link(slides_dir: Path, tmp: Path, *names: str) -> Path:
    d = tmp / "in"
    d.mkdir(exist_ok=True)
    for n in names:
        (d / n).symlink_to(slides_dir / n)
    return d


# ---------------------------------------------------------------------------------------------
# Real slides


def test_cmu_slide_gives_a_tissue_bag(slides_dir, tmp_path):
    assert extract(slides_dir / "cmu-1-small-region.svs", "--output", tmp_path) == 0
    bag = read_bag(tmp_path / "cmu-1-small-region.h5")
    w, h = 2220, 2967
    full_grid = (w // 224) * (h // 224)
    assert 0 < len(bag) < full_grid  # background dropped
    assert bag.features.shape[1] == 64 and bag.features.dtype == np.float16
    # every patch starts inside the slide; those reaching beyond the right/bottom edge are padded
    assert (bag.coords >= 0).all() and (bag.coords[:, 0] < w).all() and (bag.coords[:, 1] < h).all()
    padded = (bag.coords[:, 0] + 224 > w) | (bag.coords[:, 1] + 224 > h)
    assert padded.any() and bag.attrs["n_edge_padded"] == padded.sum() and bag.attrs["edge_padding"] == "white"
    assert (bag.coords % 224 == 0).all()  # one grid from (0, 0)
    assert bag.attrs["patch_size_level0"] == 224 and bag.attrs["target_magnification"] == 20
    assert bag.attrs["level0_width"] == w and abs(bag.attrs["mpp"] - 0.499) < 1e-3
    assert bag.attrs["encoder"] == "tiny-vit" and bag.attrs["tissue_covered"] >= 0.95
    with Image.open(tmp_path / "previews" / "cmu-1-small-region.png") as preview:
        assert max(preview.size) <= 1500
    row = rows(tmp_path)["cmu-1-small-region"]
    assert row["status"] == "done" and row["warning"] == ""


def test_slide_without_scale_names_the_flag_then_works_with_it(slides_dir, tmp_path, capsys):
    slide = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    assert extract(slide, "--output", tmp_path) == 1
    row = rows(tmp_path)["tcga-cr-7395-01a-01-ts1"]
    assert row["status"] == "failed" and "--source-magnification" in row["error"]
    assert "--source-magnification" in capsys.readouterr().err
    assert extract(slide, "--output", tmp_path, "--source-magnification", "20") == 0
    assert rows(tmp_path)["tcga-cr-7395-01a-01-ts1"]["status"] == "done"
    assert inspect_bag(tmp_path / "tcga-cr-7395-01a-01-ts1.h5").attrs["level0_magnification"] == 20


def test_40x_ndpi_is_read_at_20x_from_level_1(slides_dir, tmp_path):
    assert extract(slides_dir / "slideio-test3-dapi.ndpi", "--output", tmp_path, "--tissue-threshold", "0.1") == 0
    info = inspect_bag(tmp_path / "slideio-test3-dapi.h5")
    assert info.attrs["level0_magnification"] == 40 and info.attrs["target_magnification"] == 20
    assert info.attrs["patch_size_level0"] == 448 and info.attrs["read_level"] == 1
    bag = read_bag(tmp_path / "slideio-test3-dapi.h5")
    assert (bag.coords % 448 == 0).all()


def test_unusable_slides_fail_alone_and_the_run_goes_on(slides_dir, tmp_path):
    folder = link(slides_dir, tmp_path, "cmu-1-small-region.svs", "openslide-python_small.svs",
                  "pathml_small_dicom.dcm", "kidney-48-5.tif")
    out = tmp_path / "out"
    assert extract(folder, "--output", out) == 1
    r = rows(out)
    assert r["cmu-1-small-region"]["status"] == "done"
    assert "smaller than one patch" in r["openslide-python_small"]["error"]
    assert "cannot open" in r["pathml_small_dicom"]["error"]
    assert "cannot open" in r["kidney-48-5"]["error"]
    for sid in ("openslide-python_small", "pathml_small_dicom", "kidney-48-5"):
        assert r[sid]["status"] == "failed" and "\n" not in r[sid]["error"]
        assert not (out / f"{sid}.h5").exists()


def test_usage_errors_exit_2(tmp_path, capsys):
    assert extract(tmp_path / "missing.svs", "--output", tmp_path) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert extract(tmp_path, "--output", tmp_path / "o", "--shard", "3/2") == 2


# ---------------------------------------------------------------------------------------------
# Synthetic slides: exact coordinates and tissue selection


def test_synthetic_tiff_selects_exactly_the_tissue_cells(tmp_path):
    cell = 224
    img = np.full((10 * cell, 10 * cell, 3), 235, np.uint8)  # glass
    tissue_cells = [(1, 2), (3, 3), (7, 5), (8, 8)]  # (col, row)
    for c, r in tissue_cells:
        img[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = (200, 60, 150)  # stained
    img[1 * cell:2 * cell, 5 * cell:5 * cell + 34] = (200, 60, 150)  # 15% of cell (5, 1)
    slide = write_pyramid(tmp_path / "synthetic.tiff", img, mpp=0.5)

    out = tmp_path / "out"
    assert extract(slide, "--output", out) == 0  # default threshold 0.2
    coords = {tuple(c) for c in read_bag(out / "synthetic.h5").coords}
    assert coords == {(c * cell, r * cell) for c, r in tissue_cells}

    assert extract(slide, "--output", out, "--tissue-threshold", "0.1", "--overwrite") == 0
    coords = {tuple(c) for c in read_bag(out / "synthetic.h5").coords}
    assert coords == {(c * cell, r * cell) for c, r in tissue_cells + [(5, 1)]}


def test_synthetic_40x_tiff_reads_the_half_resolution_level(tmp_path):
    img = np.full((2048, 2048, 3), 235, np.uint8)
    img[448:896, 896:1344] = (180, 40, 120)  # exactly one 20x patch (448 px at 40x)
    slide = write_pyramid(tmp_path / "s40.tiff", img, mpp=0.25)
    out = tmp_path / "out"
    assert extract(slide, "--output", out) == 0
    bag = read_bag(out / "s40.h5")
    assert bag.coords.tolist() == [[896, 448]] and bag.attrs["read_level"] == 1


# ---------------------------------------------------------------------------------------------
# Patch folders (PatchGastric layout)


def _crops(slides_dir: Path, folder: Path, naming) -> dict[str, int]:
    import openslide

    folder.mkdir()
    slide = openslide.OpenSlide(str(slides_dir / "cmu-1-small-region.svs"))
    counts = {"aaa111": 3, "bbb222": 5}
    k = 0
    for sid, n in counts.items():
        for i in range(n):
            x, y = 300 * (k % 6), 600 + 300 * (k // 6)
            slide.read_region((x, y), 0, (300, 300)).convert("RGB").save(folder / f"{naming(sid, i, x, y)}.jpg")
            k += 1
    return counts


def test_patch_folder_gives_one_bag_per_slide_id(slides_dir, tmp_path):
    folder = tmp_path / "patches"
    counts = _crops(slides_dir, folder, lambda sid, i, x, y: f"{sid}_{i:04x}deadbeef")
    out = tmp_path / "out"
    assert extract(folder, "--patch-folder", "--output", out) == 0
    for sid, n in counts.items():
        bag = read_bag(out / f"{sid}.h5")
        assert len(bag) == n and bag.features.shape[1] == 64
        assert bag.attrs["patch_size"] == 300 and bag.attrs["target_magnification"] == 20
        names = read_patch_names(out / f"{sid}.h5")
        assert len(names) == n and all(name.startswith(f"{sid}_") for name in names)
        assert len({tuple(c) for c in bag.coords}) == n  # index grid: distinct cells


def test_patch_folder_coordinates_come_from_names(slides_dir, tmp_path):
    folder = tmp_path / "patches"
    _crops(slides_dir, folder, lambda sid, i, x, y: f"{sid}_{x}_{y}")
    out = tmp_path / "out"
    assert extract(folder, "--patch-folder", "--output", out) == 0
    bag = read_bag(out / "aaa111.h5")
    assert sorted(map(tuple, bag.coords.tolist())) == [(0, 600), (300, 600), (600, 600)]


# ---------------------------------------------------------------------------------------------
# Pretrained encoders load from local folders


def test_eva_vit_g_loads_a_blip2_checkpoint_and_a_vision_tower(tmp_path, slides_dir):
    import torch
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig,
                              Blip2VisionConfig, T5Config)

    from feature_extraction.encoders import load_encoder
    from pathm3.errors import MissingWeightsError

    vision = Blip2VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               image_size=56, patch_size=14)
    torch.manual_seed(0)
    blip = Blip2ForConditionalGeneration(Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                          intermediate_size=64, vocab_size=50).to_dict(),
        text_config=T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4).to_dict(),
        num_query_tokens=2))
    blip.save_pretrained(tmp_path / "blip2")
    blip.vision_model.save_pretrained(tmp_path / "vision-only")

    patches = torch.randint(0, 256, (3, 70, 70, 3), dtype=torch.uint8)
    reference = None
    for folder in ("blip2", "vision-only"):
        enc = load_encoder("eva-vit-g", str(tmp_path / folder))
        assert enc.dim == 48 and enc.input_size == 56
        feats = enc.encode(patches)
        if reference is None:
            x = torch.nn.functional.interpolate(patches.permute(0, 3, 1, 2).float() / 255, size=(56, 56),
                                                mode="bilinear", antialias=True, align_corners=False)
            mean = torch.tensor(enc.mean).view(1, 3, 1, 1)
            std = torch.tensor(enc.std).view(1, 3, 1, 1)
            with torch.no_grad():
                reference = blip.vision_model.eval()(pixel_values=(x - mean) / std).pooler_output
        torch.testing.assert_close(feats, reference)

    with pytest.raises(MissingWeightsError, match="Salesforce/blip2-flan-t5-xl"):
        load_encoder("eva-vit-g", None)
    assert run_cli(extract_main, [str(slides_dir / "cmu-1-small-region.svs"), "--output", str(tmp_path / "o"),
                                  "--encoder", "eva-vit-g", "--weights", str(tmp_path / "nothing")]) == 2
    assert run_cli(extract_main, [str(slides_dir / "cmu-1-small-region.svs"), "--output", str(tmp_path / "o"),
                                  "--encoder", "eva-vit-g", "--weights", str(tmp_path / "blip2"), "--workers", "0",
                                  "--no-progress"]) == 0
    assert inspect_bag(tmp_path / "o" / "cmu-1-small-region.h5").feature_dim == 48


# ---------------------------------------------------------------------------------------------
# Resume and kill -9


def _features(out: Path) -> dict[str, np.ndarray]:
    return {p.stem: read_bag(p).features for p in sorted(out.glob("*.h5"))}


def test_rerun_skips_current_bags_and_redoes_changed_settings(slides_dir, tmp_path):
    folder = link(slides_dir, tmp_path, "cmu-1-small-region.svs", "slideio-test3-dapi.ndpi")
    out = tmp_path / "out"
    assert extract(folder, "--output", out) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert extract(folder, "--output", out) == 0
    assert {r["status"] for r in rows(out).values()} == {"skipped"}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == before
    assert extract(folder, "--output", out, "--patch-size", "256") == 0
    assert {r["status"] for r in rows(out).values()} == {"done"}
    assert inspect_bag(out / "cmu-1-small-region.h5").attrs["patch_size"] == 256


def test_killed_run_then_rerun_equals_an_uninterrupted_run(slides_dir, tmp_path):
    folder = link(slides_dir, tmp_path, "cmu-1-small-region.svs", "slideio-test3-dapi.ndpi",
                  "tcga-cr-7395-01a-01-ts1.svs")
    args = ["--source-magnification", "20", "--encoder", "tiny-vit", "--workers", "1", "--no-progress",
            "--batch-size", "8"]
    reference = tmp_path / "reference"
    assert run_cli(extract_main, [str(folder), "--output", str(reference), *args]) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "feature_extraction.cli", str(folder), "--output", str(out), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.h5")):  # kill after the first bag lands
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = list(out.glob("*.h5"))
    assert 1 <= len(finished) < 3, "the run should have been killed part-way"
    for bag in finished:  # anything with a final name is complete
        inspect_bag(bag)

    assert run_cli(extract_main, [str(folder), "--output", str(out), *args]) == 0
    statuses = {r["status"] for r in rows(out).values()}
    assert "skipped" in statuses and "done" in statuses
    expected, got = _features(reference), _features(out)
    assert expected.keys() == got.keys() and len(got) == 3
    for sid in expected:
        np.testing.assert_array_equal(got[sid], expected[sid])
        with h5py.File(out / f"{sid}.h5") as a, h5py.File(reference / f"{sid}.h5") as b:
            np.testing.assert_array_equal(a["coords"][()], b["coords"][()])
    assert not list(out.glob(".*.tmp-*"))


def test_sharding_splits_slides_between_runs(slides_dir, tmp_path):
    folder = link(slides_dir, tmp_path, "cmu-1-small-region.svs", "slideio-test3-dapi.ndpi")
    jobs = find_slides([folder])
    settings = ExtractionSettings(encoder="tiny-vit", workers=0, progress=False, previews=False)
    first = run(jobs, tmp_path / "out", settings, shard=(0, 2))
    second = run(jobs, tmp_path / "out", settings, shard=(1, 2))
    assert [r.slide_id for r in first] == ["cmu-1-small-region"]
    assert [r.slide_id for r in second] == ["slideio-test3-dapi"]
    assert set(rows(tmp_path / "out")) == {"cmu-1-small-region", "slideio-test3-dapi"}


def test_hf_vision_loads_any_transformers_backbone_folder(tmp_path):
    import torch
    from transformers import ViTConfig, ViTModel

    from feature_extraction.encoders import load_encoder

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=40, num_hidden_layers=1, num_attention_heads=4, intermediate_size=80,
                             image_size=32, patch_size=16))
    vit.save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}')
    enc = load_encoder("hf-vision", str(tmp_path / "vit"))
    assert (enc.dim, enc.input_size, enc.mean) == (40, 32, (0.5, 0.5, 0.5))
    patches = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    x = (patches.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        expected = vit.eval()(pixel_values=x).pooler_output
    torch.testing.assert_close(enc.encode(patches), expected)
