"""AdamW over the trainable parameters, one learning rate per part if asked, and the schedule
(paper Table 6: linear warmup then cosine decay; or one-cycle).

Parameters are grouped by the part they belong to (``mixer``, ``aggregator``, ``head``,
``captioner``, ``projection`` = the captioner's projection into the language model, ``contrastive``);
``train.param_groups`` gives a part its own ``lr`` / ``weight_decay``. Biases and norm weights
(ndim < 2) never get weight decay.
"""

from __future__ import annotations

import math

import torch

from pathm3.config import TrainConfig


def part_of(name: str) -> str:
    """The ``train.param_groups`` name of a parameter, from its state-dict name."""
    if name.startswith("captioner.language_projection."):
        return "projection"
    return name.split(".", 1)[0]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW on the parameters that require grad: two groups (decay / no decay) per part."""
    by_part: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_part.setdefault((part_of(name), p.ndim >= 2), []).append(p)
    groups = []
    for (part, decays), params in by_part.items():
        own = cfg.param_groups.get(part)
        lr = own.lr if own is not None and own.lr is not None else cfg.lr
        wd = own.weight_decay if own is not None and own.weight_decay is not None else cfg.weight_decay
        groups.append({"params": params, "lr": lr, "weight_decay": wd if decays else 0.0, "name": part})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def warmup_cosine(cfg: TrainConfig, total_steps: int):
    """LR multiplier for LambdaLR: warmup_lr -> lr linearly over warmup_steps, then cosine to min_lr
    (as fractions of ``train.lr``, applied to every group's own learning rate)."""
    warm = max(cfg.warmup_steps, 0)
    start = cfg.warmup_lr / cfg.lr
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < warm:
            return start + (1.0 - start) * step / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Per-step schedule: ``warmup_cosine`` (LambdaLR of :func:`warmup_cosine`) or ``onecycle``
    (torch's OneCycleLR to each group's lr, warming up over warmup_steps from warmup_lr and
    annealing to min_lr; betas stay as configured)."""
    if cfg.scheduler == "warmup_cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg, total_steps))
    total = max(total_steps, 1)
    start = max(cfg.warmup_lr, 1e-12) / cfg.lr
    floor = max(cfg.min_lr, 1e-12) / cfg.lr
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
        pct_start=min(max(cfg.warmup_steps / total, 1e-6), 0.99), anneal_strategy="cos",
        div_factor=1 / start, final_div_factor=start / floor, cycle_momentum=False)
