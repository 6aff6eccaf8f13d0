"""Mean and max pooling over the real patches of a bag: the parameter-free MIL baselines.

    mean:  z = 1/n sum_i x_i          scores: 1/n on every real patch
    max:   z_d = max_i x_id           scores: for each patch, the fraction of the D feature
                                      dimensions where it is the maximum (they sum to 1)

One token of width D (the input width). Mean pooling sees nothing when the telling patches are
rare and the bag is re-centred (``pathm3.synthetic``); it is the chance-level reference.
"""

from __future__ import annotations

from typing import Literal

import torch

from pathm3.parts.base import Aggregator, AggregatorOutput, PartConfig, TextBatch


class MeanPoolConfig(PartConfig):
    type: Literal["mean"] = "mean"


class MaxPoolConfig(PartConfig):
    type: Literal["max"] = "max"


class MeanPool(Aggregator):
    Config = MeanPoolConfig
    num_tokens = 1

    def __init__(self, cfg: MeanPoolConfig, in_dim: int, num_classes: int):
        super().__init__(cfg, in_dim, num_classes)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None,
                text: TextBatch | None = None) -> AggregatorOutput:
        w = mask.to(x.dtype)  # (B, M)
        w = w / w.sum(1, keepdim=True).clamp(min=1.0)  # (B, M) 1/n on real patches
        z = torch.einsum("bm,bmd->bd", w, x.masked_fill(~mask[..., None], 0.0))  # (B, D)
        return AggregatorOutput(tokens=z[:, None], scores=w)


class MaxPool(Aggregator):
    Config = MaxPoolConfig
    num_tokens = 1

    def __init__(self, cfg: MaxPoolConfig, in_dim: int, num_classes: int):
        super().__init__(cfg, in_dim, num_classes)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None,
                text: TextBatch | None = None) -> AggregatorOutput:
        x = x.masked_fill(~mask[..., None], float("-inf"))  # (B, M, D)
        z, idx = x.max(dim=1)  # (B, D) and the winning patch of each dimension (B, D)
        wins = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)  # (B, M)
        wins.scatter_add_(1, idx, torch.ones_like(z))  # (B, M) dimensions won by each patch
        return AggregatorOutput(tokens=z[:, None], scores=wins / x.shape[-1])
