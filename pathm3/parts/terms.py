"""Caption-term supervision, ``train.terms``: every finding the captions name gets its own loss.

Why: a caption names a finding in two or three tokens, and a finding carried by a few patches
moves the generation loss only through those tokens, after the language model. The
classification loss meanwhile pulls every query to the class evidence, so the captioner is
handed tokens that never looked at the rarer finding and writes the majority phrase (measured
in ``benchmarks/known_truth.py``: the attribute phrase of 2%-needle cohorts is right on 67% of
slides with the paper's losses).

What: each term (a word or phrase of the captions) gets a score per slide, and the loss is
binary cross-entropy against "the caption contains the term", averaged over terms and over the
slides that have a caption. It needs no extra labels: the terms come from the training captions
(words in at least ``min_slides`` captions and at most ``max_share`` of them) or are listed in
the config. Where the score comes from, ``source``:

``tokens`` (the default): a linear score on every slide token, the slide's score the maximum over
its K tokens, so one query can specialise on one finding (multiple-instance max pooling over
queries)::

    logit_t = max_k(tokens_k W^T + b)_t                                  tokens (B, K, Q)

``patches``: a quadratic score on every patch, averaged over the bag (second-order pooling). It
does not wait for a query of the aggregator to look at the finding's patches, and the class
evidence cannot take that attention away. A linear score averaged over the bag would see only
the bag's mean, where a few patches barely show; a quadratic score sees them as extra spread
along their direction, and it is linear in its weights, so the loss is convex in them (there is
no attention that must find the patches first: on the 2% known-truth cohorts a gated attention
pool and a log-sum-exp pool of *linear* patch scores each missed the attribute on some seeds, the
quadratic score named it on >= 89% of the test slides in every run)::

    z_m = [P x_m, 1]                                         x (B, M, H) the mixer's output, P (R, H)
    logit_t = mean_m z_m^T A_t z_m + b_t = <A_t, mean_m z_m z_m^T> + b_t          pool: mean

In a bag's mean, 5 patches of 1,000 barely show. ``pool: lse`` takes a soft maximum of the same
per-patch scores instead, so a few high-scoring patches decide the term::

    logit_t = log mean_m exp(z_m^T A_t z_m + b_t)                                  pool: lse

Why the soft maximum works over quadratic scores when over linear ones it learned nothing (our
reading, not proven): a quadratic score measures spread along a direction, which every bag has,
so the pool has a gradient towards the finding's direction from the first step, while over
linear scores it starts on random patches. With 0.5% attribute patches in slide-sized
bags the attribute was named on 100% of the test slides with ``lse``, 43% with ``mean``
(``benchmarks/known_truth.py``).

``both``: the two logits added, one loss. The query-side score also teaches the queries the
class words, which the classifier needs where the class evidence is scarce: in slide-sized bags
with 0.5% class patches, accuracy 0.70 with ``patches`` alone, 0.86 with ``both``, 0.93 with
``tokens`` (which misses the attribute on some 2% seeds; all with ``pool: mean`` and no bag
mixing; ``demo.yaml``'s ``both`` + ``lse`` + ``model.bag_mix``: 0.92; ``benchmarks/known_truth.py``).

``captioner_tokens: F`` hands the captioner the term probabilities too, as F more tokens after
the aggregator's K: Linear(T, F * Q)(sigmoid(logits)), so the caption can name what the term
scores found.

With ``weight: 0`` (the default) the model and the loss are the paper's. The chosen terms are
written into the run's config (``train.terms.terms``), so a checkpoint rebuilds the same head.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Literal, Sequence

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
    source: Literal["tokens", "patches", "both"] = "tokens"  # scored on the K tokens (max), the patches, or both
    rank: int = Field(32, ge=1)  # source patches: R, the width the patches are projected to first
    captioner_tokens: int = Field(0, ge=0)  # > 0: the captioner also reads the term probabilities as F tokens
    pool: Literal["mean", "lse"] = "mean"  # source patches: the per-patch scores averaged, or log-mean-exp


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
    """Term logits (B, T) from the slide tokens (B, K, Q) or the patches (B, M, H); their loss; and,
    with ``captioner_tokens``, the tokens that carry the term probabilities to the captioner."""

    def __init__(self, cfg: TermsConfig, width: int, patch_width: int | None = None):
        super().__init__()
        if not cfg.terms:
            raise ValueError("train.terms.weight > 0 but train.terms.terms is empty: pathm3-train chooses the "
                             "words from the training captions; to build a model directly, list them or set weight 0")
        self.cfg = cfg
        n = len(cfg.terms)
        if cfg.source in ("tokens", "both"):
            self.score = nn.Linear(width, n)
        if cfg.source in ("patches", "both"):
            self.project = nn.Linear(patch_width or width, cfg.rank, bias=False)
            self.patch_score = nn.Linear((cfg.rank + 1) ** 2, n)  # row t: A_t flattened, and b_t
        self.to_captioner = nn.Linear(n, cfg.captioner_tokens * width) if cfg.captioner_tokens else None

    def logits(self, tokens: torch.Tensor, x: torch.Tensor | None = None, mask: torch.Tensor | None = None
               ) -> torch.Tensor:
        """(B, T) term logits; ``x`` (B, M, H) and ``mask`` (B, M) are needed with source patches
        (with ``both`` the two logits are added)."""
        out = 0.0
        if self.cfg.source in ("tokens", "both"):
            out = self.score(tokens).amax(dim=1)  # (B, K, Q) -> (B, K, T) -> (B, T)
        if self.cfg.source in ("patches", "both") and self.cfg.pool == "mean":
            z = self._lifted(x, mask)  # (B, M, R + 1)
            moment = z.transpose(1, 2) @ z / mask.sum(1).clamp(min=1)[:, None, None]  # (B, R + 1, R + 1)
            out = out + self.patch_score(moment.flatten(1))  # (B, T)
        elif self.cfg.source in ("patches", "both"):  # log-mean-exp: a soft maximum over the patches
            s = self.patch_logits(x, mask).masked_fill(~mask[:, None, :], float("-inf"))  # (B, T, M)
            n = mask.sum(1).clamp(min=1).to(s.dtype)  # (B,)
            out = out + s.logsumexp(-1) - n.log()[:, None] + self.patch_score.bias  # (B, T)
        return out

    def patch_logits(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, M) each term's quadratic score on each patch (source patches), 0 at padding; a
        term's patch-side logit is their mean (``pool: mean``) or log-mean-exp (``lse``) over the
        real patches, plus its bias."""
        z = self._lifted(x, mask)  # (B, M, R + 1)
        w = self.patch_score.weight  # (T, (R + 1)^2): row t is A_t flattened
        # z_m^T A_t z_m = <z_m z_m^T, A_t>, in chunks of patches: memory B x chunk x (R + 1)^2, whatever T
        scores = [(c[..., :, None] * c[..., None, :]).flatten(2) @ w.T for c in z.split(4096, dim=1)]  # (B, m, T)
        return torch.cat(scores, dim=1).transpose(1, 2)  # (B, T, M)

    def _lifted(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, M, R + 1): [P x_m, 1] on real patches, 0 at padding."""
        real = mask[..., None].to(x.dtype)
        return torch.cat([self.project(x), torch.ones_like(real)], dim=-1) * real

    def caption_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, F, Q) the term probabilities as tokens for the captioner."""
        b = logits.shape[0]
        return self.to_captioner(torch.sigmoid(logits)).view(b, self.cfg.captioner_tokens, -1)

    def loss(self, logits: torch.Tensor, captions: Sequence[str | None]) -> torch.Tensor:
        """Mean BCE of the term ``logits`` (B, T) over the slides that have a caption (0 when none has)."""
        target = contains(captions, self.cfg.terms).to(logits.device)  # (B, T)
        known = ~target.isnan().any(1)
        if not bool(known.any()):
            return logits.sum() * 0.0  # keeps the graph connected
        return F.binary_cross_entropy_with_logits(logits[known].float(), target[known])


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
