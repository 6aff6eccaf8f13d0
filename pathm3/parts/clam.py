"""CLAM, single-branch (``clam_sb``), size "small": Lu et al., "Data-efficient and weakly
supervised computational pathology on whole-slide images", Nature Biomedical Engineering 2021.

The bag is pooled by gated attention (as ABMIL, with the paper's sizes)::

    h_i = Dropout(ReLU(W x_i))                                           (M, 512)
    a_i = softmax_i( w^T (Drop(tanh(V h_i)) * Drop(sigmoid(U h_i))) )    (M,)    V, U: 512 -> 256
    z   = sum_i a_i h_i                                                  (512,)  the one token

Instance-level clustering (the auxiliary loss): one binary classifier 512 -> 2 per class (kept
side by side in one Linear(512, 2C)).
For each bag and each class c whose label is known:

    label 1 (in-class):      the k top-attention patches are class-c evidence (1), the k
                             bottom-attention ones are not (0)
    label 0 (out-of-class):  the k top-attention patches are not class-c evidence (0)

cross-entropy over those patches, averaged over all (bag, class) pairs into ``aux_loss``; the
model mixes it in as ``bag_weight * bag_loss + (1 - bag_weight) * aux_loss``. k = k_sample, or
n // 2 (at least 1) for a bag of n < 2 * k_sample patches. Unknown (NaN) labels add nothing, so
one-hot (single-label) and multi-label targets both work. Published defaults: dropout 0.25,
k_sample 8, bag_weight 0.7. Scores are the attention weights a_i.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pathm3.parts.base import Aggregator, AggregatorOutput, PartConfig, TextBatch, masked_softmax


class CLAMConfig(PartConfig):
    type: Literal["clam_sb"] = "clam_sb"
    embed_dim: int = Field(512, gt=0)  # width of the patch embedding and the token ("small": 512)
    attn_dim: int = Field(256, gt=0)  # hidden width of the gated attention ("small": 256)
    dropout: float = Field(0.25, ge=0, lt=1)  # dropout on the embedding and the attention (paper: 0.25)
    k_sample: int = Field(8, gt=0)  # patches taken from each end of the attention ranking (paper: 8)
    bag_weight: float = Field(0.7, ge=0, le=1)  # weight of the bag loss; the instance loss gets the rest


class CLAMSB(Aggregator):
    Config = CLAMConfig
    num_tokens = 1

    def __init__(self, cfg: CLAMConfig, in_dim: int, num_classes: int):
        super().__init__(cfg, in_dim, num_classes)
        self.out_dim = cfg.embed_dim
        self.aux_weight = 1.0 - cfg.bag_weight
        self.k_sample = cfg.k_sample
        self.embed = nn.Sequential(nn.Linear(in_dim, cfg.embed_dim), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.attn_v = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.attn_dim), nn.Tanh(), nn.Dropout(cfg.dropout))
        self.attn_u = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.attn_dim), nn.Sigmoid(), nn.Dropout(cfg.dropout))
        self.attn_w = nn.Linear(cfg.attn_dim, 1)
        self.instance = nn.Linear(cfg.embed_dim, 2 * num_classes)  # C binary classifiers (E -> 2), side by side

    def forward(self, x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None,
                text: TextBatch | None = None) -> AggregatorOutput:
        x = x.masked_fill(~mask[..., None], 0.0)  # (B, M, D) padding can hold anything
        h = self.embed(x)  # (B, M, E)
        logits = self.attn_w(self.attn_v(h) * self.attn_u(h)).squeeze(-1)  # (B, M)
        a = masked_softmax(logits, mask)  # (B, M), 0 at padding
        z = torch.einsum("bm,bme->be", a, h)  # (B, E)
        aux = None if targets is None else self.instance_loss(h, logits, mask, targets)
        return AggregatorOutput(tokens=z[:, None], scores=a, aux_loss=aux)

    def instance_loss(self, h: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor,
                      targets: torch.Tensor) -> torch.Tensor | None:
        """Mean over the known (bag, class) pairs of the instance classifier's cross-entropy."""
        known = ~torch.isnan(targets)  # (B, C)
        if not known.any():
            return None
        B, C = targets.shape
        k = (mask.sum(1) // 2).clamp(min=1, max=self.k_sample)  # (B,) patches from each end
        K = int(k.max())
        first_k = torch.arange(K, device=h.device) < k[:, None]  # (B, K) the bag's own k of the K taken
        top = logits.masked_fill(~mask, float("-inf")).topk(K, dim=1).indices  # (B, K) most attended
        bottom = logits.masked_fill(~mask, float("inf")).topk(K, dim=1, largest=False).indices  # (B, K) least
        idx = torch.cat([top, bottom], dim=1)  # (B, 2K)
        hs = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))  # (B, 2K, E)
        inst = self.instance(hs).unflatten(-1, (C, 2))  # (B, 2K, C, 2)

        positive = (targets > 0.5)[:, None]  # (B, 1, C) in-class; known but not positive: out-of-class
        y_top = positive.expand(B, K, C)  # (B, K, C) top patches: 1 in-class, 0 out-of-class
        y = torch.cat([y_top, torch.zeros_like(y_top)], dim=1).long()  # (B, 2K, C) bottom patches: 0
        use_top = first_k[..., None] & known[:, None]  # (B, K, C)
        use = torch.cat([use_top, use_top & positive], dim=1)  # (B, 2K, C) bottom ones only in-class
        ce = F.cross_entropy(inst.flatten(0, 2), y.flatten(), reduction="none").view(B, 2 * K, C)
        per_pair = (ce * use).sum(1) / use.sum(1).clamp(min=1)  # (B, C) mean over the pair's patches
        return per_pair[known].mean()
