"""What every model part is: its config base class and the interface of each kind of part.

A model is a chain of parts, each chosen by ``type:`` in its config section::

    feats (B, M, D), mask (B, M) bool (True on real patches, padding at the end)
      -> Mixer        patches exchange information             (B, M, H)     model.mixer
      -> Aggregator   bag -> K tokens, plus per-patch scores   (B, K, Q)     model.aggregator
      -> Head         tokens -> class logits and their loss    (B, C)        model.head
      -> Captioner    tokens -> caption and its loss (optional)              model.captioner

Labels reach the parts as ``targets``: a float tensor (B, C) holding 1 or 0 per class, NaN where
unknown. A single-label slide is a one-hot row; an unlabelled slide is a row of NaN. Only known
entries may enter a loss.

To add a part: write one file with a config class (derived from :class:`PartConfig`, with a
``type: Literal["name"]`` field) and a module class (derived from the kind's base class below,
with ``Config`` set to that config class), then add one line to the kind's registry in
:mod:`pathm3.parts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class PartConfig(BaseModel):
    """Base of every config section: unknown keys and wrong types are errors (strict)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# --------------------------------------------------------------------------------------------
# Mixer: (B, M, D) -> (B, M, H)


class Mixer(nn.Module):
    """Lets the patches of a bag exchange information; padding in, padding out (zeros there)."""

    Config: ClassVar[type[PartConfig]]
    out_dim: int  # H

    def __init__(self, cfg: PartConfig, in_dim: int):
        super().__init__()
        self.cfg = cfg

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Aggregator: (B, M, H) -> K tokens (B, K, Q) + per-patch scores (B, M)


@dataclass
class TextBatch:
    """Token ids of captions (for an aggregator that reads text, or a captioner's targets)."""

    ids: torch.Tensor  # (B, T) long
    mask: torch.Tensor  # (B, T) long/bool, 0 on padding and on slides without a caption


@dataclass
class AggregatorOutput:
    """What an aggregator gives the head, the captioner and the heatmap."""

    tokens: torch.Tensor  # (B, K, Q): what the head and the captioner read
    scores: torch.Tensor  # (B, M): per-patch importance (e.g. attention), 0 at padding
    class_scores: torch.Tensor | None = None  # (B, C, M): class-specific patch scores, if the part has them
    query_scores: torch.Tensor | None = None  # (B, K, M): per-token scores (the Q-Former's per query)
    instance_logits: torch.Tensor | None = None  # (B, C): a second prediction stream (DSMIL's max-instance)
    aux_loss: torch.Tensor | None = None  # scalar instance-level loss (CLAM), needs targets
    # Added by the model (PathM3.aggregate), not the aggregator: the mined-prototype stream (train.prototypes)
    patch_stream: torch.Tensor | None = None  # (B, C) averaged with the head's logits
    term_stream: torch.Tensor | None = None  # (B, T) added to the caption-term logits


class Aggregator(nn.Module):
    """Turns a bag into K tokens of width Q and scores every patch.

    ``instance_logits``, when given, is averaged with the head's logits and trained with the
    head's loss (weight 1/2 each, as DSMIL). ``aux_loss``, when given, is mixed into the
    classification loss as ``(1 - aux_weight) * head_loss + aux_weight * aux_loss`` (CLAM).
    Aggregators must give the same output for a bag alone and the same bag padded in a batch.
    """

    Config: ClassVar[type[PartConfig]]
    out_dim: int  # Q
    num_tokens: int  # K
    aux_weight: float = 0.0
    takes_text: bool = False  # True: forward uses `text` (captions join the bag's tokens)

    def __init__(self, cfg: PartConfig, in_dim: int, num_classes: int):
        super().__init__()
        self.cfg = cfg

    def forward(
        self,
        x: torch.Tensor,  # (B, M, H)
        mask: torch.Tensor,  # (B, M) bool
        targets: torch.Tensor | None = None,  # (B, C) float, NaN unknown; training/validation only
        text: TextBatch | None = None,
    ) -> AggregatorOutput:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Helpers shared by the parts


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` where ``mask`` is True; exactly 0 where it is False."""
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return logits.softmax(dim).masked_fill(~mask, 0.0)


def known_rows(targets: torch.Tensor | None) -> torch.Tensor | None:
    """(B,) bool: rows with at least one known label entry."""
    return None if targets is None else ~torch.isnan(targets).all(dim=1)
