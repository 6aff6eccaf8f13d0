"""Mined prototypes (``train.prototypes``): mining finds the needles from bag labels alone without a
bag vouching for itself, the labels mean what they say, the stream joins the head's logits and
the term logits, and a run mines, stores and reloads the directions, which read the class off
bags where it is carried by two patches of a hundred."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import make_batch, tiny_config
from pathm3.bags import read_bag
from pathm3.cohorts import CohortSpec, make_cohort
from pathm3.data import pad_bags
from pathm3.explain import all_term_scores
from pathm3.mining import mine_patches
from pathm3.parts.prototypes import PrototypesConfig
from pathm3.pretrained import build_model, load_checkpoint
from pathm3.synthetic import class_directions
from pathm3.text import build_word_tokenizer
from pathm3.train import train_one

# 2 needles of each signal per bag of ~100 16-d patches, 36 training bags
SPEC = CohortSpec(slides=60, patches=(80, 120), dim=16, class_frac=0.02, attribute_frac=0.02)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("needles"), SPEC)


def _train_bags(cohort):
    slides = cohort.split("train")
    return slides, [read_bag(cohort.bags_dir / f"{s.slide_id}.h5", dtype="float32") for s in slides]


def test_mining_finds_the_needles_from_bag_labels_and_labels_only_what_it_may(cohort):
    slides, bags = _train_bags(cohort)
    c, a = len(cohort.classes), len(cohort.attributes)
    targets = np.zeros((len(slides), c + a), np.float32)
    for i, s in enumerate(slides):
        targets[i, s.label] = targets[i, c + s.attribute] = 1
    targets[0, c:] = np.nan  # slide 0's attribute unknown: nothing mined for it, nothing labelled 0
    cfg = PrototypesConfig(enabled=True, top=2, negatives=5)
    mined = mine_patches([b.features for b in bags], targets, cfg, progress=False)
    found = {"class": [], "attribute": []}
    for i, (s, b, p) in enumerate(zip(slides, bags, mined.labels)):
        labels = p.labels.numpy()
        lacks, has = targets[i] == 0, targets[i] == 1
        assert (labels[:, lacks] == 0).all()  # every labelled patch is a negative of what its slide lacks
        assert not (labels[:, ~lacks] == 0).any()  # and of nothing else
        assert np.isnan(labels[:, ~has & ~lacks]).all()  # unknown stays unknown
        assert len(labels) <= cfg.negatives + 2 * cfg.top and (labels == 1).sum(0)[has].max() <= cfg.top
        for signal, col in (("class", s.label), ("attribute", c + s.attribute)):
            rows = p.index.numpy()[labels[:, col] == 1]
            found[signal] += s.signal_mask(b.coords, signal)[rows].tolist()
    assert np.mean(found["class"]) >= 0.8 and np.mean(found["attribute"]) >= 0.8  # needles are 2% of the patches
    true = class_directions(SPEC.dim, c + a)  # (C + A, D) the directions the needles carry
    cosine = (mined.directions * true).sum(1)  # both unit length (the features are ~standard already)
    assert cosine.min() > 0.85


def test_a_bag_cannot_vouch_for_its_own_patches():
    """Bag 0 holds 8 copies of a pattern no other bag has: they match each other (more often
    than the needle matches the 5 other class-0 bags), but mining leaves a bag's own patches out,
    so they are not mined; the needle of class 0 is."""
    g = torch.Generator().manual_seed(0)
    needle, twin = torch.randn(16, generator=g) * 1.5, torch.randn(16, generator=g) * 1.5
    bags = [torch.randn(200, 16, generator=g) for _ in range(12)]
    for i in range(6):  # class 0: one needle each
        bags[i][7] = needle + 0.1 * torch.randn(16, generator=g)
    bags[0][20:28] = twin
    targets = np.array([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 6, np.float32)
    mined = mine_patches([b.numpy() for b in bags], targets, PrototypesConfig(enabled=True, top=1, negatives=0),
                         progress=False)
    first = mined.labels[0]
    assert first.index.tolist() == [7] and first.labels[0].tolist()[0] == 1.0


def test_the_stream_joins_the_head_and_the_term_logits(cohort):
    terms = ["tubular", "necrosis"]
    cfg = tiny_config("train.prototypes.enabled=true", "train.terms.weight=1", "train.terms.source=patches",
                      f"train.terms.terms=[{', '.join(terms)}]", "model.feature_dim=16", classes=cohort.classes)
    tok = build_word_tokenizer(["tubular adenocarcinoma with necrosis"])
    assert build_model(tiny_config("model.feature_dim=16", classes=cohort.classes), tok).prototypes is None
    model = build_model(cfg, tok).eval()
    c = len(cohort.classes)
    directions = torch.nn.functional.normalize(torch.randn(c + len(terms), 16), dim=1)
    model.prototypes.set_directions(torch.zeros(16), torch.ones(16), directions)
    bags = [torch.randn(n, 16) for n in (30, 50)]
    batch = make_batch(model, bags)
    with torch.no_grad():
        x = model.mixer(batch.features, batch.mask)
        out = model.aggregate(batch.features, x, batch.mask)
        logits = model._classify(out)[0]
        tau = model.prototypes.cfg.temperature
        for i, b in enumerate(bags):  # the stream of one bag alone: log-mean-exp at temperature tau
            pooled = torch.logsumexp(tau * (b @ directions.T), 0) / tau - math.log(len(b)) / tau  # (C + T,)
            assert torch.allclose(out.patch_stream[i], pooled[:c], atol=1e-5)
            assert torch.allclose(out.term_stream[i], pooled[c:], atol=1e-5)
        assert torch.allclose(logits, (model.head(out.tokens) + out.patch_stream) / 2, atol=1e-6)
        terms_alone = model.terms.logits(out.tokens, x, batch.mask)
        assert torch.allclose(model._term_logits(out, x, batch.mask), terms_alone + out.term_stream, atol=1e-6)
        heat = all_term_scores(model, batch.features, batch.mask)  # (B, T, M): the term heatmap adds the mined score
        along = (batch.features @ directions[c:].T).transpose(1, 2) * model.prototypes.scale[1]
        want = (model.terms.patch_logits(x, batch.mask) + along).masked_fill(~batch.mask[:, None], 0.0)
        assert torch.allclose(heat, want, atol=1e-5)
    assert [n for n, _ in model.trainable_parameters() if n.startswith("prototypes.")] == \
        ["prototypes.scale", "prototypes.bias"]  # the directions are data, not trained


def test_a_run_mines_stores_and_reloads_the_directions_which_read_the_class(cohort, tmp_path):
    cfg = tiny_config(*cohort.overrides(), "model.feature_dim=16", "train.prototypes.enabled=true",
                      f"train.output_dir={tmp_path / 'runs'}", "train.max_epochs=1", "eval.num_beams=1",
                      "eval.max_new_tokens=4", classes=cohort.classes)
    run = train_one(cfg, seed=0, progress=False)
    model, loaded, _ = load_checkpoint(run / "checkpoints" / "best.safetensors")
    assert loaded.train.prototypes.enabled and model.prototypes is not None
    true = class_directions(SPEC.dim, len(cohort.classes))
    assert (model.prototypes.directions[:len(cohort.classes)] * true).sum(1).min() > 0.85  # mined, stored, read back
    assert model.prototypes.scale[0] > 1.5  # calibrated on the training bags: the stream separates them
    test = cohort.split("test")
    feats, mask = pad_bags([torch.from_numpy(read_bag(cohort.bags_dir / f"{s.slide_id}.h5", dtype="float32").features)
                            for s in test])
    with torch.no_grad():
        stream, _ = model.prototypes(feats, mask)  # (B, C) the stream alone, after one epoch
    assert (stream.argmax(-1) == torch.tensor([s.label for s in test])).float().mean() >= 0.9
