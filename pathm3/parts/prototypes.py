"""Mined prototypes, ``train.prototypes``: directions read off the training bags before training
score every patch for every class (and caption term), and their pooled scores are a second stream.

Why: where a class is carried by one or two patches of a few hundred, nothing gradient-trained
learns it from ~100 training bags. A bag-level loss moves attention only once attention has
found the patches, and a per-patch classifier trained on patches mined from the bags fits its
~36 positives per class with noise directions (fewer positives than feature dimensions):
on the known-truth cohort "small 0.5%" (``benchmarks/known_truth.py``, draw 0), test accuracy
0.44 for PathM3 and 0.53-0.58 for a logistic per-patch classifier on the mined patches. The
mean of the mined patches, against the mean of patches of bags without the class, generalises:
the same mined patches, pooled as below, read 1.00 of the test slides. So the directions are
not trained: they are a statistic of the training data, like a normaliser's mean and std,
written into the model by :func:`pathm3.mining.fit_prototypes` and stored with its weights.

What, per patch m and target t (a class, then a caption term; x standardised with the training
patches' mean and std, w_t a unit vector)::

    s_mt = w_t . (x_m - mean) / std                       w_t ~ mean(mined patches of t) - mean(patches mined without t)
    pool_t = log mean_m exp(tau s_mt) / tau               a soft maximum: one patch of 300 decides
    stream (B, C)   = a_cls * pool_classes + b            averaged with the head's logits
    terms  (B, T)  += a_terms * pool_terms + b'           added to the caption-term logits (train.terms)

a and b are calibrated on the training bags before training (:meth:`PrototypeStream.calibrate`),
then trained with the rest (L_cls and the term loss).

With ``enabled: false`` (the default) the model and the losses are unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pathm3.parts.base import PartConfig


class PrototypesConfig(PartConfig):
    """``train.prototypes``: mined before training (:mod:`pathm3.mining`); off by default."""

    enabled: bool = False
    top: int = Field(2, ge=1)  # patches mined per training slide for each class and term it has
    negatives: int = Field(16, ge=0)  # random patches per training slide, the negatives of what it lacks
    quantile: float = Field(1e-4, gt=0, lt=1)  # two patches "match" when their similarity is above all but
    #                                            this share of random pairs of training patches
    reference: int | None = Field(None, ge=1)  # at most this many patches per training slide are matched
    #                                            against (memory and time: all of them by default)
    temperature: float = Field(4.0, gt=0)  # tau of the soft maximum over the patches


class PrototypeStream(nn.Module):
    """Per-patch scores of C classes and T terms along mined directions, pooled per bag.

    The directions, mean and std are buffers (filled by :meth:`set_directions` before training,
    restored from a checkpoint); only the stream's scales and biases are trained."""

    def __init__(self, cfg: PrototypesConfig, feature_dim: int, num_classes: int, num_terms: int = 0):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        n = num_classes + num_terms
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))
        self.register_buffer("directions", torch.zeros(n, feature_dim))  # (C + T, D), unit rows (0: none mined)
        self.scale = nn.Parameter(torch.ones(2))  # a_cls, a_terms
        self.bias = nn.Parameter(torch.zeros(n))

    @torch.no_grad()
    def set_directions(self, mean: torch.Tensor, std: torch.Tensor, directions: torch.Tensor) -> None:
        """Write the mined statistics: ``mean``, ``std`` (D,) and ``directions`` (C + T, D)."""
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.directions.copy_(directions)

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        """(B, M, C + T) each patch's score along each direction."""
        z = (features - self.mean) / self.std  # (B, M, D), the dtype of features and buffers combined
        return z @ self.directions.T.to(z.dtype)

    def term_patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, M) each patch's term scores, scaled as in the term stream (a term heatmap)."""
        return self.scale[1] * self.patch_scores(features)[..., self.num_classes:].transpose(1, 2)

    def pooled(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C + T) the soft maximum of each direction's patch scores, before scale and bias."""
        tau = self.cfg.temperature
        s = (tau * self.patch_scores(features)).masked_fill(~mask[..., None], float("-inf"))  # (B, M, C + T)
        n = mask.sum(1).clamp(min=1).to(s.dtype)  # (B,)
        return (s.logsumexp(1) - n.log()[:, None]) / tau

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class stream (B, C), term stream (B, T)) from ``features`` (B, M, D) and ``mask`` (B, M)."""
        z = self._scaled(self.pooled(features, mask), self.scale, self.bias)  # (B, C + T)
        return z[:, :self.num_classes], z[:, self.num_classes:]

    def _scaled(self, pooled: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(B, C + T) ``pooled`` with the class scale on its first C columns, the term scale on the rest, + bias."""
        c = self.num_classes
        return torch.cat([scale[0] * pooled[:, :c], scale[1] * pooled[:, c:]], 1) + bias

    @torch.no_grad()
    def calibrate(self, bags: Sequence[torch.Tensor], targets: torch.Tensor, multilabel: bool,
                  penalty: float = 1e-2) -> None:
        """Fit the scales and biases to the training ``bags`` (M_i, D) and their ``targets`` (N, C + T)
        (1/0, NaN unknown) before training: cross-entropy of the class stream (binary per class when
        ``multilabel``), binary cross-entropy of the term stream, + ``penalty`` * scale^2, which keeps
        the scale finite where the stream separates the training bags (Platt scaling). Training goes
        on from there. (Left at 1, the stream counts no more than the head, which can overfit ~100
        bags: on the small 0.5% known-truth cohort the stream alone read 100% of the test slides,
        averaged with the head 78-92%.)"""
        pooled = torch.cat([self.pooled(b[None].float(), torch.ones((1, len(b)), dtype=torch.bool)) for b in bags])
        c, known = self.num_classes, ~targets.isnan()
        scale, bias = self.scale.detach().clone().requires_grad_(True), self.bias.detach().clone().requires_grad_(True)
        rows = known[:, :c].all(1)  # single-label: slides with a class

        def loss() -> torch.Tensor:
            z = self._scaled(pooled, scale, bias)  # (N, C + T)
            parts = []
            if not multilabel and bool(rows.any()):
                parts.append(F.cross_entropy(z[rows, :c], targets[rows, :c].argmax(1)))
            for lo, hi in [(c, z.shape[1])] + ([(0, c)] if multilabel else []):  # binary: terms (, classes)
                k = known[:, lo:hi]
                if bool(k.any()):
                    parts.append(F.binary_cross_entropy_with_logits(z[:, lo:hi][k], targets[:, lo:hi][k]))
            return sum(parts) + penalty * scale.pow(2).sum()

        opt = torch.optim.LBFGS([scale, bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = loss()
            value.backward()
            return value

        with torch.enable_grad():
            opt.step(closure)
        self.scale.copy_(scale.detach())
        self.bias.copy_(bias.detach())
