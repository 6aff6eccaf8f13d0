"""AdamW over the trainable parameters with linear warmup then cosine decay (paper Table 6)."""

from __future__ import annotations

import math

import torch

from pathm3.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW on parameters that require grad; no weight decay on biases and norm weights (ndim < 2)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def warmup_cosine(cfg: TrainConfig, total_steps: int):
    """LR multiplier for LambdaLR: warmup_lr -> lr linearly over warmup_steps, then cosine to min_lr."""
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
    """Per-step LambdaLR implementing :func:`warmup_cosine`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg, total_steps))
