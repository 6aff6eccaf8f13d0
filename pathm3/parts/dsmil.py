"""DSMIL, the dual-stream MIL aggregator: Li, Li & Eliceiri, "Dual-stream Multiple Instance
Learning Network for Whole Slide Image Classification with Self-supervised Contrastive
Learning", CVPR 2021.

Stream 1 (max-instance): an instance classifier scores every patch; per class, the best patch
is the critical instance and its score is the bag's score for that class::

    c_i = W0 x_i                                  (M, C)
    m_c = argmax_i c_ic,  s_c = c_{m_c, c}        (C,)       -> instance_logits

Stream 2 (critical-instance attention): every patch attends to each class's critical instance::

    q_i = tanh(Wq x_i)                            (M, 128)
    A_ic = softmax_i( <q_i, q_{m_c}> / sqrt(128) ) (M, C)
    v_i = ReLU(Wv x_i)                            (M, D)     (paper: dropout_v 0.0)
    B = A^T V                                     (C, D)     the bag embedding

The paper's bag classifier is Conv1d(C, C, kernel_size=D) on B, which is exactly a Linear over
the flattened B (C * D inputs). So the one token is B flattened class-major, width C * D, and the
model's head (a Linear) is that classifier. The model averages the head's logits with
``instance_logits`` and trains both (weight 1/2 each), as the paper.

Scores: ``class_scores`` (B, C, M) is A per class; ``scores`` is its mean over the classes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from pathm3.parts.base import Aggregator, AggregatorOutput, PartConfig, TextBatch, masked_softmax


class DSMILConfig(PartConfig):
    type: Literal["dsmil"] = "dsmil"
    query_dim: int = Field(128, gt=0)  # width of the attention queries (paper: 128)
    dropout_v: float = Field(0.0, ge=0, lt=1)  # dropout on the values (paper: 0.0)


class DSMIL(Aggregator):
    Config = DSMILConfig
    num_tokens = 1

    def __init__(self, cfg: DSMILConfig, in_dim: int, num_classes: int):
        super().__init__(cfg, in_dim, num_classes)
        self.out_dim = num_classes * in_dim
        self.instance = nn.Linear(in_dim, num_classes)  # W0: the max-instance stream
        self.query = nn.Sequential(nn.Linear(in_dim, cfg.query_dim), nn.Tanh())  # Wq
        self.value = nn.Sequential(nn.Dropout(cfg.dropout_v), nn.Linear(in_dim, in_dim), nn.ReLU())  # Wv

    def forward(self, x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None,
                text: TextBatch | None = None) -> AggregatorOutput:
        x = x.masked_fill(~mask[..., None], 0.0)  # (B, M, D) padding can hold anything
        c = self.instance(x).masked_fill(~mask[..., None], float("-inf"))  # (B, M, C)
        inst_logits, crit = c.max(dim=1)  # (B, C) best score per class, (B, C) its patch

        q = self.query(x)  # (B, M, Q)
        q_crit = torch.gather(q, 1, crit[..., None].expand(-1, -1, q.shape[-1]))  # (B, C, Q)
        sim = q @ q_crit.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, M, C)
        a = masked_softmax(sim, mask[..., None], dim=1)  # (B, M, C) softmax over the patches
        v = self.value(x)  # (B, M, D)
        bag = a.transpose(1, 2) @ v  # (B, C, D)

        class_scores = a.transpose(1, 2)  # (B, C, M)
        return AggregatorOutput(
            tokens=bag.flatten(1)[:, None],  # (B, 1, C * D)
            scores=class_scores.mean(1),  # (B, M)
            class_scores=class_scores,
            instance_logits=inst_logits,
        )
