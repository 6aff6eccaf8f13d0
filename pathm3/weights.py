"""Reading pretrained weights from local Hugging Face folders (nothing is ever downloaded).

Every part that loads pretrained weights goes through these three functions, so a missing or
incomplete folder is always one error that names the folder and what to download into it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open

from pathm3.errors import DataError, MissingWeightsError


def read_hf_config(folder: str | os.PathLike, hint: str, key: str) -> dict[str, Any]:
    """``config.json`` of a local checkpoint folder, or an error naming what to download."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise MissingWeightsError(
            f"{folder}: no checkpoint here ({key}); download {hint} and put its files in this folder"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}: not valid JSON; download {hint} into {folder} again") from None


def read_tensors(folder: str | os.PathLike, prefix: str, hint: str, key: str) -> dict[str, torch.Tensor]:
    """Tensors whose name starts with ``prefix`` (prefix removed), from single or sharded safetensors."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise MissingWeightsError(
            f"{folder}: no model.safetensors ({key}); download {hint} in safetensors format into this folder"
        )
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for k in f.keys():
                if k.startswith(prefix):
                    out[k[len(prefix):]] = f.get_tensor(k)
    return out


def load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str,
              allow_missing: Sequence[str] = ()) -> None:
    """``load_state_dict`` that names the folder when the weights do not fit (regexes in
    ``allow_missing`` name keys that may be absent)."""
    result = module.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not any(re.search(p, k) for p in allow_missing)]
    if missing or result.unexpected_keys:
        raise DataError(
            f"{where}: weights do not fit the model (missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}); is this the checkpoint the config names?"
        )
