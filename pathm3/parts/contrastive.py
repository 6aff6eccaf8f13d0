"""Auxiliary image-text alignment (BLIP-2's image-text contrastive objective), ``train.contrastive``.

The slide side is the aggregator's tokens, mean-pooled and projected; the text side is the
aggregator's own encoding of the caption (the Q-Former's text transformer), projected; both are
L2-normalised into one E-dimensional space. Two losses:

- ``clip``: symmetric InfoNCE over the batch (Radford et al. 2021), logit scale learned from
  log(1 / 0.07);
- ``siglip``: a sigmoid loss on every slide-caption pair (Zhai et al. 2023), learned log-temperature
  initialised at log 10 and bias at -10, so the many negatives start with little weight.

Only slides that have a caption take part; a batch with fewer than two gives 0. The trained
projections also give retrieval metrics (``retrieval`` in ``metrics.json``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pathm3.parts.base import PartConfig


class ContrastiveConfig(PartConfig):
    """``train.contrastive``: weight 0 (default) leaves the model and the loss as in the paper."""

    weight: float = Field(0.0, ge=0)  # L += weight * L_contrastive
    loss: Literal["clip", "siglip"] = "clip"
    dim: int = Field(256, ge=1)  # E, the shared embedding width (BLIP-2: 256)


class ContrastiveAlignment(nn.Module):
    """Projections of slide tokens (B, K, Q) and caption encodings (B, Q) into a shared (B, E) space."""

    def __init__(self, cfg: ContrastiveConfig, width: int):
        super().__init__()
        self.cfg = cfg
        self.slide_proj = nn.Linear(width, cfg.dim)
        self.text_proj = nn.Linear(width, cfg.dim)
        if cfg.loss == "clip":
            self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            self.register_parameter("bias", None)
        else:
            self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.bias = nn.Parameter(torch.tensor(-10.0))

    def slide(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.slide_proj(tokens.mean(1)).float(), dim=-1)  # (B, K, Q) -> (B, E)

    def text(self, encoded: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(encoded).float(), dim=-1)  # (B, Q) -> (B, E)

    def loss(self, slides: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """The configured loss of matched rows (slides[i] belongs with texts[i])."""
        n = slides.shape[0]
        logits = slides @ texts.T * self.log_scale.exp().clamp(max=100)  # (n, n)
        if self.cfg.loss == "clip":
            target = torch.arange(n, device=logits.device)
            return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        signs = 2 * torch.eye(n, device=logits.device) - 1  # +1 matched, -1 every other pair
        return -F.logsigmoid(signs * (logits + self.bias)).sum() / n


def recall_at(similarity: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k of row i finding column i among all columns, for a square (n, n) similarity."""
    rank = (similarity > similarity.diagonal()[:, None]).sum(1)  # (n,) 0: the match comes first
    return {f"r@{k}": float((rank < k).float().mean()) for k in ks}
