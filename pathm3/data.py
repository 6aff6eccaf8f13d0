"""Bags as model inputs: the bag dataset over manifest rows, and the collator that pads bags and
tokenizes captions into a :class:`~pathm3.model.Batch` (so the model's forward takes tensors)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from pathm3.bags import inspect_bag, read_bag
from pathm3.errors import DataError
from pathm3.manifest import Slide


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


def check_feature_width(bag_paths: Sequence[str | os.PathLike], feature_dim: int) -> None:
    """Every bag must have width ``model.feature_dim``; the first that does not is named."""
    for path in bag_paths:
        info = inspect_bag(path)
        if info.feature_dim != feature_dim:
            raise DataError(
                f"{path}: features are {info.feature_dim}-d but model.feature_dim is {feature_dim} "
                "(extracted with another encoder? set model.feature_dim or re-extract)"
            )


def limit_patches(batch, max_patches: int | None):
    """Keep a random subset of at most ``max_patches`` real patches per bag (training only)."""
    if not max_patches or batch.features.shape[1] <= max_patches:
        return batch
    bags = []
    for feats, mask in zip(batch.features, batch.mask):
        real = feats[mask]
        if len(real) > max_patches:
            real = real[torch.randperm(len(real), device=real.device)[:max_patches].sort().values]
        bags.append(real)
    feats, mask = pad_bags(bags)
    return dataclasses.replace(batch, features=feats, mask=mask)


def check_bags(slides: Sequence[Slide], feature_dim: int, progress: bool = True) -> None:
    """Read every bag once before training: a wrong width or NaN/inf features fail now, naming the file."""
    from tqdm.auto import tqdm

    check_feature_width([s.bag_path for s in slides], feature_dim)
    for s in tqdm(slides, desc="checking bags", unit="bag", disable=not progress, leave=False):
        read_bag(s.bag_path)


class BagDataset(Dataset):
    """Manifest rows -> dicts of features (N, D) float32, coords, targets (C,) (NaN unknown), caption.

    ``classifier_text`` maps a caption to the text the classifier sees (e.g. class words removed).
    Training bags are subsampled by :func:`limit_patches` inside the step, after it reseeds.
    """

    def __init__(self, slides: Sequence[Slide], classifier_text: Callable[[str], str] | None = None):
        self.slides = list(slides)
        self.classifier_text = classifier_text

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.slides[i]
        bag = read_bag(s.bag_path, dtype="float32", with_attrs=False)
        feats, coords = torch.from_numpy(bag.features), torch.from_numpy(bag.coords)
        caption = s.caption
        cls_text = self.classifier_text(caption) if (caption and self.classifier_text) else caption
        return {"slide_id": s.slide_id, "features": feats, "coords": coords,
                "targets": torch.tensor(s.targets, dtype=torch.float32), "caption": caption,
                "classifier_caption": cls_text}


class BagCollator:
    """Pads :class:`BagDataset` items into a :class:`~pathm3.model.Batch` and tokenizes their
    captions with the model's parts (captioner targets; classifier text for a text-reading aggregator).

    ``tokenize`` is :meth:`pathm3.model.PathM3.tokenize`; without it captions stay untokenized."""

    def __init__(self, tokenize: Callable | None = None):
        self.tokenize = tokenize

    def __call__(self, items: Sequence[dict[str, Any]]):
        from pathm3.model import Batch

        feats, mask = pad_bags([it["features"] for it in items])
        captions = [it["caption"] for it in items]
        caption_tokens, text = self.tokenize(captions, [it["classifier_caption"] for it in items]) \
            if self.tokenize is not None else (None, None)
        return Batch(slide_ids=[it["slide_id"] for it in items], features=feats, mask=mask,
                     targets=torch.stack([it["targets"] for it in items]), captions=captions,
                     caption_tokens=caption_tokens, text=text)
