"""Mining the training bags, before training, for the patches that carry each class and caption
term, and the prototype directions they give (``train.prototypes``, :mod:`pathm3.parts.prototypes`):
labels for single patches from the slides' own labels.

A patch that carries class c looks like patches of *other* training bags of class c and unlike
those of bags without c; a background patch matches both alike. So, with features standardised
over the training patches and "match" meaning a dot product above the similarity that a share
``quantile`` of random patch pairs exceed::

    excess_t(x) = matches(x, patches of other bags with t) / their count
                - matches(x, patches of other bags without t) / their count       t: a class or a term

Each training bag's ``top`` patches by excess for every class and term it has (and a positive
excess) are labelled 1 for it; they and ``negatives`` random patches of the bag are labelled 0
for every class and term the bag lacks; every other entry is unknown (NaN). The bag's own
patches are left out of its matches, so a patch cannot vouch for itself. A target's prototype
direction is the mean of its positives minus the mean of its negatives, standardised, unit length.

Cost: every training bag's patches against every other's, in chunks; O(N^2 D) for N training
patches, on the CPU (measured on one thread of a 2-core machine shared with other jobs: 108 bags
of 200-400 64-d patches, 32k patches, 9 s; 108 bags of 1,000-2,000, 163k patches, 19 min).
``reference`` caps the patches per bag that are matched against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pathm3.bags import read_bag
from pathm3.manifest import Slide
from pathm3.parts.prototypes import PrototypesConfig, PrototypeStream
from pathm3.parts.terms import contains


@dataclass
class PatchLabels:
    """One training bag's mined patches: their rows in the bag and their labels (1, 0 or NaN per
    class, then per caption term)."""

    index: torch.Tensor  # (k,) long, rows of the bag as read
    labels: torch.Tensor  # (k, C + T) float


@dataclass
class Prototypes:
    """What mining gives the model: the training patches' ``mean`` and ``std`` (D,), a unit
    direction per target (T, D) (a row of 0 where nothing was mined), and the labels behind them."""

    mean: torch.Tensor
    std: torch.Tensor
    directions: torch.Tensor
    labels: list[PatchLabels]  # per training bag


def match_thresholds(patches: torch.Tensor, quantiles: Sequence[float], rng: np.random.Generator) -> torch.Tensor:
    """(Q,) the dot product that a share ``quantiles`` of 200,000 random pairs of ``patches`` (N, D) exceed."""
    pairs = torch.from_numpy(rng.integers(len(patches), size=(200_000, 2)))
    similarity = (patches[pairs[:, 0]] * patches[pairs[:, 1]]).sum(1)
    return torch.quantile(similarity, torch.tensor([1 - q for q in quantiles], dtype=similarity.dtype))


def mine_patches(bags: Sequence[np.ndarray], targets: np.ndarray, cfg: PrototypesConfig, seed: int = 0,
                 progress: bool = True, chunk: int = 256) -> Prototypes:
    """Labels of single patches of ``bags`` (M_i, D) from their bag-level ``targets`` (N, T): 1/0,
    NaN unknown; and the prototype direction of each target."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    raw = [torch.from_numpy(np.asarray(b, dtype=np.float32)) for b in bags]
    n = sum(len(b) for b in raw)
    mean = sum(b.sum(0) for b in raw) / n  # (D,) over every training patch, without a copy of them all
    std = (sum(((b - mean) ** 2).sum(0) for b in raw) / max(n - 1, 1)).sqrt() + 1e-6
    standard = [(b - mean) / std for b in raw]
    reference, owner = [], []
    for i, b in enumerate(standard):  # the patches every bag is matched against
        keep = b if cfg.reference is None or len(b) <= cfg.reference else \
            b[torch.from_numpy(rng.choice(len(b), cfg.reference, replace=False))]
        reference.append(keep)
        owner.append(torch.full((len(keep),), i))
    ref, owner = torch.cat(reference), torch.cat(owner)  # (N, D), (N,)
    threshold = match_thresholds(ref, [cfg.quantile], rng)[0]
    y = torch.from_numpy(np.asarray(targets, dtype=np.float32))  # (N_bags, T)
    groups = torch.cat([(y == 1).float(), (y == 0).float()], dim=1)[owner]  # (N, 2T): with t, without t
    sizes = groups.sum(0)  # (2T,)
    out = []
    for i, bag in enumerate(tqdm(standard, desc="mining patches", unit="bag", disable=not progress, leave=False)):
        own = owner == i
        others = sizes - groups[own].sum(0)  # (2T,) patches of the other bags in each group
        hits = torch.cat([((rows @ ref.T > threshold) & ~own).float() @ groups for rows in bag.split(chunk)])
        rate = hits / others.clamp(min=1)  # (M, 2T)
        excess = rate[:, :y.shape[1]] - rate[:, y.shape[1]:]  # (M, T)
        out.append(_bag_labels(excess, y[i], cfg, rng))
    return Prototypes(mean, std, _directions(standard, out, y.shape[1]), out)


def _directions(standard: Sequence[torch.Tensor], labels: Sequence[PatchLabels], n_targets: int) -> torch.Tensor:
    """(T, D) per target: mean of its positive patches minus mean of its negatives, unit length."""
    x = torch.cat([b[p.index] for b, p in zip(standard, labels)])  # (k, D) every labelled patch
    y = torch.cat([p.labels for p in labels]) if labels else torch.zeros((0, n_targets))  # (k, T)
    out = torch.zeros((n_targets, x.shape[1]))
    for t in range(n_targets):
        pos, neg = x[y[:, t] == 1], x[y[:, t] == 0]
        if len(pos) and len(neg):
            w = pos.mean(0) - neg.mean(0)
            out[t] = w / w.norm().clamp(min=1e-12)
    return out


def _bag_labels(excess: torch.Tensor, target: torch.Tensor, cfg: PrototypesConfig,
                rng: np.random.Generator) -> PatchLabels:
    """One bag's labels from its patches' ``excess`` (M, T) and its ``target`` (T,)."""
    m, n_targets = excess.shape
    base = torch.where(target == 0, 0.0, float("nan"))  # (T,) the row of a patch mined for nothing
    rows: dict[int, torch.Tensor] = {}
    for t in torch.nonzero(target == 1)[:, 0].tolist():
        best = torch.argsort(excess[:, t], descending=True, stable=True)[:cfg.top]
        for r in best[excess[best, t] > 0].tolist():
            rows.setdefault(r, base.clone())[t] = 1.0
    rest = np.setdiff1d(np.arange(m), list(rows))
    for r in rng.choice(rest, min(cfg.negatives, len(rest)), replace=False).tolist():
        rows[r] = base.clone()
    index = sorted(rows)
    labels = torch.stack([rows[r] for r in index]) if index else torch.zeros((0, n_targets))
    return PatchLabels(torch.tensor(index, dtype=torch.long), labels)


def fit_prototypes(stream: PrototypeStream, slides: Sequence[Slide], terms: Sequence[str], multilabel: bool,
                   seed: int = 0, progress: bool = True) -> Prototypes:
    """Mine the training ``slides`` and write the prototypes into ``stream``: directions per class
    (the slides' targets), then per caption term in ``terms`` (whether each caption contains it;
    unknown for a slide without a caption), and the stream's scales and biases calibrated on them."""
    bags = [read_bag(s.bag_path, dtype="float32", with_attrs=False).features for s in slides]
    targets = torch.tensor([s.targets for s in slides], dtype=torch.float32)  # (N, C)
    if terms:
        targets = torch.cat([targets, contains([s.caption for s in slides], terms)], dim=1)  # (N, C + T)
    found = mine_patches(bags, targets.numpy(), stream.cfg, seed, progress)
    stream.set_directions(found.mean, found.std, found.directions)
    stream.calibrate([torch.from_numpy(b) for b in bags], targets, multilabel)
    return found
