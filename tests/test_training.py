"""Training, evaluation and prediction commands on small synthetic cohorts, with real Lightning,
real HDF5 bags and real pycocoevalcap (Java)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.torch import load_file

from pathm3.cli import eval_main, predict_main, train_main
from pathm3.errors import run_cli
from pathm3.synthetic import write_cohort

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def small(tmp: Path, *extra: str) -> list[str]:
    """pathm3-train arguments for a fast run on a 40-slide cohort in ``tmp``."""
    return ["--config", str(DEMO), "--no-progress",
            "--set", f"data.manifest={tmp / 'cohort' / 'manifest.csv'}", "--set", f"data.bags_dir={tmp / 'cohort' / 'bags'}",
            "--set", f"train.output_dir={tmp / 'runs'}", "--set", "train.max_epochs=3", "--set", "train.warmup_steps=5",
            "--set", "eval.num_beams=1", "--set", "eval.max_new_tokens=12", *extra]


@pytest.fixture
def cohort(tmp_path) -> Path:
    write_cohort(tmp_path / "cohort", n_slides=40, dim=64, seed=0)
    return tmp_path


def test_train_writes_the_run_layout_and_eval_writes_every_key(trained_run, tmp_path):
    run, cohort = trained_run, tmp_path
    for name in ("config.yaml", "tokenizer.json", "run.json", "metrics.csv", "metrics.json", "predictions.csv",
                 "checkpoints/last.ckpt", "checkpoints/best.safetensors", "checkpoints/last.safetensors"):
        assert (run / name).is_file(), name
    with open(run / "metrics.csv") as fh:
        logged = list(csv.DictReader(fh))
    assert any(r.get("val/accuracy") for r in logged) and any(r.get("train/loss") for r in logged)

    out = cohort / "eval" / "metrics.json"
    assert run_cli(eval_main, ["--checkpoint", str(run / "checkpoints" / "best.safetensors"), "--split", "test",
                               "--output", str(out), "--no-progress"]) == 0
    m = json.loads(out.read_text())
    assert m["n_slides"] == 8
    for mode in ("image_only", "image_text"):
        assert set(m["classification"][mode]) == {"accuracy", "balanced_accuracy", "macro_f1", "auroc", "confusion_matrix"}
        assert np.array(m["classification"][mode]["confusion_matrix"]).sum() == 8
    caption_keys = {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice", "spice_note"}
    assert set(m["captioning"]) == caption_keys | {"class_agreement"}
    assert set(m["captioning_retrieval"]) == caption_keys  # the nearest training caption, scored the same way
    assert m["retrieval"] is None  # trained without train.contrastive
    terms = m["caption_terms"]  # demo.yaml's caption terms, scored against the reference captions' words
    assert terms["n_slides"] == 8 and terms["n_terms"] == len(terms["per_class"]) > 0 and 0 <= terms["micro_f1"] <= 1
    with open(out.parent / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and {"slide_id", "label", "pred_image_only", "pred_image_text", "prob_benign",
                               "prob_adenocarcinoma", "caption_ref", "caption_pred", "findings"} <= set(rows[0])
    assert all(set(r["findings"].split(";")) - {""} <= set(terms["per_class"]) for r in rows)
    assert abs(float(rows[0]["prob_benign"]) + float(rows[0]["prob_adenocarcinoma"]) - 1) < 1e-5


def test_sections_are_null_without_labels_or_captions(trained_run, tmp_path):
    cohort = tmp_path
    ckpt = trained_run / "checkpoints" / "best.safetensors"
    manifest = trained_run.parents[2] / "cohort" / "manifest.csv"
    with open(manifest) as fh:
        rows = list(csv.DictReader(fh))
    bare = cohort / "bare.csv"
    with open(bare, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide_id", "label", "caption", "split"])
        w.writeheader()
        w.writerows({**r, "label": "", "caption": ""} for r in rows)
    out = cohort / "bare" / "metrics.json"
    assert run_cli(eval_main, ["--checkpoint", str(ckpt), "--manifest", str(bare), "--output", str(out),
                               "--no-progress"]) == 0
    m = json.loads(out.read_text())
    assert m["classification"] is None and m["captioning"] is None and m["n_slides"] == 8


def test_caption_metrics_of_references_against_themselves():
    from pathm3.metrics import caption_metrics

    refs = {"a": ["Tubular glands with atypical nuclei, well formed."],
            "b": ["Solid sheets of poorly differentiated cells infiltrate the muscularis."],
            "c": ["Signet ring cells are scattered in the lamina propria."]}
    m = caption_metrics(refs, {k: v[0] for k, v in refs.items()})
    assert m["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert m["meteor"] == pytest.approx(1.0) and m["rouge_l"] == pytest.approx(1.0)
    if m["spice"] is None:  # CoreNLP jars absent (as on the CI machine): a note, no crash, no hang
        assert "stanford-corenlp-3.6.0" in m["spice_note"]
    worse = caption_metrics(refs, {"a": "glands", "b": "cells", "c": "ring"})
    assert worse["bleu_4"] < 0.1 and worse["meteor"] < m["meteor"]


def test_killed_training_resumes_to_the_same_result(cohort):
    args = small(cohort, "--set", "train.max_epochs=4")
    reference = cohort / "reference"
    assert run_cli(train_main, [*args, "--set", f"train.output_dir={reference}"]) == 0

    killed = cohort / "killed"
    cmd = [str(Path(sys.executable).parent / "pathm3-train"), *args, "--set", f"train.output_dir={killed}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    ckpt = killed / "demo" / "seed0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and not ckpt.exists():  # kill once the first epoch is saved
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (killed / "demo" / "seed0" / "metrics.json").exists()

    assert run_cli(train_main, ["--resume", str(killed / "demo" / "seed0"), "--no-progress"]) == 0
    a = json.loads((reference / "demo" / "seed0" / "metrics.json").read_text())
    b = json.loads((killed / "demo" / "seed0" / "metrics.json").read_text())
    a.pop("checkpoint"), b.pop("checkpoint")
    assert a == b
    wa = load_file(str(reference / "demo" / "seed0" / "checkpoints" / "last.safetensors"))
    wb = load_file(str(killed / "demo" / "seed0" / "checkpoints" / "last.safetensors"))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
    with open(killed / "demo" / "seed0" / "metrics.csv") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no step logged twice


def test_seeds_write_a_mean_and_std_summary(cohort):
    assert run_cli(train_main, [*small(cohort, "--set", "train.max_epochs=1"), "--seeds", "0", "1"]) == 0
    out = cohort / "runs" / "demo"
    summary = json.loads((out / "summary.json").read_text())
    acc = summary["metrics"]["classification.image_only.accuracy"]
    assert summary["seeds"] == ["seed0", "seed1"] and len(acc["values"]) == 2
    assert acc["mean"] == pytest.approx(np.mean(acc["values"])) and acc["std"] == pytest.approx(np.std(acc["values"]))
    md = (out / "summary.md").read_text()
    assert "Table 1" in md and "Table 2" in md and "image + text, class words stripped" in md and "±" in md


def test_predict_writes_the_predictions_file_of_eval(trained_run, tmp_path):
    cohort, ckpt = tmp_path, trained_run
    bag_dir = trained_run.parents[2] / "cohort" / "bags"
    bags = sorted(bag_dir.glob("*.h5"))[:3]
    caps = cohort / "caps.csv"
    caps.write_text(f"slide_id,caption\n{bags[0].stem},adenocarcinoma with irregular fused glands\n")
    out_csv, out_json = cohort / "p.csv", cohort / "p.json"
    assert run_cli(predict_main, ["--checkpoint", str(ckpt), *map(str, bags), "--captions", str(caps),
                                  "--output", str(out_csv), "--no-progress"]) == 0
    with open(out_csv) as fh:
        rows = list(csv.DictReader(fh))
    with open(trained_run / "predictions.csv") as fh:
        eval_columns = csv.DictReader(fh).fieldnames
    assert list(rows[0]) == eval_columns  # one schema for eval and predict
    assert [r["slide_id"] for r in rows] == [b.stem for b in bags]
    assert rows[0]["pred_image_text"] in ("benign", "adenocarcinoma") and rows[1]["pred_image_text"] == ""
    assert all(r["pred_image_only"] in ("benign", "adenocarcinoma") and r["label"] == "" for r in rows)
    assert rows[0]["caption_ref"] == "adenocarcinoma with irregular fused glands"
    assert run_cli(predict_main, ["--checkpoint", str(ckpt), str(bag_dir), "--output", str(out_json),
                                  "--no-progress", "--sample", "--temperature", "0.8"]) == 0
    records = json.loads(out_json.read_text())
    assert len(records) == 40 and list(records[0]) == eval_columns
    assert all(isinstance(r["caption_pred"], str) for r in records)


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line, naming the row or the file


def _rewrite_manifest(cohort: Path, change) -> None:
    path = cohort / "cohort" / "manifest.csv"
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    change(rows)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide_id", "label", "caption", "split"])
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("breakage, message", [
    (lambda c: _rewrite_manifest(c, lambda rows: rows[4].update(slide_id="missing-slide")),
     "row 6 (missing-slide): bag not found"),
    (lambda c: _rewrite_manifest(c, lambda rows: rows[2].update(label="lymphoma")),
     "row 4 (synthetic-0002): label 'lymphoma' is not in data.classes"),
    (lambda c: _h5_edit(c / "cohort" / "bags" / "synthetic-0003.h5", width=32),
     "synthetic-0003.h5: features are 32-d but model.feature_dim is 64"),
    (lambda c: _h5_edit(c / "cohort" / "bags" / "synthetic-0000.h5", nan=True),
     "synthetic-0000.h5: 1 patch feature row(s) hold NaN or inf"),
])
def test_bad_inputs_are_one_line_errors(cohort, capsys, breakage, message):
    breakage(cohort)
    code = run_cli(train_main, small(cohort, "--set", "train.max_epochs=1"))
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def _h5_edit(path: Path, width: int | None = None, nan: bool = False) -> None:
    with h5py.File(path, "r+") as f:
        feats = f["features"][()]
        del f["features"]
        if width:
            feats = feats[:, :width]
        if nan:
            feats[0, 0] = np.nan
        f.create_dataset("features", data=feats)


def test_checkpoint_from_another_config_is_a_one_line_error(trained_run, tmp_path, capsys):
    cohort = tmp_path
    ckpt = trained_run / "checkpoints" / "best.safetensors"
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    cfg["model"]["aggregator"]["num_queries"] = 4
    meta["config"] = json.dumps(cfg)
    other = cohort / "other.safetensors"
    save_file(tensors, str(other), metadata=meta)
    capsys.readouterr()
    assert run_cli(eval_main, ["--checkpoint", str(other), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {other}: aggregator.query_tokens has shape" in err and "another config" in err


# ---------------------------------------------------------------------------------------------
# PatchGastric protocol on the official captions


def test_patchgastric_manifest_from_official_captions(shared_data, tmp_path):
    from pathm3.datasets.patchgastric import CLASSES, main as pg_main
    from pathm3.text import GRADE_WORDS, strip_class_words

    out = tmp_path / "manifest.csv"
    assert run_cli(pg_main, ["--captions", str(shared_data / "captions" / "patchgastric_captions.csv"),
                             "--bags", str(tmp_path / "bags"), "--output", str(out), "--seed", "0"]) == 0
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    counts = {c: sum(r["label"] == c for r in rows) for c in CLASSES}
    assert list(counts.values()) == [283, 265, 145]
    for c in CLASSES:  # stratified 20/40/40 within each class
        split = [r["split"] for r in rows if r["label"] == c]
        assert abs(split.count("train") - 0.2 * len(split)) <= 1 and abs(split.count("val") - 0.4 * len(split)) <= 1
    assert sum(bool(GRADE_WORDS.search(r["caption"])) for r in rows) == 690
    assert not any(GRADE_WORDS.search(strip_class_words(r["caption"], CLASSES)) for r in rows)
    again = tmp_path / "again.csv"
    run_cli(pg_main, ["--captions", str(shared_data / "captions" / "patchgastric_captions.csv"),
                      "--bags", str(tmp_path), "--output", str(again), "--seed", "1"])
    assert again.read_text() != out.read_text()  # another seed, another split


def test_classification_only_ablation_trains_and_its_checkpoint_loads(cohort):
    assert run_cli(train_main, small(cohort, "--set", "train.max_epochs=1", "--set", "train.task=classification",
                                     "--set", "model.mixer.type=none")) == 0
    run = cohort / "runs" / "demo" / "seed0"
    m = json.loads((run / "metrics.json").read_text())
    assert m["captioning"] is None and m["classification"]["image_only"] is not None
    from pathm3.pretrained import load_checkpoint

    model, cfg, _ = load_checkpoint(run / "checkpoints" / "best.safetensors")
    assert model.captioner is None and model.mixer.cfg.type == "none" and cfg.model.alpha == 1.0
