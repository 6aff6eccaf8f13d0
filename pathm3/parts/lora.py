"""A captioner's language model: built empty, filled from its folder, then frozen, LoRA or full.

``model.captioner.finetune`` chooses what training changes:

    frozen  nothing in the language model (the paper); it runs in eval mode, bf16 on CUDA
    lora    low-rank adapters (peft) on ``lora_targets``; the base stays frozen, bf16 on CUDA
    full    every weight

A model whose weights come from a folder is first built with its parameters on the meta device
(no memory, no random initialisation), then takes the folder's tensors as they are
(``load_state_dict(assign=True)``), so a 1B-parameter model loads in the time it takes to read it.
Buffers are built for real, so computed ones (rotary frequencies) keep their values.
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import chain
from typing import Iterator, Literal

import torch
from pydantic import Field
from torch import nn

from pathm3.errors import ConfigError, DataError
from pathm3.parts.base import PartConfig

# Attention projections LoRA adapts by default, per Hugging Face model_type.
DEFAULT_LORA_TARGETS = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "opt",
                     "biogpt"), ["q_proj", "v_proj"]),
    "gpt2": ["c_attn"],
    **dict.fromkeys(("t5", "mt5"), ["q", "v"]),
}


class FinetuneSettings(PartConfig):
    """What training changes in the language model (see the module docstring)."""

    finetune: Literal["frozen", "lora", "full"] = "frozen"
    lora_rank: int = Field(8, ge=1)  # r of the adapters
    lora_alpha: float = Field(16.0, gt=0)  # adapters are scaled by lora_alpha / lora_rank
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: list[str] | None = None  # module names to adapt; null: DEFAULT_LORA_TARGETS[model_type]


def apply_finetune(lm: nn.Module, cfg: FinetuneSettings, key: str = "model.captioner") -> None:
    """Freeze ``lm`` (frozen), or freeze it and add LoRA adapters (lora), or leave it (full)."""
    if cfg.finetune == "full":
        return
    lm.requires_grad_(False)
    if cfg.finetune == "frozen":
        lm.eval()
        return
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D

    model_type = lm.config.model_type
    targets = cfg.lora_targets or DEFAULT_LORA_TARGETS.get(model_type)
    if not targets:
        raise ConfigError(f"{key}.lora_targets: no default for model type {model_type!r}; list the attention "
                          "projections to adapt (e.g. [q_proj, v_proj])")
    conv1d = any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets for n, m in lm.named_modules())
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(targets), fan_in_fan_out=conv1d)  # GPT-2 stores Conv1D weights transposed
    try:
        inject_adapter_in_model(lora, lm)  # in place: only the adapters require gradients
    except ValueError as exc:
        raise ConfigError(f"{key}.lora_targets {list(targets)} do not fit this {model_type} model "
                          f"({str(exc).splitlines()[0]})") from None


def cast_frozen(lm: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters that do not train (a frozen model, LoRA's base) to ``dtype``; trained
    ones (adapters) keep fp32 for the optimizer."""
    for p in lm.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


# --------------------------------------------------------------------------------------------
# Built empty, filled from a folder


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside put every parameter on the meta device as it is registered, so its
    initialisation costs nothing; buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def fill_from_tensors(lm: nn.Module, tensors: dict[str, torch.Tensor], folder: str, key: str) -> None:
    """Give a model built under :func:`parameters_on_meta` a folder's tensors (as fp32), tie the
    weights the folder stores once (embeddings and output layer), and fail naming the folder if
    any weight is still missing or has the wrong shape."""
    own = lm.state_dict()
    prefix = getattr(lm, "base_model_prefix", "") + "."
    if prefix != "." and not own.keys() & tensors.keys() and own.keys() & {prefix + k for k in tensors}:
        tensors = {prefix + k: v for k, v in tensors.items()}  # saved from the bare model (GPT-2 on the Hub)
    for k, v in tensors.items():
        if k in own and own[k].shape != v.shape:
            raise DataError(f"{folder}: {k} has shape {tuple(v.shape)} but its config.json says "
                            f"{tuple(own[k].shape)} ({key}); download the model again")
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items() if k in own}
    missing = set(lm.load_state_dict(tensors, strict=False, assign=True).missing_keys)
    _quietly(lambda: lm.tie_weights(missing_keys=missing))
    empty = [n for n, t in chain(lm.named_parameters(), lm.named_buffers()) if t.is_meta]
    if empty:
        raise DataError(f"{folder}: weights missing ({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}) "
                        f"({key}); is this the model the config names? download it again")


def _quietly(fn) -> None:
    """Run ``fn`` with transformers' warnings off (tying FlanT5's separate output layer warns)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        fn()
    finally:
        logging.set_verbosity(level)
