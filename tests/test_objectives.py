"""Training objectives and optimisation: image-text contrastive alignment (clip / siglip) with its
retrieval metrics, per-part learning rates, the one-cycle schedule."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from conftest import REPO, make_batch, tiny_config
from pathm3.bags import index_grid, write_bag
from pathm3.config import load_config
from pathm3.errors import ConfigError
from pathm3.evaluate import predict, retrieval_metrics
from pathm3.manifest import read_manifest, write_manifest
from pathm3.optim import build_optimizer, build_scheduler
from pathm3.pretrained import build_model
from pathm3.synthetic import signal_bags
from pathm3.text import build_word_tokenizer
from pathm3.train import train_one

CLASSES = ["a", "b", "c", "d"]
CAPTIONS = ["regular glands in benign mucosa", "fused irregular glands with atypia",
            "sheets of discohesive signet ring cells", "dense lymphoid infiltrate around glands"]


@pytest.fixture(scope="module")
def four_captions(tmp_path_factory):
    """120 bags of 4 classes, each class with its own caption (what the slide shows decides it)."""
    root = tmp_path_factory.mktemp("contrastive")
    bags, labels = signal_bags(120, seed=3, dim=64, num_classes=4, sizes=(60, 120), frac=0.1)
    rows = []
    for i, (bag, y) in enumerate(zip(bags, labels.tolist())):
        sid = f"s{i:03d}"
        write_bag(root / "bags" / f"{sid}.h5", bag.numpy(), index_grid(len(bag), 224), dtype="float32",
                  coords_attrs={"patch_size": 224, "patch_size_level0": 224, "name": sid},
                  features_attrs={"encoder": "synthetic", "name": sid})
        rows.append({"slide_id": sid, "label": CLASSES[y], "caption": CAPTIONS[y],
                     "split": "train" if i < 80 else "val" if i < 90 else "test"})
    write_manifest(rows, root / "manifest.csv")
    return root


def _config(root, *overrides):
    return tiny_config(f"data.manifest={root / 'manifest.csv'}", f"data.bags_dir={root / 'bags'}",
                       f"train.output_dir={root / 'runs'}", "model.captioner.type=none", "model.alpha=1.0",
                       "model.aggregator.text_input=never", "train.max_epochs=15", "train.warmup_steps=5",
                       "train.contrastive.weight=1.0", *overrides, classes=CLASSES)


@pytest.mark.parametrize("loss", ["clip"])  # siglip's loss and initial values: the next test
def test_contrastive_training_retrieves_the_right_caption(four_captions, loss):
    cfg = _config(four_captions, f"train.contrastive.loss={loss}", f"train.name={loss}")
    test = read_manifest(cfg.data.manifest, cfg.data.bags_dir, CLASSES, splits=["test"])

    torch.manual_seed(0)  # an untrained model ranks captions at chance (4 distinct captions)
    untrained = build_model(cfg, build_word_tokenizer(CAPTIONS))
    before = retrieval_metrics(predict(untrained, test, CLASSES, captions=False, progress=False))
    assert before["n_captions"] == 4 and before["slide_to_caption_r@1"] <= 0.55

    run = train_one(cfg, seed=0, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    after = metrics["retrieval"]
    assert after["slide_to_caption_r@1"] >= 0.9 and after["caption_to_slide_r@1"] >= 0.75
    assert after["slide_to_caption_r@5"] == 1.0  # only 4 candidates
    with open(run / "metrics.csv") as fh:
        logged = [r["train/loss_contrastive"] for r in csv.DictReader(fh) if r.get("train/loss_contrastive")]
    assert logged and float(logged[-1]) < float(logged[0])


def test_contrastive_loss_values_and_untouched_default():
    cfg = tiny_config("train.contrastive.weight=0.1", "train.contrastive.loss=siglip")
    model = build_model(cfg, build_word_tokenizer(["benign glands", "tumour cells", "mucosa"]))
    c = model.contrastive
    assert c.log_scale.item() == pytest.approx(math.log(10)) and c.bias.item() == -10.0  # SigLIP's init
    out = model(make_batch(model, [torch.randn(30, 64), torch.randn(40, 64), torch.randn(35, 64)], [0, 1, 0],
                           ["benign glands", "tumour cells", None]))
    assert out.loss_contrastive is not None and out.loss_contrastive > 0
    plain = build_model(tiny_config(), build_word_tokenizer(["x"]))
    assert plain.contrastive is None and "contrastive" not in plain.parts()  # weight 0: the paper's model


def test_contrastive_needs_an_aggregator_that_reads_captions(tmp_path):
    with pytest.raises(ConfigError, match="train.contrastive needs an aggregator that encodes captions"):
        load_config(REPO / "configs" / "demo.yaml", ["model.aggregator.type=abmil", "train.contrastive.weight=0.1"])
    with pytest.raises(ConfigError, match="param_groups"):
        load_config(REPO / "configs" / "demo.yaml", ["train.param_groups={decoder: {lr: 0.1}}"])


def test_param_groups_give_each_part_its_own_lr_and_decay():
    cfg = tiny_config("train.lr=0.001", "train.weight_decay=0.05",
                      "train.param_groups={captioner: {lr: 0.00002}, projection: {lr: 0.0005, weight_decay: 0.0}}",
                      "model.captioner.finetune=full")
    model = build_model(cfg, build_word_tokenizer(["benign glands"]))
    opt = build_optimizer(model, cfg.train)
    by_name = {}
    for g in opt.param_groups:
        by_name.setdefault(g["name"], []).append((g["lr"], g["weight_decay"], len(g["params"])))
    assert {lr for lr, _, _ in by_name["captioner"]} == {2e-5}
    assert {(lr, wd) for lr, wd, _ in by_name["projection"]} == {(5e-4, 0.0)}
    assert {lr for lr, _, _ in by_name["aggregator"]} == {1e-3}
    assert {wd for _, wd, _ in by_name["aggregator"]} == {0.05, 0.0}  # matrices decay, biases/norms do not
    assert sum(n for groups in by_name.values() for _, _, n in groups) == len(model.trainable_parameters())


def _lrs(cfg, steps):
    param = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([{"params": [param], "lr": cfg.lr}, {"params": [], "lr": cfg.lr / 10}])
    sched = build_scheduler(opt, cfg, steps)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return torch.tensor(out)


def test_onecycle_warms_up_peaks_and_anneals_every_group():
    cfg = load_config(None, ["train.scheduler=onecycle", "train.lr=0.001", "train.warmup_lr=0.00001",
                             "train.warmup_steps=10", "train.min_lr=0.000001"]).train
    lrs = _lrs(cfg, 100)
    assert lrs[0, 0] == pytest.approx(1e-5) and lrs[:, 0].max() == pytest.approx(1e-3)
    assert int(lrs[:, 0].argmax()) in (9, 10) and lrs[-1, 0] < 2e-6
    assert torch.allclose(lrs[:, 1], lrs[:, 0] / 10)  # each group to its own peak
    cosine = _lrs(load_config(None, ["train.lr=0.001", "train.warmup_lr=0.00001", "train.warmup_steps=10"]).train, 100)
    assert cosine[10, 0] == pytest.approx(1e-3) and cosine[-1, 0] < 1e-5


def _pred(sid, probs, ref, pred=None, emb=None, slide=None, cap=None):
    import numpy as np

    from pathm3.evaluate import Prediction

    return Prediction(sid, np.array([1.0, 0.0]), ref, np.array(probs), None, None, pred,
                      None if emb is None else np.array(emb, dtype=float),
                      None if slide is None else np.array(slide, dtype=float),
                      None if cap is None else np.array(cap, dtype=float))


def test_class_agreement_and_the_retrieval_baseline():
    from pathm3.evaluate import class_agreement, evaluate_predictions, nearest_captions

    classes = ["tubular", "signet_ring"]
    preds = [_pred("a", [0.9, 0.1], "tubular adenocarcinoma", "tubular adenocarcinoma with lymphocytes", [1, 0]),
             _pred("b", [0.2, 0.8], "signet ring cells", "signet ring cell carcinoma", [0, 1]),
             _pred("c", [0.2, 0.8], "signet ring cells", "tubular glands", [0.1, 1])]
    assert class_agreement(preds, classes, {}) == pytest.approx(2 / 3)  # names from the class names
    assert class_agreement(preds, classes, {"tubular": ["glands"]}) == pytest.approx(1 / 3)
    assert class_agreement([_pred("d", [1, 0], "no class words", "x")], classes, {}) is None  # phrases unknown here

    train = [_pred("t1", [1, 0], "caption of the first kind", emb=[2, 0.1]),
             _pred("t2", [0, 1], "caption of the second kind", emb=[0.1, 3])]
    assert nearest_captions(preds, train) == {"a": "caption of the first kind", "b": "caption of the second kind",
                                              "c": "caption of the second kind"}
    same = [_pred("a", [0.9, 0.1], "caption of the first kind", "caption of the first kind", [1, 0])]
    m = evaluate_predictions(same, classes, reference=train)
    assert m["captioning_retrieval"]["bleu_4"] == pytest.approx(m["captioning"]["bleu_4"])


def test_retrieval_counts_a_shared_caption_once():
    from pathm3.evaluate import retrieval_metrics

    e = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    rows = [_pred("a", [1, 0], "x", slide=e[0], cap=e[0]), _pred("b", [1, 0], "x", slide=e[0], cap=e[0]),
            _pred("c", [1, 0], "y", slide=e[1], cap=e[1]), _pred("d", [1, 0], "z", slide=e[1], cap=e[2])]
    m = retrieval_metrics(rows)
    assert m["n_captions"] == 3 and m["n_slides"] == 4
    assert m["slide_to_caption_r@1"] == pytest.approx(3 / 4)  # d's slide looks like caption y
    assert m["caption_to_slide_r@1"] == pytest.approx(2 / 3)  # z finds no slide of its own first
    assert m["slide_to_caption_r@5"] == 1.0
