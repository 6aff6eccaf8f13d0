"""pathm3-extract refuses bad input with one `error:` line (exit 2, nothing written) and turns a
bad patch image into one failed row naming the file while the other slides are done."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from feature_extraction.cli import main as extract_main
from pathm3.errors import run_cli

TINY = ["--encoder", "tiny-vit", "--workers", "0", "--no-progress"]
REFUSED = [
    # (extra arguments, text the one error line must hold)
    (["--magnification", "0"], "--magnification"),
    (["--magnification", "-20"], "--magnification"),
    (["--mpp", "0"], "--mpp"),
    (["--mpp", "-0.5"], "--mpp"),
    (["--mpp", "nan"], "--mpp"),
    (["--source-magnification", "0"], "--source-magnification"),
    (["--source-mpp", "-0.25"], "--source-mpp"),
    (["--patch-size", "0"], "--patch-size"),
    (["--patch-size", "1.5"], "--patch-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--workers", "-1"], "--workers"),
    (["--tissue-threshold", "1.5"], "--tissue-threshold"),
    (["--tissue-threshold", "-0.1"], "--tissue-threshold"),
    (["--tissue-method", "magic"], "--tissue-method"),
    (["--shard", "2/2"], "--shard"),
    (["--shard", "first"], "--shard"),
    (["--magnification", "20", "--mpp", "0.5"], "--mpp"),
    (["--patch-folder", "--slide-id-pattern", "(?P<slide_id>[a-z"], "--slide-id-pattern"),
    (["--patch-folder", "--slide-id-pattern", "^[a-z]+_"], "slide_id"),
    (["--slide-id-pattern", "^(?P<slide_id>.+)$"], "--patch-folder"),
    (["--device", "gpu0"], "--device"),
]


def _refused(argv: list[str], capsys) -> str:
    assert run_cli(extract_main, argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("extra,expected", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_bad_flags_are_one_usage_error_and_write_nothing(extra, expected, tmp_path, capsys):
    images = tmp_path / "patches"
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 60, 150)).save(images / "s1_0_0.jpg")
    inputs = [str(images)] if "--patch-folder" in extra else [str(tmp_path / "slide.svs")]
    (tmp_path / "slide.svs").write_bytes(b"")
    out = tmp_path / "out"
    line = _refused([*inputs, "--output", str(out), *TINY, *extra], capsys)
    assert expected in line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_gpu_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "slide.svs").write_bytes(b"")
    line = _refused([str(tmp_path / "slide.svs"), "--output", str(tmp_path / "out"), *TINY, "--device", "cuda"], capsys)
    assert "--device cpu" in line and not (tmp_path / "out").exists()


def test_binary_file_as_slide_list_is_one_error(tmp_path, capsys):
    listing = tmp_path / "slides.csv"
    listing.write_bytes(bytes(range(256)) * 4)
    line = _refused([str(listing), "--output", str(tmp_path / "out"), *TINY], capsys)
    assert str(listing) in line and "'path' column" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_output_that_cannot_be_a_folder_is_one_error(where, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("a regular file")
    out = blocker / "bags" if where == "under-a-file" else blocker
    (tmp_path / "slide.svs").write_bytes(b"")
    line = _refused([str(tmp_path / "slide.svs"), "--output", str(out), *TINY], capsys)
    assert f"--output {out}" in line and "is a file" in line
    assert blocker.read_text() == "a regular file"


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    cmd = [sys.executable, "-m", "feature_extraction.cli", str(tmp_path / "slide.svs"), "--output",
           str(tmp_path / "out"), "--magnification", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: pathm3-extract: argument --magnification")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_bad_patch_images_fail_their_slide_with_one_line_naming_the_file(workers, tmp_path, capsys):
    folder = tmp_path / "patches"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for sid, n in (("aaa", 3), ("bbb", 3), ("ccc", 2)):
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{sid}_{i}.jpg")
    garbage, truncated = folder / "bbb_1.jpg", folder / "ccc_1.jpg"
    garbage.write_bytes(b"this is not a JPEG" * 20)
    truncated.write_bytes(truncated.read_bytes()[:300])
    out = tmp_path / "out"
    argv = [str(folder), "--patch-folder", "--output", str(out), "--encoder", "tiny-vit", "--workers", workers,
            "--no-progress"]
    assert run_cli(extract_main, argv) == 1
    assert "Traceback" not in capsys.readouterr().err
    with open(out / "extraction.csv", newline="") as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert rows["aaa"]["status"] == "done" and (out / "aaa.h5").is_file()
    for sid, bad in (("bbb", garbage), ("ccc", truncated)):
        assert rows[sid]["status"] == "failed" and not (out / f"{sid}.h5").exists()
        error = rows[sid]["error"]
        assert error.startswith(f"{bad}: cannot read this patch image") and "\n" not in error
        assert "Traceback" not in error and "worker" not in error


def test_a_csv_listing_missing_slides_fails_them_alone(slides_dir, tmp_path):
    listing = tmp_path / "slides.csv"
    listing.write_text(f"\ufeffslide_id,path\nok,{slides_dir / 'cmu-1-small-region.svs'}\ngone,{tmp_path / 'gone.svs'}\n")
    out = tmp_path / "out"
    assert run_cli(extract_main, [str(listing), "--output", str(out), *TINY, "--no-previews"]) == 1
    with open(out / "extraction.csv", newline="") as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert rows["ok"]["status"] == "done" and rows["gone"]["status"] == "failed"
    assert "cannot open" in rows["gone"]["error"]
    assert Path(out / "ok.h5").is_file()
