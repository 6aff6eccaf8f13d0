"""Caption-term supervision, ``train.terms``: every finding the captions name gets its own loss.

Why: a caption names a finding in two or three tokens, and a finding carried by a few patches
moves the generation loss only through those tokens, after the language model. The
classification loss meanwhile pulls every query to the class evidence, so the captioner is
handed tokens that never looked at the rarer finding and writes the majority phrase (measured
in ``benchmarks/known_truth.py``: the attribute phrase of 2%-needle cohorts is right on 67% of
slides with the paper's losses).

What: each term (a word or phrase of the captions) gets a linear score on every slide token,
and the slide's score for the term is the maximum over its K tokens, so one query can specialise
on one finding (multiple-instance max pooling over queries). The loss is binary cross-entropy
against "the caption contains the term", averaged over terms and over the slides that have a
caption. It needs no extra labels: the terms come from the training captions (words in at least
``min_slides`` captions and at most ``max_share`` of them) or are listed in the config.

    L += weight * BCE(max_k(tokens_k W^T + b), contains(caption, term))      tokens (B, K, Q)

With ``weight: 0`` (the default) the model and the loss are the paper's. The chosen terms are
written into the run's config (``train.terms.terms``), so a checkpoint rebuilds the same head.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pathm3.errors import DataError
from pathm3.parts.base import PartConfig


class TermsConfig(PartConfig):
    """``train.terms``: weight 0 (default) leaves the model and the loss as in the paper."""

    weight: float = Field(0.0, ge=0)  # L += weight * L_terms
    terms: list[str] = []  # words or phrases to detect; empty: chosen from the training captions
    min_slides: int = Field(3, ge=1)  # a chosen word is in at least this many training captions
    max_share: float = Field(0.9, gt=0, le=1)  # and in at most this share of them
    max_terms: int = Field(512, ge=1)  # the most frequent words are kept


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words of ``text``."""
    return re.findall(r"[a-z0-9]+", text.lower())


def choose_terms(captions: Sequence[str], cfg: TermsConfig) -> list[str]:
    """The words of ``captions`` that can tell slides apart: in >= min_slides captions and
    <= max_share of them, at most max_terms (most frequent first, then alphabetical)."""
    captions = [c for c in captions if c]
    counts = Counter(w for c in captions for w in set(words(c)))
    keep = [w for w, n in counts.items() if n >= cfg.min_slides and n <= cfg.max_share * len(captions)]
    return sorted(keep, key=lambda w: (-counts[w], w))[:cfg.max_terms]


def contains(captions: Sequence[str | None], terms: Sequence[str]) -> torch.Tensor:
    """(B, T) 1.0 where caption b contains term t as whole words, NaN for a slide without a caption."""
    out = torch.full((len(captions), len(terms)), float("nan"))
    for b, caption in enumerate(captions):
        if caption:
            text = f" {' '.join(words(caption))} "
            out[b] = torch.tensor([f" {' '.join(words(t))} " in text for t in terms], dtype=torch.float32)
    return out


class CaptionTerms(nn.Module):
    """Term scores from slide tokens: (B, K, Q) -> (B, T), max over the K tokens."""

    def __init__(self, cfg: TermsConfig, width: int):
        super().__init__()
        if not cfg.terms:
            raise ValueError("train.terms.weight > 0 but train.terms.terms is empty: pathm3-train chooses the "
                             "words from the training captions; to build a model directly, list them or set weight 0")
        self.cfg = cfg
        self.score = nn.Linear(width, len(cfg.terms))

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.score(tokens).amax(dim=1)  # (B, K, Q) -> (B, K, T) -> (B, T)

    def loss(self, tokens: torch.Tensor, captions: Sequence[str | None]) -> torch.Tensor:
        """Mean BCE over the slides that have a caption (0 when none has)."""
        target = contains(captions, self.cfg.terms).to(tokens.device)  # (B, T)
        known = ~target.isnan().any(1)
        if not bool(known.any()):
            return self.score.weight.sum() * 0.0  # keeps the graph connected
        return F.binary_cross_entropy_with_logits(self.logits(tokens[known]).float(), target[known])


def with_terms(cfg, train: Sequence):
    """``train.terms`` with a weight but no terms gets the words of the training captions
    (:func:`pathm3.parts.terms.choose_terms`); the run's config stores them, so a checkpoint or a
    resumed run rebuilds the same head. Without any training caption the run has weight 0.
    ``cfg``: a :class:`pathm3.config.Config`; ``train``: its training :class:`pathm3.manifest.Slide` rows."""
    from pathm3.config import apply_overrides  # the config imports this module

    t = cfg.train.terms
    if t.weight <= 0 or t.terms:
        return cfg
    if not any(s.caption for s in train):  # nothing to supervise: the run (and its config) goes without
        return apply_overrides(cfg, ["train.terms.weight=0"])
    chosen = choose_terms([s.caption for s in train], t)
    if not chosen:
        raise DataError(f"{cfg.data.manifest}: train.terms found no word in at least {t.min_slides} training "
                        "captions; list train.terms.terms, lower train.terms.min_slides, or set train.terms.weight: 0")
    return apply_overrides(cfg, [f"train.terms.terms={json.dumps(chosen)}"])  # quoted: "no" stays a word
