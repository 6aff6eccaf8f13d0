"""Distributed training on CPU: pathm3-train with two DDP processes (gloo), end to end."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO
from pathm3.manifest import read_manifest
from pathm3.synthetic import write_cohort


def test_two_process_ddp_trains_evaluates_once_and_steps_as_the_math_says(tmp_path, trained_run):
    write_cohort(tmp_path / "cohort", n_slides=40, dim=64, seed=0)
    epochs, batch, world = 2, 8, 2
    cmd = [str(Path(sys.executable).parent / "pathm3-train"), "--config", str(REPO / "configs" / "demo.yaml"),
           "--no-progress", "--set", f"data.manifest={tmp_path / 'cohort' / 'manifest.csv'}",
           "--set", f"data.bags_dir={tmp_path / 'cohort' / 'bags'}", "--set", f"train.output_dir={tmp_path / 'runs'}",
           "--set", f"train.max_epochs={epochs}", "--set", f"train.batch_size={batch}",
           "--set", f"train.devices={world}", "--set", "train.strategy=ddp", "--set", "train.accelerator=cpu",
           "--set", "train.warmup_steps=0", "--set", "train.lr=0.001", "--set", "train.min_lr=0",
           "--set", "eval.num_beams=1", "--set", "eval.max_new_tokens=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Without unused-parameter detection this deadlocked: a caption dropped on one rank leaves the
    # Q-Former's text path without gradients there, and the ranks wait on different all-reduces.
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run: ") == 1  # only rank 0 reports and evaluates

    run = tmp_path / "runs" / "demo" / "seed0"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.safetensors", "last.ckpt",
                                                                        "last.safetensors"]
    metrics = json.loads((run / "metrics.json").read_text())
    single = json.loads((trained_run / "metrics.json").read_text())
    assert set(metrics) == set(single)
    assert set(metrics["classification"]["image_only"]) == set(single["classification"]["image_only"])
    assert set(metrics["captioning"]) == set(single["captioning"])

    n_train = len(read_manifest(tmp_path / "cohort" / "manifest.csv", tmp_path / "cohort" / "bags", ["benign",
                                "adenocarcinoma"], splits=["train"]))
    per_epoch = math.ceil(n_train / (batch * world))  # each rank sees its half of the slides
    with open(run / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/loss")]
    assert dict(Counter(int(r["epoch"]) for r in rows)) == {e: per_epoch for e in range(epochs)}
    # The cosine spans the run's real optimizer steps (Lightning's estimated_stepping_batches), not
    # len(loader) * epochs, which ignores the world size and would stop halfway down the curve.
    total = per_epoch * epochs
    expected = [0.001 * 0.5 * (1 + math.cos(math.pi * step / total)) for step in range(total)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-5)
