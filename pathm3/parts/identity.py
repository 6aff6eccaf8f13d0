"""``none`` mixer: patches do not exchange information (the paper's "without correlation"
ablation, and every classic MIL baseline). An optional linear projection sets the width."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from pathm3.parts.base import Mixer, PartConfig


class IdentityConfig(PartConfig):
    """No mixing; ``hidden_dim`` projects D -> hidden_dim first (null: keep D)."""

    type: Literal["none"] = "none"
    hidden_dim: int | None = Field(None, gt=0)


class IdentityMixer(Mixer):
    Config = IdentityConfig

    def __init__(self, cfg: IdentityConfig, in_dim: int):
        super().__init__(cfg, in_dim)
        self.out_dim = cfg.hidden_dim or in_dim
        self.proj = nn.Identity() if self.out_dim == in_dim else nn.Linear(in_dim, self.out_dim)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(feats) * mask[..., None]  # (B, M, H), zeros at padding
