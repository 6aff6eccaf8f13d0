"""Heads: class logits from the aggregator's K tokens, and their loss.

PathM3's classifier (paper §3.2): one linear layer applied to every token, logits averaged over
the K tokens. With a single-token aggregator (ABMIL, CLAM, ...) this is their plain linear
classifier. ``single_label`` trains with cross-entropy and predicts the argmax; ``multi_label``
trains with a binary cross-entropy per class, masked where the label is unknown, and predicts
every class whose probability reaches its threshold.

With ``captioner_token`` the captioner also reads the predicted class (the argmax of the head's
logits averaged with any instance or prototype stream; multi-label: every class at p >= 0.5) as
one more token, Linear(C, Q)(one-hot). In training the token holds the slide's label where it is
known, so the captioner learns to name the class the token names; at inference it holds the
prediction, so the caption names the predicted class. No gradient flows through it: the
generation loss does not train the classifier. Why: where a class is carried by 1-2 patches of
a bag, the classifier's streams find it more often than the captioner's tokens show it, and the
caption named another class than the prediction on 6.5% of test slides; a token of the class
*probabilities* did not help (uncertain slides, p ~0.5, are unlike the confident training slides)
(``benchmarks/known_truth.py``).

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
    captioner_token: bool = False  # the captioner also reads the predicted class (the label in training) as a token


class LinearHead(nn.Module):
    """Linear(Q, C) on each of the K tokens, logits averaged over K."""

    Config = HeadConfig
    multilabel = False

    def __init__(self, cfg: HeadConfig, in_dim: int, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(in_dim, num_classes)
        self.to_captioner = nn.Linear(num_classes, in_dim) if cfg.captioner_token else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, K, Q) -> (B, C)
        return self.classifier(self.dropout(tokens)).mean(dim=1)

    def caption_token(self, logits: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, Q) the predicted classes of ``logits`` (B, C), one-hot, as a token for the captioner;
        where ``targets`` (B, C) are known (not NaN), they replace the prediction."""
        classes = self.predicted(logits.detach())  # (B, C) 1/0
        if targets is not None:
            classes = torch.where(targets.isnan(), classes, (targets > 0).to(classes.dtype))
        return self.to_captioner(classes.to(logits.dtype))[:, None, :]

    def predicted(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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

    def predicted(self, logits: torch.Tensor) -> torch.Tensor:  # (B, C) one-hot of the argmax
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()


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

    def predicted(self, logits: torch.Tensor) -> torch.Tensor:  # (B, C) 1 where p >= 0.5
        return (logits >= 0).float()
