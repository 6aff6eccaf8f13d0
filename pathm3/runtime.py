"""Where and in which precision inference runs: ``--device`` and ``--precision`` of pathm3-eval,
pathm3-predict, pathm3-heatmap, and ``eval.device`` / ``eval.precision`` for the evaluation that
follows training.

    device = resolve_device("auto")            # cuda when present, else cpu
    with autocast(device, "bf16"):
        out = model.infer(feats.to(device), mask.to(device))

``fp32`` runs the model as stored. ``bf16`` / ``fp16`` run its matrix products in half precision
under ``torch.autocast`` (weights stay fp32, so nothing is lost when the model is saved again); a
frozen pretrained captioner runs in bf16 on CUDA whatever the setting (see the captioner parts).
"""

from __future__ import annotations

import argparse
import contextlib
import re
from typing import Literal

import torch

from pathm3.errors import UsageError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a
    :class:`~pathm3.errors.UsageError` when the device does not exist here."""
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not match:
        raise UsageError(f"device {name!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(f"device {name}: no CUDA device on this machine; use --device cpu (or auto)")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UsageError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """A context in which the model's matrix products run in ``precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"precision bf16: {torch.cuda.get_device_name(device)} does not support bf16; use fp16 or fp32")
    return torch.autocast(device.type, dtype=DTYPES[precision])


def to_numpy(t: torch.Tensor):
    """A tensor as a float32 numpy array, from any device and dtype (bf16 has no numpy type)."""
    return t.detach().float().cpu().numpy()


def add_runtime_args(parser: argparse.ArgumentParser, workers: bool = True) -> None:
    """``--device``, ``--precision`` (default: the checkpoint config's ``eval.device`` /
    ``eval.precision``) and, for commands that stream many bags, ``--num-workers``."""
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default: eval.device of the "
                        "checkpoint's config, auto)")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="fp32, bf16 or fp16 for the model's matrix products (default: eval.precision, fp32)")
    if workers:
        from pathm3.errors import number

        parser.add_argument("--num-workers", type=number(int, 0), default=None, metavar="N",
                            help="processes reading bags from disk while the model runs (default: data.num_workers)")


def for_inference(model: torch.nn.Module, cfg, device: str | None = None, precision: str | None = None,
                  num_workers: int | None = None):
    """(model in eval mode on ``device``, else on the config's ``eval.device``; the config with
    ``eval.precision`` and ``data.num_workers`` replaced by the values given)."""
    from pathm3.config import apply_overrides

    sets = [f"eval.precision={precision}"] if precision else []
    if num_workers is not None:
        sets.append(f"data.num_workers={num_workers}")
    return model.to(resolve_device(device or cfg.eval.device)).eval(), apply_overrides(cfg, sets)
