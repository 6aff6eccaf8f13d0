"""The PathM3 model: invariances, text modes, frozen captioner, losses, checkpoints, pretrained
folders, patch scores, and held-out accuracy on a cohort that mean pooling cannot solve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fit, make_batch, tiny_config
from pathm3.config import load_config
from pathm3.data import pad_bags
from pathm3.errors import DataError, MissingWeightsError
from pathm3.optim import build_optimizer
from pathm3.pretrained import build_model, load_checkpoint, save_checkpoint
from pathm3.synthetic import signal_bags
from pathm3.text import build_word_tokenizer

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "well differentiated tubular adenocarcinoma with regular glands",
    "poorly differentiated adenocarcinoma with solid sheets of atypical cells",
    "moderately differentiated tubular adenocarcinoma with fused glands",
]
NO_DROPOUT = ["model.aggregator.dropout=0", "model.mixer.dropout=0", "model.head.dropout=0",
              "model.patch_dropout=0"]


def tiny(*overrides: str, classes=("benign", "tumour"), tokenizer=None):
    """A small random PathM3 from configs/demo.yaml (D=24 features)."""
    cfg = tiny_config("model.feature_dim=24", *overrides, classes=classes)
    torch.manual_seed(0)
    tok = tokenizer or build_word_tokenizer(CAPTIONS, 512)
    return build_model(cfg, tok), cfg


def bags(lengths=(40, 17, 65), d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g) for n in lengths]


def randomise_correlation(model):
    # The correlation output projection starts at zero (identity block); give it weights so
    # the tests see real patch mixing.
    torch.manual_seed(1)
    for block in model.mixer.blocks:
        torch.nn.init.normal_(block.attn.to_out[0].weight, std=0.2)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_text", [False, True])
def test_bag_alone_equals_bag_padded_in_batch(with_text):
    model, _ = tiny("model.aggregator.text_input=always")
    randomise_correlation(model)
    model.eval()
    bs = bags()
    feats, mask = pad_bags(bs)
    caps = CAPTIONS if with_text else None
    with torch.no_grad():
        batch_logits = model.classify(feats, mask, caps)
        batch_scores = model.patch_scores(feats, mask)
        for i, b in enumerate(bs):
            alone = model.classify(b[None], torch.ones(1, len(b), dtype=torch.bool), [caps[i]] if caps else None)
            torch.testing.assert_close(alone[0], batch_logits[i], atol=1e-5, rtol=0)
            s = model.patch_scores(b[None], torch.ones(1, len(b), dtype=torch.bool))
            torch.testing.assert_close(s[0], batch_scores[i, : len(b)], atol=1e-5, rtol=0)


def test_caption_changes_logits_only_in_image_text_mode():
    feats, mask = pad_bags(bags())
    other = list(reversed(CAPTIONS))
    model, _ = tiny("model.aggregator.text_input=always")
    model.eval()
    with torch.no_grad():
        a = model.classify(feats, mask, CAPTIONS)
        b = model.classify(feats, mask, other)
        image_only = model.classify(feats, mask)
        partial = model.classify(feats, mask, [CAPTIONS[0], None, None])
    assert (a - b).abs().max() > 1e-3
    assert (a - image_only).abs().max() > 1e-3
    torch.testing.assert_close(partial[1:], image_only[1:], atol=1e-5, rtol=0)  # no caption = image only

    never, _ = tiny("model.aggregator.text_input=never")
    never.eval()
    with torch.no_grad():
        x = never.classify(feats, mask, CAPTIONS)
        y = never.classify(feats, mask, other)
        z = never.classify(feats, mask)
    assert torch.equal(x, y) and torch.equal(x, z)


def test_text_dropout_drops_in_training_and_keeps_at_inference():
    feats, mask = pad_bags(bags())
    for p, uses_text in [(1.0, False), (0.0, True)]:
        model, _ = tiny("model.aggregator.text_input=dropout", f"model.aggregator.text_dropout={p}", *NO_DROPOUT)
        batch = make_batch(model, bags(), [0, 1, 0], CAPTIONS)
        model.eval()
        with torch.no_grad():
            image_only = model.classify(feats, mask)
            image_text = model.classify(feats, mask, CAPTIONS)
            model.train()
            train_logits = model(batch).logits
        expected = image_text if uses_text else image_only
        torch.testing.assert_close(train_logits, expected, atol=1e-5, rtol=0)
    assert (image_text - image_only).abs().max() > 1e-3  # eval uses the caption when given


def test_frozen_captioner_gets_no_gradients_and_optimizer_skips_it():
    model, cfg = tiny("model.captioner.finetune=frozen")
    model.train()
    t5 = model.captioner.t5
    assert not t5.training  # frozen parts stay in eval mode
    out = model(make_batch(model, bags(), [0, 1, -100], [CAPTIONS[0], None, CAPTIONS[2]]))
    out.loss.backward()
    assert all(p.grad is None for p in t5.parameters())
    for part in (model.captioner.language_projection, model.aggregator.qformer, model.mixer, model.head):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    assert model.aggregator.query_tokens.grad is not None
    opt = build_optimizer(model, cfg.train)
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert in_opt == {id(p) for _, p in model.trainable_parameters()}
    assert not in_opt & {id(p) for p in t5.parameters()}


def test_correlation_switch():
    on, _ = tiny("model.mixer.type=nystrom", "model.mixer.hidden_dim=64", "model.mixer.heads=4",
                 "model.mixer.landmarks=32", "model.mixer.dropout=0", *NO_DROPOUT[::2])
    off, _ = tiny("model.mixer.type=none", "model.mixer.hidden_dim=64", *NO_DROPOUT[::2])
    randomise_correlation(on)
    assert len(on.mixer.blocks) == 1 and not hasattr(off.mixer, "blocks")
    x = bags((30,))[0][None]
    m = torch.ones(1, 30, dtype=torch.bool)
    y = x.clone()
    y[0, 5] += 3.0  # change one patch
    with torch.no_grad():
        # with correlation, other patches' embeddings see the change; without, they cannot
        assert (on.mixer(x, m)[0, 0] - on.mixer(y, m)[0, 0]).abs().max() > 1e-4
        torch.testing.assert_close(off.mixer(x, m)[0, 0], off.mixer(y, m)[0, 0])
        torch.testing.assert_close(off.mixer(x, m), off.mixer.proj(x))


def test_alpha_reduces_to_one_loss():
    for alpha, key in [(1.0, "loss_cls"), (0.0, "loss_gen")]:
        model, _ = tiny(f"model.alpha={alpha}", "model.bag_mix=0")
        out = model(make_batch(model, bags(), [0, 1, 1], CAPTIONS))
        assert getattr(out, key) > 0
        torch.testing.assert_close(out.loss.detach(), getattr(out, key))
    model, _ = tiny("model.alpha=0.5")
    out = model(make_batch(model, bags(), [0, 1, 1], CAPTIONS))
    torch.testing.assert_close(out.loss.detach(), 0.5 * out.loss_cls + 0.5 * out.loss_gen + 1.0 * out.loss_mix)
    assert out.loss_mix > 0  # demo.yaml: bag_mix 1.0
    assert model.eval()(make_batch(model, bags(), [0, 1, 1], CAPTIONS)).loss_mix is None  # training only


def test_slides_without_label_or_caption_contribute_no_loss():
    model, _ = tiny(*NO_DROPOUT, "model.aggregator.text_input=never")
    out = model(make_batch(model, bags(), [-100] * 3, [None] * 3))
    assert out.loss_cls == 0 and out.loss_gen == 0
    out.loss.backward()  # the graph stays connected
    full = model(make_batch(model, bags(), [0, -100, -100], [None, CAPTIONS[1], None]))
    one = model(make_batch(model, bags()[:1], [0], [None]))
    torch.testing.assert_close(full.loss_cls, one.loss_cls, atol=1e-5, rtol=0)


def test_generation_beam_and_sampling_return_one_caption_per_bag():
    model, _ = tiny()
    model.eval()
    feats, mask = pad_bags(bags())
    beams = model.generate_captions(feats, mask, num_beams=2, max_new_tokens=5)
    sampled = model.generate_captions(feats, mask, do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=5)
    assert len(beams) == len(sampled) == 3 and all(isinstance(c, str) for c in beams + sampled)


def test_patch_scores_are_attention_distributions():
    model, _ = tiny()
    model.eval()
    feats, mask = pad_bags(bags())
    s = model.patch_scores(feats, mask)
    assert s.shape == mask.shape
    assert torch.all(s[~mask] == 0) and torch.all(s[mask] > 0)
    torch.testing.assert_close(s.sum(1), torch.ones(3), atol=1e-4, rtol=0)
    per_query = model.patch_scores(feats, mask, per_query=True)
    assert per_query.shape == (3, model.cfg.aggregator.num_queries, mask.shape[1])
    torch.testing.assert_close(per_query.mean(1), s)


# ---------------------------------------------------------------------------------------------
# Checkpoints and pretrained folders


def test_checkpoint_round_trip_is_identical(tmp_path):
    model, cfg = tiny("model.captioner.finetune=full")
    randomise_correlation(model)
    model.eval()
    path = save_checkpoint(model, tmp_path / "model.safetensors", cfg, ["benign", "tumour"], model.captioner.tokenizer)
    loaded, cfg2, classes = load_checkpoint(path)
    assert classes == ["benign", "tumour"] and cfg2 == cfg and not loaded.training
    feats, mask = pad_bags(bags())
    with torch.no_grad():
        torch.testing.assert_close(loaded.classify(feats, mask, CAPTIONS), model.classify(feats, mask, CAPTIONS))
        torch.testing.assert_close(loaded.patch_scores(feats, mask), model.patch_scores(feats, mask))
    assert loaded.generate_captions(feats, mask, max_new_tokens=6) == model.generate_captions(feats, mask, max_new_tokens=6)


def test_first_release_checkpoint_loads_with_identical_outputs():
    """tests/data/legacy_v1.safetensors was written by the first release (one PathM3 class,
    format pathm3-checkpoint-1); it loads into the parts and gives the outputs that release gave."""
    import json

    data = REPO / "tests" / "data"
    model, cfg, classes = load_checkpoint(data / "legacy_v1.safetensors")
    expected = json.loads((data / "legacy_v1_expected.json").read_text())
    feats, mask = torch.tensor(expected["features"]), torch.tensor(expected["mask"])
    assert classes == ["benign", "adenocarcinoma"] and cfg.model.mixer.type == "nystrom"
    with torch.no_grad():
        torch.testing.assert_close(model.classify(feats, mask), torch.tensor(expected["logits"]), atol=1e-6, rtol=0)
        torch.testing.assert_close(model.classify(feats, mask, expected["captions"]),
                                   torch.tensor(expected["logits_text"]), atol=1e-6, rtol=0)
        torch.testing.assert_close(model.patch_scores(feats, mask), torch.tensor(expected["scores"]), atol=1e-6, rtol=0)
    assert model.generate_captions(feats, mask, num_beams=2, max_new_tokens=6) == expected["generated"]


def test_checkpoint_from_another_config_is_refused(tmp_path):
    from pathm3.pretrained import load_trainable_state

    model, cfg = tiny()
    path = save_checkpoint(model, tmp_path / "m.safetensors", cfg, ["a", "b"])
    other, _ = tiny("model.aggregator.num_queries=4")
    from safetensors.torch import load_file

    with pytest.raises(DataError, match="aggregator.query_tokens has shape .* trained with another config"):
        load_trainable_state(other, load_file(str(path)), str(path))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a PathM3 checkpoint"):
        load_checkpoint(tmp_path / "junk.safetensors")


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    """A tiny BLIP-2 FlanT5 and a tiny BLIP-2 ITM checkpoint, saved as real downloads are."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
                              Blip2QFormerConfig, Blip2VisionConfig, T5Config)

    root = tmp_path_factory.mktemp("weights")
    tok = build_word_tokenizer(CAPTIONS, 100)
    vision = Blip2VisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, image_size=28, patch_size=14).to_dict()
    qf = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              encoder_hidden_size=48, vocab_size=100, cross_attention_frequency=2)
    t5 = T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
    torch.manual_seed(0)
    gen = Blip2ForConditionalGeneration(Blip2Config(
        vision_config=vision, qformer_config=Blip2QFormerConfig(**qf).to_dict(),
        text_config=t5.to_dict(), num_query_tokens=4))
    gen.save_pretrained(root / "blip2-flan-t5")
    tok.save_pretrained(root / "blip2-flan-t5")
    itm = Blip2ForImageTextRetrieval(Blip2Config(
        vision_config=vision, qformer_config=Blip2QFormerConfig(**qf, use_qformer_text_input=True).to_dict(),
        num_query_tokens=4, image_text_hidden_size=16))
    itm.save_pretrained(root / "blip2-itm")
    tok.save_pretrained(root / "bert")
    return root, gen, itm


def test_tiny_blip2_folders_load_through_the_real_code_path(tiny_blip2):
    root, gen, itm = tiny_blip2
    cfg = tiny_config(
        "model.feature_dim=24", "model.mixer.hidden_dim=48", "model.aggregator.num_queries=4",
        f"model.aggregator.pretrained={root / 'blip2-flan-t5'}", f"model.aggregator.text_pretrained={root / 'blip2-itm'}",
        f"model.aggregator.tokenizer={root / 'bert'}", f"model.captioner.pretrained={root / 'blip2-flan-t5'}",
        "model.captioner.finetune=frozen", classes=("a", "b", "c"))
    model = build_model(cfg)
    agg, cap = model.aggregator, model.captioner
    g, i = gen.state_dict(), itm.state_dict()
    torch.testing.assert_close(agg.query_tokens, g["query_tokens"])
    torch.testing.assert_close(agg.qformer.state_dict()["encoder.layer.1.output_query.dense.weight"],
                               g["qformer.encoder.layer.1.output_query.dense.weight"])
    torch.testing.assert_close(cap.language_projection.weight, g["language_projection.weight"])
    torch.testing.assert_close(cap.t5.state_dict()["lm_head.weight"], g["language_model.lm_head.weight"])
    torch.testing.assert_close(agg.text_embeddings.word_embeddings.weight, i["embeddings.word_embeddings.weight"])
    torch.testing.assert_close(agg.qformer.state_dict()["encoder.layer.0.intermediate.dense.weight"],
                               i["qformer.encoder.layer.0.intermediate.dense.weight"])
    assert all(not p.requires_grad for p in cap.t5.parameters())
    out = model(make_batch(model, bags(d=24), [0, 1, 2], CAPTIONS))
    assert torch.isfinite(out.loss)
    feats, mask = pad_bags(bags(d=24))
    model.eval()
    captions = model.generate_captions(feats, mask, max_new_tokens=4)
    assert len(captions) == 3

    # The frozen FlanT5 is not stored: the checkpoint holds what was trained, and loading reads
    # the T5 from its folder again, giving the same outputs.
    from safetensors import safe_open

    path = save_checkpoint(model, root / "ckpt.safetensors", cfg)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith("captioner.t5.") for k in keys)
    assert any(k.startswith("aggregator.qformer.") for k in keys) and "captioner.language_projection.weight" in keys
    loaded, _, _ = load_checkpoint(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.classify(feats, mask, CAPTIONS), model.classify(feats, mask, CAPTIONS))
    assert loaded.generate_captions(feats, mask, max_new_tokens=4) == captions


def test_missing_weights_name_folder_and_download(tmp_path):
    cfg = load_config(REPO / "configs" / "pathm3_patchgastric.yaml",
                      [f"model.aggregator.pretrained={tmp_path / 'blip2-flan-t5-xl'}"])
    with pytest.raises(MissingWeightsError) as err:
        build_model(cfg)
    assert str(tmp_path / "blip2-flan-t5-xl") in str(err.value)
    assert "Salesforce/blip2-flan-t5-xl" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Learning where to look


def test_learns_from_two_percent_of_patches_and_generalises():
    from sklearn.linear_model import LogisticRegression

    train, ytr = signal_bags(100, seed=1)
    test, yte = signal_bags(200, seed=2)
    pooled = LogisticRegression(max_iter=2000).fit(np.stack([b.mean(0).numpy() for b in train]), ytr)
    mean_pool_acc = pooled.score(np.stack([b.mean(0).numpy() for b in test]), yte)
    assert mean_pool_acc < 0.65  # the cohort is not solvable by averaging

    cfg = tiny_config("model.feature_dim=32", "model.captioner.type=none", "model.alpha=1.0",
                      "model.aggregator.text_input=never")
    torch.manual_seed(0)
    model = build_model(cfg)
    fit(model, cfg, len(train), lambda idx: make_batch(model, [train[i] for i in idx], ytr[idx]), 300, clip=True)
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model.classify(*pad_bags(test[i:i + 50])).argmax(1) for i in range(0, len(test), 50)])
    accuracy = (preds == yte).float().mean().item()
    assert accuracy >= 0.9, f"held-out accuracy {accuracy:.3f} (mean pooling: {mean_pool_acc:.3f})"
