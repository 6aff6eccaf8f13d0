"""Tissue detection and tiling: edge padding, fluorescence, fingerprints, previews, preparing ahead."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

import feature_extraction.runner as runner
import feature_extraction.settings as settings_module
from feature_extraction.cli import main as extract_main
from feature_extraction.encoders import load_encoder
from feature_extraction.extract import ExtractionSettings, find_slides, run
from feature_extraction.slides import open_slide, read_patch, reading_scale
from feature_extraction.slides import write_pyramidal_tiff as write_pyramid
from feature_extraction.tiling import render_preview
from pathm3.bags import inspect_bag, read_bag
from pathm3.errors import run_cli

TINY = ["--encoder", "tiny-vit", "--workers", "0", "--no-progress"]
GLASS, STAIN = (235, 235, 235), (200, 60, 150)
CELL = 224


def extract(*args) -> int:
    return run_cli(extract_main, [*map(str, args), *TINY])


def rows(out: Path) -> dict[str, dict]:
    with open(out / "extraction.csv", newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def test_tissue_at_the_right_and_bottom_edges_is_kept_in_white_padded_patches(tmp_path):
    width, height = 5 * CELL + 100, 4 * CELL + 120  # the last column / row is cut by the slide edge
    img = np.full((height, width, 3), GLASS, np.uint8)
    img[:, 5 * CELL:] = STAIN  # 100 px of tissue at the right edge
    img[4 * CELL:, :] = STAIN  # 120 px at the bottom
    slide = write_pyramid(tmp_path / "edges.tiff", img, mpp=0.5, levels=2)
    out = tmp_path / "out"
    assert extract(slide, "--output", out) == 0
    bag = read_bag(out / "edges.h5")
    expected = {(5 * CELL, r * CELL) for r in range(5)} | {(c * CELL, 4 * CELL) for c in range(6)}
    assert {tuple(c) for c in bag.coords} == expected  # a whole-patch grid would keep none of them
    padded = (bag.coords[:, 0] + CELL > width) | (bag.coords[:, 1] + CELL > height)
    assert bag.attrs["n_edge_padded"] == padded.sum() == len(expected)
    assert bag.attrs["tissue_covered"] > 0.97

    handle = open_slide(slide)
    patch = read_patch(handle, 5 * CELL, 0, reading_scale(handle, CELL, CELL))
    handle.close()
    assert (patch[:, :100] == STAIN).all() and (patch[:, 100:] == 255).all()  # beyond the slide: white


def test_fluorescence_slide_warns_and_otsu_dark_finds_its_background(slides_dir, tmp_path, capsys):
    slide = slides_dir / "slideio-test3-dapi.ndpi"
    out = tmp_path / "out"
    assert extract(slide, "--output", out, "--no-previews") == 0
    row = rows(out)["slideio-test3-dapi"]
    assert "covers 100% of the thumbnail" in row["warning"] and "--tissue-method otsu-dark" in row["warning"]
    assert "warning: slideio-test3-dapi" in capsys.readouterr().err
    everything = inspect_bag(out / "slideio-test3-dapi.h5")
    assert everything.attrs["tissue_mask_fraction"] > 0.95 and everything.attrs["warning"] == row["warning"]

    assert extract(slide, "--output", out, "--no-previews", "--tissue-method", "otsu-dark") == 0
    row = rows(out)["slideio-test3-dapi"]
    assert row["status"] == "done" and row["warning"] == ""  # a new method is a new fingerprint
    tissue = inspect_bag(out / "slideio-test3-dapi.h5")
    assert 0.3 < tissue.attrs["tissue_mask_fraction"] < 0.9 and tissue.n_patches < everything.n_patches
    assert tissue.attrs["tissue_covered"] >= 0.97


def test_fingerprint_covers_tiling_version_and_tissue_settings(monkeypatch):
    base = ExtractionSettings(encoder="tiny-vit")
    assert ExtractionSettings(encoder="tiny-vit", tissue_method="otsu-dark").fingerprint() != base.fingerprint()
    assert ExtractionSettings(encoder="tiny-vit", workers=7, batch_size=3).fingerprint() == base.fingerprint()
    folder = ExtractionSettings(encoder="tiny-vit", patch_folder=True)
    assert ExtractionSettings(encoder="tiny-vit", patch_folder=True, tissue_threshold=0.9,
                              tissue_method="otsu-dark").fingerprint() == folder.fingerprint()
    before = (base.fingerprint(), folder.fingerprint())
    monkeypatch.setattr(settings_module, "TILING_VERSION", settings_module.TILING_VERSION + 1)
    assert base.fingerprint() != before[0] and folder.fingerprint() == before[1]


def test_bags_from_an_older_tiling_are_redone(tmp_path, monkeypatch):
    img = np.full((3 * CELL, 3 * CELL, 3), GLASS, np.uint8)
    img[CELL:2 * CELL, CELL:2 * CELL] = STAIN
    slide = write_pyramid(tmp_path / "one.tiff", img, mpp=0.5, levels=1)
    out = tmp_path / "out"
    assert extract(slide, "--output", out, "--no-previews") == 0
    assert extract(slide, "--output", out, "--no-previews") == 0
    assert rows(out)["one"]["status"] == "skipped"
    monkeypatch.setattr(settings_module, "TILING_VERSION", settings_module.TILING_VERSION + 1)
    assert extract(slide, "--output", out, "--no-previews") == 0
    assert rows(out)["one"]["status"] == "done"


def test_preview_long_side_is_capped():
    thumb = np.full((3000, 4000, 3), 240, np.uint8)
    mask = np.zeros((3000, 4000), bool)
    mask[1000:2000, 1000:3000] = True
    coords = np.array([[2000, 2000], [2448, 2000]])
    img = render_preview(thumb, mask, coords, 448, (2.0, 2.0))
    assert img.shape == (1125, 1500, 3) and img.dtype == np.uint8
    assert (img != 240).any()  # outline and patches drawn


def test_next_slide_is_prepared_while_the_current_one_is_encoded(tmp_path, monkeypatch):
    folder = tmp_path / "slides"
    folder.mkdir()
    img = np.full((3 * CELL, 3 * CELL, 3), GLASS, np.uint8)
    img[CELL:2 * CELL, :] = STAIN
    for i in range(3):
        write_pyramid(folder / f"s{i}.tiff", img, mpp=0.5, levels=1)
    events: list[tuple[str, str, float]] = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            sid = args[0].slide_id if name == "prepare" else args[0].job.slide_id
            events.append((f"{name} start", sid, time.perf_counter()))
            value = fn(*args, **kwargs)
            events.append((f"{name} end", sid, time.perf_counter()))
            return value
        return wrapped

    monkeypatch.setattr(runner, "prepare", spy("prepare", runner.prepare))
    monkeypatch.setattr(runner, "finish", spy("finish", runner.finish))
    encoder = load_encoder("tiny-vit")
    fast_encode = encoder.encode
    encoder.encode = lambda patches: (time.sleep(0.5), fast_encode(patches))[1]  # a slow accelerator
    settings = ExtractionSettings(encoder="tiny-vit", workers=0, progress=False, previews=False)
    results = run(find_slides([folder]), tmp_path / "out", settings, encoder=encoder)
    assert [r.status for r in results] == ["done"] * 3
    when = {(what, sid): t for what, sid, t in events}
    for current, following in (("s0", "s1"), ("s1", "s2")):  # prepared inside the current one's encoding
        assert when[("prepare end", current)] < when[("prepare start", following)]
        assert when[("prepare end", following)] < when[("finish end", current)]


def test_thumbnail_read_in_strips_matches_one_read(slides_dir):
    from feature_extraction.slides import read_thumbnail

    handle = open_slide(slides_dir / "tcga-cr-7395-01a-01-ts1.svs")
    whole, scale = read_thumbnail(handle, 8.0)
    strips, same_scale = read_thumbnail(handle, 8.0, strip_pixels=300_000)  # ~17 strips
    handle.close()
    assert whole.shape == strips.shape == (446, 555, 3) and scale == same_scale
    assert np.abs(whole.astype(int) - strips.astype(int)).mean() < 2  # strip seams: rounding only
