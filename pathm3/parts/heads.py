"""Heads: class logits from the aggregator's K tokens, and their loss.

PathM3's classifier (paper §3.2): one linear layer applied to every token, logits averaged over
the K tokens. With a single-token aggregator (ABMIL, CLAM, ...) this is their plain linear
classifier. ``single_label`` trains with cross-entropy and predicts the argmax; ``multi_label``
trains with a binary cross-entropy per class, masked where the label is unknown, and predicts
every class whose probability reaches its threshold.

Targets are (B, C) floats: 1 or 0 per class, NaN where unknown (see :mod:`pathm3.parts.base`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pathm3.parts.base import PartConfig


class HeadConfig(PartConfig):
    """``auto`` follows ``data.multilabel``."""

    type: Literal["auto", "single_label", "multi_label"] = "auto"
    dropout: float = Field(0.1, ge=0, lt=1)  # on the tokens, before the linear layer


class LinearHead(nn.Module):
    """Linear(Q, C) on each of the K tokens, logits averaged over K."""

    Config = HeadConfig
    multilabel = False

    def __init__(self, cfg: HeadConfig, in_dim: int, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(in_dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, K, Q) -> (B, C)
        return self.classifier(self.dropout(tokens)).mean(dim=1)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SingleLabelHead(LinearHead):
    """One class per slide: cross-entropy over the labelled slides, softmax, argmax. A target row
    may be soft (a merged pair of bags: 0.5 on each class), it is read as a distribution."""

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets).any(dim=1)  # (B,)
        if not known.any():
            return logits.sum() * 0.0  # keeps the graph connected (DDP-friendly)
        target = targets[known].float()
        return F.cross_entropy(logits[known].float(), target / target.sum(1, keepdim=True).clamp(min=1e-12))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(dim=-1)


class MultiLabelHead(LinearHead):
    """Several findings per slide: binary cross-entropy on the known (slide, class) entries only."""

    multilabel = True

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)  # (B, C)
        if not known.any():
            return logits.sum() * 0.0
        return F.binary_cross_entropy_with_logits(logits.float()[known], targets[known].float())

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid()
