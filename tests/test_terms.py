"""Caption-term supervision (``train.terms``): which words are chosen, what the loss sees, and that a
run stores its terms so its checkpoint rebuilds the same head."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import yaml

from conftest import REPO, make_batch, tiny_config
from pathm3.bags import index_grid, read_bag, write_bag
from pathm3.data import pad_bags
from pathm3.explain import term_scores
from pathm3.manifest import write_manifest
from pathm3.parts.heads import HeadConfig
from pathm3.parts.terms import TermsConfig, choose_terms, contains
from pathm3.pretrained import build_model, load_checkpoint
from pathm3.text import build_word_tokenizer
from pathm3.train import train_one

CAPTIONS = ["tubular adenocarcinoma with necrosis", "tubular adenocarcinoma with mucin pools",
            "signet ring cell carcinoma with necrosis", "signet ring cell carcinoma with mucin pools"]


def test_chosen_words_tell_captions_apart():
    caps = CAPTIONS * 3 + ["a rare word", None, ""]
    terms = choose_terms(caps, TermsConfig(weight=1, min_slides=3, max_share=0.9))
    assert "with" not in terms  # in 12 of 13 captions: tells nothing apart
    assert "rare" not in terms  # in one caption only
    assert set(terms) == {"tubular", "adenocarcinoma", "necrosis", "mucin", "pools", "signet", "ring", "cell",
                          "carcinoma"}
    assert terms == sorted(terms)  # each is in 6 captions: ties go alphabetically
    more = choose_terms(caps + ["necrosis again"], TermsConfig(weight=1, max_share=0.8))
    assert more[0] == "necrosis" and more[1:] == [t for t in terms if t != "necrosis"]  # most frequent first
    assert choose_terms(caps, TermsConfig(weight=1, min_slides=3, max_terms=2)) == terms[:2]


def test_contains_matches_whole_words_and_phrases():
    got = contains(["Signet-ring cells, with MUCIN pools.", None, "carcinomas"],
                   ["signet ring", "mucin pools", "ring cell", "carcinoma"])
    assert got[0].tolist() == [1.0, 1.0, 0.0, 0.0]  # punctuation and case do not matter; "ring cells" != "ring cell"
    assert all(math.isnan(v) for v in got[1].tolist())  # no caption: unknown, not absent
    assert got[2].tolist() == [0.0, 0.0, 0.0, 0.0]  # "carcinomas" is not the word "carcinoma"


@pytest.mark.parametrize("source, pool, size", [("tokens", "mean", 60), ("patches", "mean", 60), ("both", "mean", 60),
                                                ("patches", "lse", 400)])
def test_terms_loss_learns_a_rare_finding(source, pool, size):
    """Off by default; with a weight, the loss is BCE of the term scores (max over queries, a
    quadratic score averaged over patches or log-mean-exp pooled, or their sum), and a few steps
    on bags whose 'necrosis' is carried by 2 of ``size`` patches (log-mean-exp: 0.5%) learn to
    detect it on new bags."""
    tok = build_word_tokenizer(CAPTIONS)
    plain = build_model(tiny_config(), tok)
    assert plain.terms is None
    assert plain(make_batch(plain, [torch.randn(20, 64)], [0], ["tubular adenocarcinoma"])).loss_terms is None

    torch.manual_seed(0)
    cfg = tiny_config("train.terms.weight=1.0", 'train.terms.terms=["necrosis", "mucin pools"]', "model.alpha=1.0",
                      "model.patch_dropout=0", "model.captioner.type=none", f"train.terms.source={source}",
                      f"train.terms.pool={pool}", "train.terms.rank=8")  # 81 second moments: 128 small training bags do not fit noise
    model = build_model(cfg, tok)
    assert len(model.terms.cfg.terms) == 2 and "terms" in model.parts()
    needle = torch.zeros(64)
    needle[5] = 8.0

    def bags(n):
        out, caps, where = [], [], []
        for i in range(n):
            b = torch.randn(size, 64)
            where.append(torch.randperm(size)[:2] if i % 2 else torch.zeros(0, dtype=torch.long))
            b[where[-1]] += needle
            out.append(b)
            caps.append("carcinoma with necrosis" if i % 2 else "carcinoma with mucin pools")
        return out, caps, where

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train_bags, train_caps, _ = bags(128)
    losses = []
    for step in range(100):
        i = [(step * 16 + j) % 128 for j in range(16)]
        out = model(make_batch(model, [train_bags[k] for k in i], [0] * 16, [train_caps[k] for k in i]))
        losses.append(out.loss_terms.item())
        opt.zero_grad()
        out.loss.backward()  # every bag has class 0, so the classification loss teaches nothing about necrosis
        opt.step()
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])
    model.eval()
    test_bags, test_caps, where = bags(20)
    feats = make_batch(model, test_bags, [0] * 20, test_caps)
    p = model.infer(feats.features, feats.mask, generate=False).term_probabilities[:, 0]  # P(necrosis), as predicted
    truth = torch.tensor([i % 2 for i in range(20)], dtype=torch.bool)
    assert ((p > 0.5) == truth).float().mean() >= 0.9  # new bags: the 2 needle patches are found
    if source != "tokens":  # the term's own patch scores (pathm3-heatmap --term) rank the needles first
        scores = term_scores(model, feats.features, feats.mask, "necrosis")  # (20, size)
        hits = [len(set(scores[i].topk(2).indices.tolist()) & set(where[i].tolist())) / 2 for i in range(1, 20, 2)]
        assert sum(hits) / len(hits) >= 0.75  # measured: 0.8 (patches, mean), 1.0 (both; patches, lse)


@pytest.mark.parametrize("pool", ["mean", "lse"])
def test_patch_scores_ignore_padding_and_the_captioner_reads_the_term_tokens(pool):
    tok = build_word_tokenizer(CAPTIONS)
    torch.manual_seed(0)
    model = build_model(tiny_config("train.terms.weight=1.0", 'train.terms.terms=["necrosis", "mucin pools"]',
                                    "train.terms.source=patches", "train.terms.captioner_tokens=2",
                                    f"train.terms.pool={pool}", "model.head.captioner_token=false"), tok).eval()
    bag = torch.randn(30, 64)
    alone, padded = make_batch(model, [bag]), make_batch(model, [bag, torch.randn(50, 64)])
    with torch.no_grad():
        logits = [model.terms.logits(None, model.mixer(b.features, b.mask), b.mask)[0] for b in (alone, padded)]
        torch.testing.assert_close(logits[0], logits[1])  # a bag's term scores do not see its padding
        k = model.aggregator.num_tokens
        out = model.aggregator(model.mixer(alone.features, alone.mask), alone.mask)
        assert model._caption_input(out, logits[0][None]).shape == (1, k + 2, out.tokens.shape[-1])
    batch = make_batch(model, [bag], [0], ["tubular adenocarcinoma with necrosis"])
    before = model(batch).loss_gen
    with torch.no_grad():
        model.terms.to_captioner.bias.add_(1.0)  # only the term tokens change
    assert not torch.isclose(model(batch).loss_gen, before)  # the caption reads them


def test_the_captioner_reads_the_prediction_and_does_not_train_the_classifier():
    """model.head.captioner_token: one more token for the captioner, made from the predicted class
    (one-hot), or from the label where one is given (training); changing it changes the caption
    loss, and it gives the classifier no gradient."""
    tok = build_word_tokenizer(CAPTIONS)
    torch.manual_seed(0)
    assert not HeadConfig().captioner_token  # off by default (demo.yaml: on)
    assert build_model(tiny_config("model.head.captioner_token=false"), tok).head.to_captioner is None
    model = build_model(tiny_config("model.head.captioner_token=true", "model.patch_dropout=0"), tok).eval()
    batch = make_batch(model, [torch.randn(30, 64)], [0], ["tubular adenocarcinoma with necrosis"])
    out = model.aggregator(model.mixer(batch.features, batch.mask), batch.mask)
    k, q = model.aggregator.num_tokens, out.tokens.shape[-1]
    tokens = model._caption_input(out, None)  # (1, K + 1, Q)
    assert tokens.shape == (1, k + 1, q)
    w, b = model.head.to_captioner.weight, model.head.to_captioner.bias
    predicted = int(model._classify(out)[0].argmax())
    torch.testing.assert_close(tokens[0, -1], w[:, predicted] + b)  # the prediction, one-hot
    labelled = model._caption_input(out, None, torch.tensor([[float(c == 1 - predicted) for c in range(2)]]))
    torch.testing.assert_close(labelled[0, -1], w[:, 1 - predicted] + b)  # the label where it is known
    unknown = model._caption_input(out, None, torch.full((1, 2), float("nan")))
    torch.testing.assert_close(unknown, tokens)  # and the prediction where it is not
    grad = torch.autograd.grad(tokens[:, -1].sum(), model.head.classifier.weight, allow_unused=True)[0]
    assert grad is None  # no gradient back to the classifier
    other = make_batch(model, [batch.features[0]], [1 - predicted], ["tubular adenocarcinoma with necrosis"])

    def training_loss():  # the same dropout masks every time
        torch.manual_seed(1)
        return model.train()(other).loss_gen.detach()

    before, trained = model.eval()(batch).loss_gen, training_loss()
    with torch.no_grad():
        w[:, predicted] += 1.0  # only the token of the predicted class changes
    assert not torch.isclose(model.eval()(batch).loss_gen, before)  # the caption reads it
    torch.testing.assert_close(training_loss(), trained)  # in training it holds the label, not the prediction


def _cohort(root, captions):
    """24 random 30-patch bags; slide i gets captions[i % len(captions)]."""
    rows = []
    for i in range(24):
        sid = f"s{i:02d}"
        feats = torch.randn(30, 64).numpy()
        write_bag(root / "bags" / f"{sid}.h5", feats, index_grid(30, 224), dtype="float32",
                  coords_attrs={"patch_size": 224, "patch_size_level0": 224, "name": sid},
                  features_attrs={"encoder": "synthetic", "name": sid})
        rows.append({"slide_id": sid, "label": ["benign", "tumour"][i % 2], "caption": captions[i % len(captions)],
                     "split": "train" if i < 16 else "val" if i < 20 else "test"})
    write_manifest(rows, root / "manifest.csv")


def test_a_run_chooses_its_terms_and_its_checkpoint_rebuilds_them(tmp_path):
    root = tmp_path / "cohort"
    _cohort(root, CAPTIONS)
    cfg = tiny_config(f"data.manifest={root / 'manifest.csv'}", f"data.bags_dir={root / 'bags'}",
                      f"train.output_dir={tmp_path / 'runs'}", "train.max_epochs=1", "train.terms.weight=0.5",
                      "train.terms.source=patches", "train.terms.captioner_tokens=2",
                      "eval.num_beams=1", "eval.max_new_tokens=4")
    run = train_one(cfg, seed=0, progress=False)
    stored = yaml.safe_load((run / "config.yaml").read_text())["train"]["terms"]["terms"]
    assert set(stored) == {"tubular", "adenocarcinoma", "necrosis", "mucin", "pools", "signet", "ring", "cell",
                           "carcinoma"}
    model, loaded, _ = load_checkpoint(run / "checkpoints" / "best.safetensors")
    assert loaded.train.terms.terms == stored and model.terms.patch_score.out_features == len(stored)
    with open(run / "predictions.csv") as fh:  # the checkpoint writes the run's captions again, term tokens included
        rows = list(csv.DictReader(fh))
    bags = [torch.from_numpy(read_bag(root / "bags" / f"{r['slide_id']}.h5", dtype="float32").features) for r in rows]
    feats, mask = pad_bags(bags)
    assert model.generate_captions(feats, mask, num_beams=1, max_new_tokens=4) == [r["caption_pred"] for r in rows]
    probs = model.infer(feats, mask, generate=False).term_probabilities  # (n, T) the findings column's source
    for row, p in zip(rows, probs.tolist()):
        likeliest = sorted((q, t) for t, q in zip(stored, p) if q >= 0.5)[::-1]
        assert row["findings"] == ";".join(t for _, t in likeliest)
    metrics = json.loads((run / "metrics.json").read_text())["caption_terms"]
    assert metrics["n_terms"] == len(stored) and set(metrics["per_class"]) == set(stored)
    with open(run / "metrics.csv") as fh:
        assert any(r.get("train/loss_terms") for r in csv.DictReader(fh))


def test_no_words_to_choose_and_no_captions(tmp_path):
    from pathm3.errors import DataError
    from pathm3.manifest import Slide
    from pathm3.parts.terms import with_terms

    slides = [Slide(f"s{i}", [1.0, 0.0], "the same words", "train", tmp_path / f"s{i}.h5", i + 2) for i in range(4)]
    with pytest.raises(DataError, match="train.terms"):  # every word is in every caption
        with_terms(tiny_config("train.terms.weight=1"), slides)
    assert with_terms(tiny_config(), slides).train.terms.terms == []  # weight 0: nothing chosen
    uncaptioned = [Slide(s.slide_id, s.targets, None, s.split, s.bag_path, s.row) for s in slides]
    assert with_terms(tiny_config("train.terms.weight=1"), uncaptioned).train.terms.weight == 0  # no captions
    with pytest.raises(ValueError, match="chooses the words"):  # built directly without its words
        build_model(tiny_config("train.terms.weight=1"), build_word_tokenizer(CAPTIONS))


def test_pathm3_train_without_words_to_choose_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    from pathm3.cli import train_main
    from pathm3.errors import run_cli

    root = tmp_path / "cohort"
    _cohort(root, ["the same words"])
    code = run_cli(train_main, ["--config", str(REPO / "configs" / "demo.yaml"), "--no-progress",
                                "--set", f"data.manifest={root / 'manifest.csv'}",
                                "--set", f"data.bags_dir={root / 'bags'}",
                                "--set", f"train.output_dir={tmp_path / 'runs'}", "--set", "data.classes=[benign, tumour]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("error:")
    assert str(root / "manifest.csv") in err[0] and "train.terms.terms" in err[0]  # the file and the fix
    assert not (tmp_path / "runs").exists()
