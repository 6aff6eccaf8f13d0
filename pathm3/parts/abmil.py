"""Attention-based MIL (ABMIL): Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance
Learning", ICML 2018.

Each patch is embedded (Linear + ReLU, the last feature layer of the paper's networks), a small
network scores it, and the bag is the attention-weighted mean of the embeddings::

    h_i = ReLU(W x_i)                                         (M, L)     L = embed_dim = 500
    a_i = softmax_i( w^T (tanh(V h_i) * sigmoid(U h_i)) )     (M,)       V, U: L -> attn_dim = 128
    z   = sum_i a_i h_i                                       (L,)       the one token

Published sizes: L = 500, attention hidden 128, gated (the paper's best variant). ``gated: false``
gives the plain tanh attention of the same paper. Scores are the attention weights a_i.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from pathm3.parts.base import Aggregator, AggregatorOutput, PartConfig, TextBatch, masked_softmax


class ABMILConfig(PartConfig):
    type: Literal["abmil"] = "abmil"
    embed_dim: int = Field(500, gt=0)  # L: width of the patch embedding and of the token (paper: 500)
    attn_dim: int = Field(128, gt=0)  # hidden width of the attention network (paper: 128)
    gated: bool = True  # tanh * sigmoid gate (paper's best); False: tanh only
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the embedding (paper: none)


class ABMIL(Aggregator):
    Config = ABMILConfig
    num_tokens = 1

    def __init__(self, cfg: ABMILConfig, in_dim: int, num_classes: int):
        super().__init__(cfg, in_dim, num_classes)
        self.out_dim = cfg.embed_dim
        self.embed = nn.Sequential(nn.Linear(in_dim, cfg.embed_dim), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.attn_v = nn.Linear(cfg.embed_dim, cfg.attn_dim)  # tanh branch
        self.attn_u = nn.Linear(cfg.embed_dim, cfg.attn_dim) if cfg.gated else None  # sigmoid gate
        self.attn_w = nn.Linear(cfg.attn_dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None,
                text: TextBatch | None = None) -> AggregatorOutput:
        x = x.masked_fill(~mask[..., None], 0.0)  # (B, M, D) padding can hold anything
        h = self.embed(x)  # (B, M, L)
        g = torch.tanh(self.attn_v(h))  # (B, M, A)
        if self.attn_u is not None:
            g = g * torch.sigmoid(self.attn_u(h))  # (B, M, A)
        a = masked_softmax(self.attn_w(g).squeeze(-1), mask)  # (B, M), 0 at padding
        z = torch.einsum("bm,bml->bl", a, h)  # (B, L)
        return AggregatorOutput(tokens=z[:, None], scores=a)  # tokens (B, 1, L)
