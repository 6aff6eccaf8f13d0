"""Several processes on one output folder: torchrun ranks (disjoint shards) and plain runs started
together (per-slide claims): every slide is encoded once and extraction.csv holds every slide."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from feature_extraction.slides import write_pyramidal_tiff
from pathm3.bags import inspect_bag

TORCHRUN = Path(sys.executable).with_name("torchrun")
ARGS = ["--encoder", "tiny-vit", "--device", "cpu", "--workers", "0", "--no-progress", "--no-previews"]


def _slides(folder: Path, n: int) -> list[str]:
    """n small pyramidal TIFFs with an ellipse of tissue (about 20 patches each)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    size = 6 * 224
    yy, xx = np.mgrid[0:size, 0:size]
    names = []
    for i in range(n):
        img = np.full((size, size, 3), 235, np.uint8)
        inside = ((yy - size / 2) / (size * 0.4)) ** 2 + ((xx - size / 2) / (size * 0.35)) ** 2 < 1
        img[inside] = (200 - 10 * i, 60, 150)
        img[inside] = np.clip(img[inside] + rng.normal(0, 12, (inside.sum(), 3)), 0, 255).astype(np.uint8)
        write_pyramidal_tiff(folder / f"slide{i}.tiff", img, mpp=0.5, levels=2)
        names.append(f"slide{i}")
    return names


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _counts(stdout: str) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m)) for m in re.findall(r"(\d+) done, (\d+) skipped, (\d+) failed", stdout)]


def _check_outputs(out: Path, names: list[str]) -> dict[str, dict]:
    with open(out / "extraction.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["slide_id"] for r in rows) == sorted(names)  # one merged CSV, one row per slide
    for name in names:
        assert inspect_bag(out / f"{name}.h5").n_patches > 0
    assert not list(out.glob(".*.tmp-*"))
    return {r["slide_id"]: r for r in rows}


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_torchrun_ranks_take_disjoint_shards_into_one_csv(tmp_path):
    names = _slides(tmp_path / "slides", 4)
    out = tmp_path / "out"
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "feature_extraction.cli",
           str(tmp_path / "slides"), "--output", str(out), *ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"shard 0/2: 2 done, 0 skipped, 0 failed", proc.stdout), proc.stdout
    assert re.search(r"shard 1/2: 2 done, 0 skipped, 0 failed", proc.stdout), proc.stdout
    rows = _check_outputs(out, names)
    assert {r["status"] for r in rows.values()} == {"done"}


def test_two_runs_started_together_encode_every_slide_once(tmp_path):
    names = _slides(tmp_path / "slides", 6)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "feature_extraction.cli", str(tmp_path / "slides"), "--output", str(out), *ARGS]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    counts = [_counts(stdout)[0] for stdout, _ in outputs]
    assert sum(done for done, _, _ in counts) == len(names)  # no slide encoded twice, none left out
    assert all(done + skipped == len(names) for done, skipped, _ in counts)
    rows = _check_outputs(out, names)
    assert {r["status"] for r in rows.values()} <= {"done", "skipped"}
    assert (out / ".extraction.claims").exists()
