"""``model.bag_mix``: pairs of bags merged into one, whose target is both bags' classes, teach every
class to be found by its own patches, not by the absence of the other classes' patches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_batch, tiny_config
from pathm3.compare import variant
from pathm3.parts.heads import HeadConfig, SingleLabelHead
from pathm3.pretrained import build_model
from pathm3.text import build_word_tokenizer

CLASSES = ("a", "b", "c")


def test_a_soft_target_is_read_as_a_distribution():
    head = SingleLabelHead(HeadConfig(), 4, 3)
    logits = torch.randn(2, 3)
    one_hot = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(head.loss(logits, one_hot), F.cross_entropy(logits, torch.tensor([1, 0])))
    half = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    expected = 0.5 * (F.cross_entropy(logits, torch.tensor([0, 0])) + F.cross_entropy(logits, torch.tensor([1, 1])))
    torch.testing.assert_close(head.loss(logits, half), expected)


def _bags(n: int, strengths=(6.0, 6.0, 4.0), needles: bool = True, seed: int = 0):
    """n bags of 50 patches; class k puts strengths[k] * e_k on 3 patches (class c: the faintest)."""
    g = torch.Generator().manual_seed(seed)
    bags, labels = [], []
    for i in range(n):
        k = i % 3
        b = torch.randn(50, 64, generator=g)
        if needles:
            b[torch.randperm(50, generator=g)[:3], k] += strengths[k]
        bags.append(b)
        labels.append(k)
    return bags, labels


def _trained(bag_mix: float, tmp_path) -> torch.nn.Module:
    cfg = variant(tiny_config("model.alpha=1.0", "model.captioner.type=none", "model.patch_dropout=0",
                              f"model.bag_mix={bag_mix}", classes=CLASSES), "abmil", tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg, None)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    bags, labels = _bags(96)
    for step in range(300):
        i = [(step * 8 + j) % 96 for j in range(8)]
        loss = model(make_batch(model, [bags[k] for k in i], [labels[k] for k in i])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("bag_mix", [0.0, 1.0])
def test_bag_mix_makes_every_class_rest_on_its_own_patches(bag_mix, tmp_path):
    """Class c's needles are the faintest, so without bag_mix the model learns c as the absence of
    a's and b's: a bag holding a's and c's patches is called a alone. With bag_mix it names both."""
    model = _trained(bag_mix, tmp_path)
    bags, labels = _bags(30, seed=1)
    merged = [torch.cat([bags[i], bags[i + 2]]) for i in range(0, 30, 3)]  # class a's bag + class c's bag
    with torch.no_grad():
        p = model.classify(*_padded(model, bags)).softmax(-1)  # (30, 3)
        q = model.classify(*_padded(model, merged)).softmax(-1)  # (10, 3)
    assert (p.argmax(-1) == torch.tensor(labels)).float().mean() >= 0.9  # each bag alone: classified
    named = torch.minimum(q[:, 0], q[:, 2]).median()  # how well the merged bag names both classes
    if bag_mix:
        assert named > 0.2 and q[:, 2].mean() > 0.3  # c's faint patches count beside a's strong ones
    else:  # the shortcut bag_mix removes: c is "neither a nor b", its own patches barely count
        assert named < 0.05 and q[:, 2].mean() < 0.15


def _padded(model, bags):
    batch = make_batch(model, bags)
    return batch.features, batch.mask


def test_a_merged_bag_is_each_bag_then_its_partner_with_both_findings(tmp_path):
    """Multi-label: the merged bag's target is either bag's findings (their union); single-label:
    half each. Checked against the model's own classify() on the concatenated bags."""
    for head, targets, merged in [
        ("multi_label", [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]),
        ("single_label", [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]]),
    ]:
        cfg = tiny_config("model.captioner.type=none", f"data.multilabel={head == 'multi_label'}",
                          "model.patch_dropout=0", "model.aggregator.dropout=0", "model.mixer.dropout=0",
                          "model.head.dropout=0")
        torch.manual_seed(0)
        model = build_model(cfg, build_word_tokenizer(["tubular adenocarcinoma"])).eval()
        bags = [torch.randn(n, 64) for n in (30, 20, 25)]
        batch = make_batch(model, bags, torch.tensor(targets))
        with torch.no_grad():
            got = model._mixed_loss(batch.features, batch.mask, batch.targets)
            partner = [2, 0, 1]  # each bag is merged with the one before it (torch.roll by 1)
            logits = torch.cat([model.classify(*_padded(model, [torch.cat([bags[i], bags[partner[i]]])]))
                                for i in range(3)])  # (3, 2)
            expected = model.head.loss(logits, torch.tensor(merged))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
