"""Multi-label findings: the manifest columns, the masked loss, thresholds, metrics, and a
cohort of independent findings (some unknown) that the model learns."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from conftest import REPO, make_batch, tiny_config
from pathm3.cli import eval_main, heatmap_main, train_main
from pathm3.errors import DataError, run_cli
from pathm3.manifest import read_manifest
from pathm3.metrics import multilabel_metrics, tune_thresholds
from pathm3.parts.heads import HeadConfig, MultiLabelHead
from pathm3.pretrained import build_model
from pathm3.synthetic import FINDINGS, write_multilabel_cohort


def test_unknown_entries_do_not_enter_the_loss():
    head = MultiLabelHead(HeadConfig(dropout=0.0), 8, 3)
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.tensor([[1, 0, math.nan], [math.nan, math.nan, math.nan], [0, 1, 1], [math.nan, 0, 1]])
    loss = head.loss(logits, targets)
    loss.backward()
    unknown = torch.isnan(targets)
    assert torch.all(logits.grad[unknown] == 0) and torch.all(logits.grad[~unknown] != 0)
    for fill in (0.0, 1.0):  # whatever an unknown entry would have said, the loss is the same
        other = head.loss(logits.detach(), targets.nan_to_num(fill))
        assert not torch.isclose(other, loss.detach())  # (the entries would matter if they were used)
    known = ~unknown
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits.detach()[known], targets[known])
    torch.testing.assert_close(loss.detach(), expected)


def test_unknown_entries_do_not_enter_the_whole_models_loss():
    cfg = tiny_config("data.multilabel=true", "model.feature_dim=16", "model.captioner.type=none",
                      "model.alpha=1.0", "model.aggregator.text_input=never", "model.head.dropout=0",
                      "model.patch_dropout=0", "model.aggregator.dropout=0", "model.mixer.dropout=0",
                      classes=FINDINGS)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(0)
    bags = [torch.randn(n, 16, generator=g) for n in (20, 33)]
    targets = torch.tensor([[1.0, math.nan, 0.0], [math.nan, 1.0, math.nan]])
    out = model(make_batch(model, bags, targets))  # no dropout anywhere: deterministic
    known = ~torch.isnan(targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits.detach()[known], targets[known])
    torch.testing.assert_close(out.loss_cls, expected)


def test_manifest_columns_and_bad_values(tmp_path):
    bags = tmp_path / "bags"
    bags.mkdir()
    for sid in ("a", "b"):
        (bags / f"{sid}.h5").write_bytes(b"")
    path = tmp_path / "m.csv"
    path.write_text("slide_id,x,y,caption,split\na,1,,some text,train\nb,0,1,,test\n")
    rows = read_manifest(path, bags, ["x", "y"], multilabel=True)
    assert rows[0].targets[0] == 1.0 and math.isnan(rows[0].targets[1]) and rows[1].targets == (0.0, 1.0)
    path.write_text("slide_id,x,y,caption,split\na,yes,,,train\n")
    with pytest.raises(DataError, match=r"row 2 \(a\): column 'x' must be 1, 0 or empty"):
        read_manifest(path, bags, ["x", "y"], multilabel=True)
    path.write_text("slide_id,x,caption,split\na,1,,train\n")
    with pytest.raises(DataError, match="missing column.*y"):
        read_manifest(path, bags, ["x", "y"], multilabel=True)


def test_metrics_and_tuned_thresholds_use_known_entries_only():
    targets = np.array([[1, 0], [0, np.nan], [1, 1], [0, 0]], dtype=float)
    probs = np.array([[0.9, 0.2], [0.1, 0.9], [0.8, 0.7], [0.3, 0.1]])
    m = multilabel_metrics(targets, probs, ["a", "b"])
    assert m["micro_f1"] == 1.0 and m["hamming_loss"] == 0.0 and m["subset_accuracy"] == 1.0
    assert set(m["per_class"]["b"]) == {"precision", "recall", "f1", "auroc"} and m["macro_auroc"] == 1.0
    shifted = tune_thresholds(targets, probs * 0.5)  # every probability below 0.5: the tuned cut adapts
    assert multilabel_metrics(targets, probs * 0.5, ["a", "b"], shifted)["micro_f1"] == 1.0
    assert multilabel_metrics(targets, probs * 0.5, ["a", "b"])["micro_f1"] < 1.0


def test_multilabel_cohort_trains_to_micro_f1_and_writes_every_key(tmp_path):
    write_multilabel_cohort(tmp_path / "cohort", n_slides=200, dim=32, seed=0)
    classes = "[" + ",".join(FINDINGS) + "]"
    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--no-progress",
            "--set", f"data.manifest={tmp_path / 'cohort' / 'manifest.csv'}",
            "--set", f"data.bags_dir={tmp_path / 'cohort' / 'bags'}", "--set", "data.multilabel=true",
            "--set", f"data.classes={classes}", "--set", "model.feature_dim=32", "--set", "model.mixer.hidden_dim=32",
            "--set", "train.task=classification", "--set", "model.aggregator.text_input=never",
            "--set", f"train.output_dir={tmp_path / 'runs'}", "--set", "train.max_epochs=30"]
    assert run_cli(train_main, args) == 0
    run = tmp_path / "runs" / "demo" / "seed0"
    m = json.loads((run / "metrics.json").read_text())["classification"]["image_only"]
    assert set(m) == {"micro_f1", "macro_f1", "hamming_loss", "subset_accuracy", "macro_auroc", "per_class"}
    assert set(m["per_class"]) == set(FINDINGS)
    assert m["micro_f1"] >= 0.9, m
    with open(run / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {"pred_labels", *[f"prob_{f}" for f in FINDINGS]} <= set(rows[0])
    assert all(set(filter(None, r["pred_labels"].split(";"))) <= set(FINDINGS) for r in rows)

    # eval.tune_thresholds: per-class thresholds from val, stored in the checkpoint, used by eval
    from pathm3.pretrained import load_checkpoint
    from pathm3.train import _tune_and_store_thresholds

    ckpt = run / "checkpoints" / "best.safetensors"
    model, cfg, classes = load_checkpoint(ckpt)
    _tune_and_store_thresholds(model, cfg, classes, ckpt, progress=False)
    stored = json.loads((run / "thresholds.json").read_text())
    assert set(stored) == set(FINDINGS) and all(0 < t < 1 for t in stored.values())
    assert load_checkpoint(ckpt)[1].eval.thresholds == stored
    out = tmp_path / "eval" / "metrics.json"
    assert run_cli(eval_main, ["--checkpoint", str(run), "--output", str(out), "--no-progress"]) == 0
    with open(out.parent / "predictions.csv") as fh:
        tuned = list(csv.DictReader(fh))
    for row in tuned:  # the predicted findings are exactly those at or above their tuned threshold
        on = {f for f in FINDINGS if float(row[f"prob_{f}"]) >= stored[f]}
        assert set(filter(None, row["pred_labels"].split(";"))) == on

    # the heatmap explains one finding
    bag = sorted((tmp_path / "cohort" / "bags").glob("*.h5"))[0]
    heat = tmp_path / "heat"
    assert run_cli(heatmap_main, ["--checkpoint", str(run), "--bag", str(bag), "--class", FINDINGS[1],
                                  "--output", str(heat), "--no-progress"]) == 0
    assert (heat / f"{bag.stem}_scores.csv").is_file()
    assert run_cli(heatmap_main, ["--checkpoint", str(run), "--bag", str(bag), "--class", "nope",
                                  "--output", str(heat), "--no-progress"]) == 2
