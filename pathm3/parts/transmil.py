"""TransMIL: Shao et al., "TransMIL: Transformer based Correlated Multiple Instance Learning for
Whole Slide Image Classification", NeurIPS 2021.

    h = ReLU(W x)                                   (n, 512)
    h = h[i mod n for i < s*s]                      (s*s, 512)   s = ceil(sqrt(n)): square by
                                                                 repeating the first patches
    t = [cls; h]                                    (1 + s*s, 512)
    t = t + NystromAttention(LayerNorm(t))          TransLayer 1
    t = [cls; t_p + dw7(t_p) + dw5(t_p) + dw3(t_p)] PPEG: depthwise convs on the s x s grid
    t = t + NystromAttention(LayerNorm(t))          TransLayer 2
    token = LayerNorm(t)[cls]                       (512,)       the one token

Published sizes: 512 wide, Nystrom attention with 8 heads of 64, 256 landmarks, 6 Moore-Penrose
iterations, the library's depthwise residual conv on the values, dropout 0.1.

Every bag runs alone at its true length: ``nystrom_attention`` pads the sequence (at the front,
with zeros) to a multiple of the landmark count and normalises its pseudo-inverse over the whole
batch, so batching would make a bag's output depend on its neighbours.

Scores: the class token's row of the last layer's Nystrom attention,
``softmax(q_cls K~^T) . pinv(softmax(Q~ K~^T)) . softmax(Q~ K^T)`` (K~, Q~: landmarks), computed
left to right so no (n x n) matrix is built, and averaged over the heads. The columns of the
repeated (square-padding) copies are added to their patch; negative entries (the iterative
pseudo-inverse makes some) are set to 0; the result is divided by its sum over the real patches.
So the scores are the class token's share of attention to each patch among the patches: >= 0,
summing to 1 over the real patches (1 for a one-patch bag).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from nystrom_attention import NystromAttention
from pydantic import Field
from torch import nn

from pathm3.parts.base import Aggregator, AggregatorOutput, PartConfig, TextBatch


class TransMILConfig(PartConfig):
    type: Literal["transmil"] = "transmil"
    embed_dim: int = Field(512, gt=0)  # width of the tokens (paper: 512)
    heads: int = Field(8, gt=0)  # attention heads (paper: 8)
    dim_head: int = Field(64, gt=0)  # width of each head (paper: 64 = 512 / 8)
    num_landmarks: int = Field(256, gt=0)  # Nystrom landmarks (paper: 256 = 512 / 2)
    pinv_iterations: int = Field(6, gt=0)  # Moore-Penrose iterations (paper: 6)
    dropout: float = Field(0.1, ge=0, lt=1)  # dropout after the attention's output projection (paper: 0.1)


class TransLayer(nn.Module):
    """Pre-norm residual Nystrom self-attention."""

    def __init__(self, cfg: TransMILConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.attn = NystromAttention(dim=cfg.embed_dim, dim_head=cfg.dim_head, heads=cfg.heads,
                                     num_landmarks=cfg.num_landmarks, pinv_iterations=cfg.pinv_iterations,
                                     residual=True, dropout=cfg.dropout)

    def forward(self, t: torch.Tensor, with_cls_attention: bool = False):
        if not with_cls_attention:
            return t + self.attn(self.norm(t))  # (1, L, E)
        out, (a1, a2_inv, a3) = self.attn(self.norm(t), return_attn_matrices=True)
        p = a1.shape[-2] - t.shape[1]  # zero tokens the library put in front; the cls token is at p
        row = (a1[:, :, p, None] @ a2_inv) @ a3[:, :, :, p + 1:]  # (1, h, 1, m) -> (1, h, 1, L - 1)
        return t + out, row.mean(1)[0, 0]  # (1, L, E), (L - 1,) over the patch tokens


class PPEG(nn.Module):
    """Pyramid position encoding: depthwise 7x7, 5x5 and 3x3 convs added to the patch grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, t: torch.Tensor, side: int) -> torch.Tensor:
        cls, p = t[:, :1], t[:, 1:]  # (1, 1, E), (1, s*s, E)
        g = p.transpose(1, 2).unflatten(2, (side, side))  # (1, E, s, s)
        g = g + sum(conv(g) for conv in self.convs)  # (1, E, s, s)
        return torch.cat([cls, g.flatten(2).transpose(1, 2)], dim=1)  # (1, 1 + s*s, E)


class TransMIL(Aggregator):
    Config = TransMILConfig
    num_tokens = 1

    def __init__(self, cfg: TransMILConfig, in_dim: int, num_classes: int):
        super().__init__(cfg, in_dim, num_classes)
        self.out_dim = cfg.embed_dim
        self.embed = nn.Sequential(nn.Linear(in_dim, cfg.embed_dim), nn.ReLU())
        self.cls = nn.Parameter(torch.randn(1, 1, cfg.embed_dim))
        self.layer1 = TransLayer(cfg)
        self.ppeg = PPEG(cfg.embed_dim)
        self.layer2 = TransLayer(cfg)
        self.norm = nn.LayerNorm(cfg.embed_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None,
                text: TextBatch | None = None) -> AggregatorOutput:
        tokens, scores = [], torch.zeros(mask.shape, dtype=x.dtype, device=x.device)  # (B, M)
        for b in range(x.shape[0]):
            token, s = self.one_bag(x[b][mask[b]])  # (E,), (n,)
            tokens.append(token)
            scores[b, mask[b]] = s
        return AggregatorOutput(tokens=torch.stack(tokens)[:, None], scores=scores)  # (B, 1, E)

    def one_bag(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        side = math.ceil(math.sqrt(n))
        order = torch.arange(side * side, device=x.device) % n  # (s*s,) square: repeat the first patches
        h = self.embed(x)[order]  # (s*s, E)
        t = torch.cat([self.cls, h[None]], dim=1)  # (1, 1 + s*s, E)
        t = self.layer1(t)  # (1, 1 + s*s, E)
        t = self.ppeg(t, side)  # (1, 1 + s*s, E)
        t, row = self.layer2(t, with_cls_attention=True)  # (1, 1 + s*s, E), (s*s,)
        token = self.norm(t)[0, 0]  # (E,) the class token

        s = torch.zeros(n, dtype=row.dtype, device=row.device).index_add_(0, order, row)  # (n,) fold copies
        s = s.clamp(min=0)  # the iterative pseudo-inverse can make small negative entries
        total = s.sum()
        s = torch.where(total > 0, s / total.clamp(min=1e-30), 1.0 / n)  # (n,) share among the patches
        return token, s
