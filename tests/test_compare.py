"""pathm3-compare: every aggregator trains in the same trainer on the same split, round-trips through
its checkpoint, and gets a row of the comparison table."""

from __future__ import annotations

import csv
import json

import numpy as np

from conftest import REPO
from pathm3.cli import compare_main
from pathm3.errors import run_cli
from pathm3.evaluate import predict
from pathm3.manifest import read_manifest
from pathm3.parts import AGGREGATORS
from pathm3.pretrained import load_checkpoint
from pathm3.synthetic import write_cohort


def test_every_aggregator_trains_round_trips_and_gets_a_row(tmp_path):
    write_cohort(tmp_path / "cohort", n_slides=24, dim=32, seed=0)
    out = tmp_path / "cmp"
    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--aggregators", *AGGREGATORS, "--seeds", "0",
            "--output", str(out), "--no-progress",
            "--set", f"data.manifest={tmp_path / 'cohort' / 'manifest.csv'}",
            "--set", f"data.bags_dir={tmp_path / 'cohort' / 'bags'}", "--set", "model.feature_dim=32",
            "--set", "model.mixer.hidden_dim=32", "--set", "train.max_epochs=1", "--set", "train.warmup_steps=2",
            "--set", "eval.num_beams=1", "--set", "eval.max_new_tokens=8"]
    assert run_cli(compare_main, args) == 0

    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [r["aggregator"] for r in rows] == list(AGGREGATORS)
    for r in rows:
        assert "classification.image_only.accuracy" in r["metrics"] and "captioning.bleu_4" in r["metrics"]
        assert r["trainable_parameters"] > 0 and r["seconds_per_epoch"] > 0
    table = (out / "comparison.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| ") and not line.startswith("| aggregator")]
    assert [line.split(" | ")[0][2:] for line in body] == list(AGGREGATORS)
    assert "BLEU-4" in table[2] and "±" in body[0]

    for name in AGGREGATORS:  # the checkpoint gives back the probabilities the run wrote
        run = out / name / "seed0"
        model, cfg, classes = load_checkpoint(run / "checkpoints" / "best.safetensors")
        assert model.aggregator.cfg.type == name
        assert (model.mixer.cfg.type == "nystrom") == (name == "qformer")
        assert (model.prototypes is not None) == (name == "qformer")  # the baselines as published
        test = read_manifest(cfg.data.manifest, cfg.data.bags_dir, classes, splits=["test"])
        again = {p.slide_id: p.probabilities for p in predict(model, test, classes, captions=False, progress=False)}
        with open(run / "predictions.csv") as fh:
            for row in csv.DictReader(fh):
                written = np.array([float(row[f"prob_{c}"]) for c in classes])
                np.testing.assert_allclose(again[row["slide_id"]], written, atol=2e-6)
