"""Bags as model inputs: padding a list of bags into one batch with a mask."""

from __future__ import annotations

from typing import Sequence

import torch


def pad_bags(bags: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bags of shape (M_i, D) into ``features`` (B, M, D) and a bool ``mask`` (B, M).

    Padding goes at the end of each bag and is zero; ``mask`` is True on real patches.
    """
    m = max(b.shape[0] for b in bags)
    d = bags[0].shape[1]
    feats = bags[0].new_zeros((len(bags), m, d))
    mask = torch.zeros((len(bags), m), dtype=torch.bool, device=bags[0].device)
    for i, b in enumerate(bags):
        feats[i, : b.shape[0]] = b
        mask[i, : b.shape[0]] = True
    return feats, mask
