"""Per-patch heatmap scores, by several methods, for any aggregator.

Every method works through the model's public parts (``model.mixer``, ``model.aggregate``,
``model.head`` via ``model._classify``), so it explains PathM3 and every MIL baseline alike.
``attention`` is the aggregator's own score (what ``pathm3-heatmap`` shows); the others explain
one class, by default the predicted one, through its *log-odds* (single-label: logit_c minus the
log-sum-exp of the other logits; multi-label: logit_c), which does not saturate as the softmax
probability does:

    attention                  AggregatorOutput.scores (class-agnostic)
    gradient_x_input           d log-odds / d x_i . x_i at the aggregator input (the mixer output)
    class_attention            per-token attention (a Q-Former query's, DSMIL's class row) averaged with
                               weights max(0, d log-odds / d token . token): the tokens that carry the class
    attention_x_gradient       attention_i * max(0, gradient_x_input_i): looked at AND evidence for the class
    feature_gradient_x_input   d log-odds / d f_i . f_i at the bag features (through the mixer)
    integrated_gradients       (f_i - f_mean) . mean_s d log-odds / d f along the line from the bag's
                               mean patch to the bag (S steps)
    occlusion                  log-odds drop when a chunk of neighbouring patches leaves the bag
    random_subsets             mean log-odds of random small sub-bags that hold the patch minus that of
                               those that do not (each patch kept with probability ``keep``)

Nothing is M x M: gradients cost one backward pass (``integrated_gradients`` S of them); occlusion
and random subsets run copies of the bag with patches removed, as many per forward as
``patch_budget`` patches allow.

    scores = patch_scores(model, features, mask, "occlusion")          # (B, M), 0 at padding

:func:`term_scores` is not a class explanation: it maps one caption term (a finding word) onto
the patches, from the term's own patch scores (``train.terms.source: patches`` or ``both``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from pathm3.errors import UsageError
from pathm3.model import PathM3
from pathm3.parts.base import AggregatorOutput

ScoreFn = Callable[..., torch.Tensor]  # (model, features, mask, class_index (B,), **options) -> (B, M)
METHODS: dict[str, ScoreFn] = {}
CLASS_AGNOSTIC = ("attention",)


def method(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Register a scoring function under ``name`` in :data:`METHODS`."""
    def register(fn: ScoreFn) -> ScoreFn:
        METHODS[name] = fn
        return fn
    return register


def patch_scores(model: PathM3, features: torch.Tensor, mask: torch.Tensor, method: str = "attention",
                 class_index: int | Sequence[int] | torch.Tensor | None = None, **options) -> torch.Tensor:
    """(B, M) per-patch scores of ``method`` for bags ``features`` (B, M, D) with ``mask`` (B, M);
    0 at padding. Class-specific methods explain ``class_index`` (one for all bags, or one per bag;
    None: each bag's predicted class). ``options`` go to the method (e.g. ``steps``, ``max_chunks``).
    The model runs in eval mode and is left in the mode it was in."""
    if method not in METHODS:
        raise UsageError(f"unknown heatmap method {method!r}; choose from {', '.join(METHODS)}")
    was_training = model.training
    model.eval()
    try:
        target = target_classes(model, features, mask, class_index)  # (B,)
        scores = METHODS[method](model, features, mask, target, **options)  # (B, M)
    finally:
        model.train(was_training)
    return scores.float().masked_fill(~mask, 0.0).detach()


def target_classes(model: PathM3, features: torch.Tensor, mask: torch.Tensor,
                   class_index: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    """(B,) long: the class each bag is explained for (the predicted one when ``class_index`` is None)."""
    b = features.shape[0]
    if class_index is None:
        with torch.no_grad():
            return model.classify(features, mask).argmax(-1)  # image only
    idx = torch.as_tensor(class_index, dtype=torch.long, device=features.device).reshape(-1)
    if not ((idx >= 0) & (idx < model.num_classes)).all():
        raise UsageError(f"class_index {class_index} out of range for {model.num_classes} classes")
    return idx.expand(b) if idx.numel() == 1 else idx


def log_odds(model: PathM3, out: AggregatorOutput, target: torch.Tensor) -> torch.Tensor:
    """(B,) the log-odds of each bag's target class from an aggregator output."""
    logits = model._classify(out)[0].float()  # (B, C)
    chosen = logits.gather(1, target[:, None])[:, 0]  # (B,)
    if model.multilabel or logits.shape[1] == 1:
        return chosen
    others = logits.scatter(1, target[:, None], float("-inf"))  # (B, C) the target left out
    return chosen - others.logsumexp(1)


def bag_log_odds(model: PathM3, features: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) the log-odds of each bag's target class: mixer -> aggregator -> head."""
    return log_odds(model, model.aggregate(features, model.mixer(features, mask), mask), target)


def input_gradient(model: PathM3, features: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
                   mixed: torch.Tensor | None = None) -> torch.Tensor:
    """d log-odds / d features (B, M, D), through the mixer; or, given the mixer's output ``mixed``,
    d log-odds / d mixed (B, M, H) (what reads the features directly, the prototype stream, held fixed)."""
    with torch.enable_grad():
        x = (features if mixed is None else mixed).detach().requires_grad_(True)
        if mixed is None:
            out = model.aggregate(x, model.mixer(x, mask), mask)
        else:
            out = model.aggregate(features, x, mask)
        (grad,) = torch.autograd.grad(log_odds(model, out, target).sum(), x)
    return grad


def has_term_scores(model: PathM3) -> bool:
    """Whether the model scores caption terms on the patches (``train.terms.source`` patches or both,
    or the mined prototypes of ``train.prototypes``)."""
    return model.terms is not None and (model.terms.cfg.source in ("patches", "both") or model.prototypes is not None)


def check_term(model: PathM3, term: str) -> int:
    """The index of caption ``term`` among the model's patch-scored terms, or a :class:`UsageError`."""
    if not has_term_scores(model):
        raise UsageError("--term needs a model trained with caption terms scored on the patches "
                         "(train.terms.weight > 0 and train.terms.source: patches or both, or train.prototypes)")
    terms = model.terms.cfg.terms
    if term not in terms:
        known = ", ".join(terms[:12]) + (", ..." if len(terms) > 12 else "")
        raise UsageError(f"--term {term!r}: not a caption term of this model; its terms: {known}")
    return terms.index(term)


@torch.no_grad()
def all_term_scores(model: PathM3, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, M) every caption term's own per-patch score (see :func:`term_scores`), 0 at padding;
    one pass of the mixer. The model runs in eval mode and is left in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        scores = 0.0
        if model.terms.cfg.source in ("patches", "both"):
            scores = model.terms.patch_logits(model.mixer(features, mask), mask)  # (B, T, M)
        if model.prototypes is not None:  # + the prototype stream's per-patch term scores
            scores = scores + model.prototypes.term_patch_scores(features)  # (B, T, M)
    finally:
        model.train(was_training)
    return scores.float().masked_fill(~mask[:, None, :], 0.0)


def term_scores(model: PathM3, features: torch.Tensor, mask: torch.Tensor, term: str) -> torch.Tensor:
    """(B, M) each patch's own score for one caption ``term`` (``train.terms`` with ``source``
    patches or both: the quadratic score whose bag mean or soft maximum is the term's patch-side
    logit; plus, with ``train.prototypes``, the patch's score along the term's mined direction),
    0 at padding: where the model sees that finding, not why it chose a class."""
    t = check_term(model, term)  # before any work: a bad term is refused at once
    return all_term_scores(model, features, mask)[:, t]


# --------------------------------------------------------------------------------------------
# Methods


@method("attention")
@torch.no_grad()
def attention(model: PathM3, features, mask, target) -> torch.Tensor:
    """The aggregator's own per-patch scores (e.g. attention); class-agnostic."""
    return model.aggregate(features, model.mixer(features, mask), mask).scores  # (B, M)


@method("gradient_x_input")
def gradient_x_input(model: PathM3, features, mask, target) -> torch.Tensor:
    """Gradient x input at the aggregator's input (the mixer output), summed over the width."""
    with torch.no_grad():
        x = model.mixer(features, mask)  # (B, M, H)
    return (input_gradient(model, features, mask, target, mixed=x) * x).sum(-1)


@method("class_attention")
def class_attention(model: PathM3, features, mask, target) -> torch.Tensor:
    """Attention of the tokens that carry the class: each token's own attention map (Q-Former:
    per query; DSMIL: the target class's row; else the one map) weighted by the token's positive
    contribution to the class log-odds (gradient x input at the token)."""
    with torch.no_grad():
        out = model.aggregate(features, model.mixer(features, mask), mask)
    with torch.enable_grad():
        tokens = out.tokens.detach().requires_grad_(True)  # (B, K, Q)
        score = log_odds(model, dataclasses.replace(out, tokens=tokens), target).sum()
        (grad,) = torch.autograd.grad(score, tokens)
    weight = (grad * tokens).sum(-1).clamp(min=0)  # (B, K)
    weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, torch.ones_like(weight))
    if out.query_scores is not None:
        maps = out.query_scores  # (B, K, M)
    elif out.class_scores is not None:
        maps = out.class_scores.gather(1, target[:, None, None].expand(-1, 1, mask.shape[1]))  # (B, 1, M)
    else:
        maps = out.scores[:, None]  # (B, 1, M)
    return (weight[..., None] * maps).sum(1) / weight.sum(1, keepdim=True)


@method("attention_x_gradient")
def attention_x_gradient(model: PathM3, features, mask, target) -> torch.Tensor:
    """Attention weighted by the positive part of the patch's class evidence (gradient x input at
    the aggregator input): high where the model looked and found evidence for the class."""
    with torch.no_grad():
        x = model.mixer(features, mask)  # (B, M, H)
        scores = model.aggregate(features, x, mask).scores  # (B, M)
    evidence = (input_gradient(model, features, mask, target, mixed=x) * x).sum(-1)  # (B, M)
    return scores * evidence.clamp(min=0)


@method("feature_gradient_x_input")
def feature_gradient_x_input(model: PathM3, features, mask, target) -> torch.Tensor:
    """Gradient x input at the bag features: through the mixer (PathM3's correlation module)."""
    return (input_gradient(model, features, mask, target) * features).sum(-1)


@method("integrated_gradients")
def integrated_gradients(model: PathM3, features, mask, target, steps: int = 16) -> torch.Tensor:
    """Integrated gradients at the bag features from the bag's mean patch as baseline (every patch
    alike: no patch is evidence), midpoint rule with ``steps`` points; sums to ~ log-odds(f) -
    log-odds(baseline) per bag. A zero baseline only means "nothing" for centred features; real
    encoders' features are not centred."""
    weights = mask[..., None].to(features.dtype)  # (B, M, 1)
    base = (features * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)  # (B, 1, D)
    delta = features - base  # (B, M, D)
    total = torch.zeros_like(features)
    for s in range(steps):
        alpha = (s + 0.5) / steps
        total += input_gradient(model, base + alpha * delta, mask, target)
    return (delta * total / steps).sum(-1)


@method("occlusion")
@torch.no_grad()
def occlusion(model: PathM3, features, mask, target, max_chunks: int = 512,
              patch_budget: int = 65_536) -> torch.Tensor:
    """Drop in log-odds when a chunk of consecutive patches (neighbours on the extraction grid) is
    removed from the bag; every patch of a chunk gets the chunk's drop. Chunks hold
    ceil(M / max_chunks) patches, so a bag of <= ``max_chunks`` patches is left-one-out exactly."""
    out = torch.zeros(mask.shape, device=features.device)  # (B, M)
    for b in range(features.shape[0]):
        n = int(mask[b].sum())
        if n > 1:
            out[b, mask[b]] = occlude_bag(model, features[b, mask[b]], target[b], max_chunks, patch_budget)
    return out


def occlude_bag(model: PathM3, feats: torch.Tensor, target: torch.Tensor, max_chunks: int,
                patch_budget: int) -> torch.Tensor:
    """(n,) occlusion scores of one bag's real patches ``feats`` (n, D)."""
    n = feats.shape[0]
    size = max(1, math.ceil(n / max(2, max_chunks)))
    starts = torch.arange(0, n, size, device=feats.device)  # (S,) first patch of each chunk
    chunk_of = torch.arange(n, device=feats.device) // size  # (n,)
    full = torch.ones(1, n, dtype=torch.bool, device=feats.device)
    base = bag_log_odds(model, feats[None], full, target[None])  # (1,)
    copies = max(1, patch_budget // n)
    drops = []
    for group in starts.split(copies):
        keep = chunk_of[None, :] != (group[:, None] // size)  # (G, n) one chunk removed per copy
        x = feats[None].expand(len(group), -1, -1)  # (G, n, D)
        drops.append(base - bag_log_odds(model, x, keep, target.expand(len(group))))  # (G,)
    return torch.cat(drops)[chunk_of]  # (n,)


@method("random_subsets")
@torch.no_grad()
def random_subsets(model: PathM3, features, mask, target, samples: int = 1024, keep: float = 0.1,
                   seed: int = 0, patch_budget: int = 65_536) -> torch.Tensor:
    """Each patch's marginal effect on the class log-odds over ``samples`` random sub-bags that keep
    every patch with probability ``keep``: mean log-odds of the sub-bags holding the patch minus the
    mean of those without it (a Monte-Carlo Banzhaf value; RISE, Petsiuk 2018, for bags). Removing
    one patch from a whole bag (occlusion) changes little when several patches carry the same
    evidence; in a sub-bag of ~``keep`` x M patches each of them counts. Take ``keep`` smaller when
    the evidence covers much of the slide. Seeded, so the same bag gets the same scores."""
    if not 0 < keep < 1:
        raise UsageError(f"random_subsets: keep is a probability in (0, 1), got {keep}")
    out = torch.zeros(mask.shape, device=features.device)  # (B, M)
    for b in range(features.shape[0]):
        if int(mask[b].sum()) > 1:
            generator = torch.Generator().manual_seed(seed)  # per bag: a bag alone scores as in a batch
            out[b, mask[b]] = subset_effects(model, features[b, mask[b]], target[b], samples, keep,
                                             generator, patch_budget)
    return out


def subset_effects(model: PathM3, feats: torch.Tensor, target: torch.Tensor, samples: int, keep: float,
                   generator: torch.Generator, patch_budget: int) -> torch.Tensor:
    """(n,) random-subset effects of one bag's real patches ``feats`` (n, D)."""
    n = feats.shape[0]
    kept = torch.rand(samples, n, generator=generator) < keep  # (S, n)
    empty = ~kept.any(1)
    kept[empty, torch.randint(n, (int(empty.sum()),), generator=generator)] = True  # no empty sub-bag
    kept = kept.to(feats.device)
    counts = kept.sum(1)  # (S,)
    width = int(counts.max())
    rows = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :width]  # (S, L) kept first, in bag order
    sub_mask = torch.arange(width, device=feats.device)[None] < counts[:, None]  # (S, L)
    group = max(1, patch_budget // width)  # sub-bags per forward
    y = torch.cat([bag_log_odds(model, feats[idx], m, target.expand(len(idx)))
                   for idx, m in zip(rows.split(group), sub_mask.split(group))])  # (S,) log-odds of each sub-bag
    k = kept.float()
    n_in, n_out = k.sum(0), (1 - k).sum(0)  # (n,)
    effect = (k.T @ y) / n_in.clamp(min=1) - ((1 - k).T @ y) / n_out.clamp(min=1)
    return torch.where((n_in > 0) & (n_out > 0), effect, torch.zeros_like(effect))
