"""``nystrom`` mixer: PathM3's correlation module (paper §3.1), E = MSA(LN(E)) + E with Nyström
self-attention, over each bag's real patches.

Each bag runs alone at its true length: the Nyström landmarks are segment means whose segments
depend on the sequence length, and the pseudo-inverse is scaled by a batch-wide maximum, so
running a padded batch would make a bag's output depend on its padding and its neighbours.

The attention is :class:`~pathm3.parts.lean_nystrom.LeanNystromAttention`: the maths (and the
state-dict keys) of ``nystrom_attention.NystromAttention``, computed in chunks of ``chunk_size``
patches and recomputed in backward, so a training step's memory grows with the bag only through
its input and output (1.4 GB forward+backward at 100k patches, width 1408; the package needs
11 GB). ``tests/test_lean_nystrom.py`` checks it against the package, forward and gradients.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from pathm3.parts.base import Mixer, PartConfig
from pathm3.parts.lean_nystrom import LeanNystromAttention


class NystromConfig(PartConfig):
    """Nyström self-attention over the bag (paper Table 6 defaults)."""

    type: Literal["nystrom"] = "nystrom"
    hidden_dim: int = Field(1408, gt=0)  # width H of the correlated patches (= the aggregator's input)
    layers: int = Field(1, ge=1)
    heads: int = Field(8, ge=1)
    landmarks: int = Field(256, ge=1)
    pinv_iterations: int = Field(6, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    chunk_size: int = Field(2048, ge=1)  # patches per chunk of the attention: speed/memory only, same result
    # The attention's residual depthwise convolution over the patch sequence (nystrom_attention's
    # residual=True, kernel 33): it mixes each patch with its 32 neighbours in bag order.
    residual_conv: bool = True

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.hidden_dim % self.heads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be a multiple of heads ({self.heads})")
        return self


class NystromBlock(nn.Module):
    """One pre-norm residual Nyström self-attention layer: E = MSA(LN(E)) + E."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int, dropout: float, chunk_size: int,
                 residual_conv: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = LeanNystromAttention(dim=dim, dim_head=dim // heads, heads=heads, num_landmarks=landmarks,
                                         pinv_iterations=pinv_iterations, residual=residual_conv, dropout=dropout,
                                         chunk_size=chunk_size)
        # Zero-initialised output: the block starts as the identity and only learns to mix
        # patches when that lowers the loss, which keeps small cohorts from memorising noise.
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (1, n, H) -> (1, n, H)
        return x + self.attn(self.norm(x))


class NystromMixer(Mixer):
    """Input projection D -> H (identity when D == H), then ``layers`` Nyström blocks."""

    Config = NystromConfig

    def __init__(self, cfg: NystromConfig, in_dim: int):
        super().__init__(cfg, in_dim)
        self.out_dim = cfg.hidden_dim
        self.proj = nn.Identity() if in_dim == cfg.hidden_dim else nn.Linear(in_dim, cfg.hidden_dim)
        self.blocks = nn.ModuleList(
            NystromBlock(cfg.hidden_dim, cfg.heads, cfg.landmarks, cfg.pinv_iterations, cfg.dropout, cfg.chunk_size,
                         cfg.residual_conv)
            for _ in range(cfg.layers)
        )

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(feats)  # (B, M, H)
        if x.shape[0] == 1 and bool(mask.all()):  # one unpadded bag (whole-slide training): no copies
            for block in self.blocks:
                x = block(x)
            return x
        out = torch.zeros_like(x)
        for b in range(x.shape[0]):
            e = x[b, mask[b]].unsqueeze(0)  # (1, n_b, H): this bag's real patches
            for block in self.blocks:
                e = block(e)
            out[b, mask[b]] = e[0]
        return out  # (B, M, H), zeros at padding
