"""Building the model with its pretrained parts, and PathM3's own checkpoints.

Pretrained parts load from local Hugging Face folders named in the config (nothing is
downloaded); each part reads its own (see :mod:`pathm3.parts.qformer` and :mod:`pathm3.parts.t5`).

Our checkpoints are one safetensors file holding what was trained (:meth:`PathM3.checkpoint_state_dict`:
never the frozen weights of a pretrained language model, nor LoRA's base, which are read from
their folder again) and, in its metadata, the resolved config, the class names and any tokenizer
built from captions. Loading reads tensors and JSON only; nothing is unpickled. Checkpoints of the
first release (``pathm3-checkpoint-1``) and configs with the captioner's ``freeze`` are converted
on load.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pathm3 import legacy
from pathm3.config import Config, config_from_dict, config_to_dict
from pathm3.errors import ConfigError, DataError, MissingWeightsError
from pathm3.files import atomic_output
from pathm3.model import PathM3
from pathm3.text import load_tokenizer, word_tokenizer_from_json, word_tokenizer_to_json
from pathm3.weights import load_into

CHECKPOINT_FORMAT = "pathm3-checkpoint-2"
TOKENIZER_HINTS = {"aggregator": "bert-base-uncased (its tokenizer files)",
                   "t5": "google/flan-t5-xl (or use the BLIP-2 FlanT5 folder)",
                   "causal_lm": "the causal language model's tokenizer files (tokenizer.json, tokenizer_config.json)"}


def resolve_tokenizers(cfg: Config, fallback=None):
    """(text_tokenizer, caption_tokenizer) from the local folders the config names, else ``fallback``
    (a word tokenizer built from the training captions). None where no part needs one."""
    m = cfg.model
    needs_text = m.aggregator.type == "qformer" and (m.aggregator.text_input != "never"
                                                     or cfg.train.contrastive.weight > 0)
    out = []
    for section, needed in (("aggregator", needs_text), ("captioner", m.captioner.type != "none")):
        part = getattr(m, section)
        folder = getattr(part, "tokenizer", None) or (getattr(part, "pretrained", None) if section == "captioner" else None)
        hint = TOKENIZER_HINTS[section if section == "aggregator" else part.type] if needed else ""
        tok = load_tokenizer(folder, section, hint) if (needed and folder) else fallback
        if needed and tok is None:
            raise MissingWeightsError(f"no tokenizer for model.{section}: set model.{section}.tokenizer "
                                      f"(a folder with {hint})")
        out.append(tok if needed else None)
    return tuple(out)


def needs_built_tokenizer(cfg: Config) -> bool:
    """Whether some part needs a tokenizer and no folder names one (tests, the demo)."""
    try:
        resolve_tokenizers(cfg)
    except MissingWeightsError:
        return True
    return False


def build_model(cfg: Config, fallback_tokenizer=None, load_weights: bool = True) -> PathM3:
    """Build the model of a config, loading every pretrained part from its local folder."""
    model = PathM3(cfg.model, len(cfg.data.classes), cfg.head_type,  # a missing weights folder fails here
                   contrastive=cfg.train.contrastive, terms=cfg.train.terms,
                   prototypes=cfg.train.prototypes)
    model.set_tokenizers(*resolve_tokenizers(cfg, fallback_tokenizer))
    if load_weights:
        model.load_pretrained()
    return model


# --------------------------------------------------------------------------------------------
# Our own checkpoints


def save_checkpoint(model: PathM3, path: str | os.PathLike, config: Config, classes: list[str] | None = None,
                    tokenizer=None, provenance: dict | None = None) -> Path:
    """Save what was trained (:meth:`PathM3.checkpoint_state_dict`) and the config, as safetensors, atomically.
    ``tokenizer``: the word tokenizer built from captions, when the run built one; ``provenance``:
    how the training bags were extracted (:mod:`pathm3.provenance`)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.checkpoint_state_dict().items():
        if v.data_ptr() in seen:
            continue  # tied weights are stored once
        seen.add(v.data_ptr())
        tensors[k] = v.detach().cpu().contiguous()
    meta = {"format": CHECKPOINT_FORMAT, "config": json.dumps(config_to_dict(config)),
            "classes": json.dumps(list(classes if classes is not None else config.data.classes))}
    if tokenizer is not None:
        meta["tokenizer"] = word_tokenizer_to_json(tokenizer)
    if provenance is not None:
        meta["provenance"] = json.dumps(provenance)
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checkpoint file, converted from older formats."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise DataError(f"{path}: not a PathM3 checkpoint ({' '.join(str(exc).split())})") from None
    fmt = meta.get("format")
    if fmt not in (CHECKPOINT_FORMAT, legacy.FORMAT):
        raise DataError(f"{path}: not a PathM3 checkpoint (no '{CHECKPOINT_FORMAT}' metadata)")
    for key in ("config", "classes", "provenance"):
        try:
            value = json.loads(meta[key]) if key in meta else None
        except json.JSONDecodeError:
            raise DataError(f"{path}: damaged checkpoint (its {key} metadata is not JSON); use another checkpoint") from None
        if key != "provenance" and value is None:
            raise DataError(f"{path}: damaged checkpoint (no {key} metadata); use another checkpoint")
        if value is not None:
            names = key == "classes"
            ok = isinstance(value, list) and all(isinstance(c, str) for c in value) if names else isinstance(value, dict)
            if not ok:
                raise DataError(f"{path}: damaged checkpoint (its {key} metadata is not a "
                                f"{'list of names' if names else 'mapping'})")
    raw = json.loads(meta["config"])
    if fmt == legacy.FORMAT:
        tensors, raw = legacy.upgrade_tensors(tensors), legacy.upgrade_config(raw)
        if "qformer_tokenizer" in meta:
            meta["tokenizer"] = meta.pop("qformer_tokenizer")
    meta["config"] = json.dumps(legacy.upgrade_finetune(raw))
    return tensors, meta


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> tuple[PathM3, Config, list[str]]:
    """Load a checkpoint written by :func:`save_checkpoint`: (model in eval mode on ``map_location``,
    config, classes). Weights the checkpoint leaves out (a frozen language model, LoRA's base) are
    read from the folders the config names; a missing folder is an error naming it."""
    tensors, meta = read_checkpoint(path)
    classes = json.loads(meta["classes"])
    try:
        config = config_from_dict(json.loads(meta["config"]), source=str(path))
    except ConfigError as exc:  # a checkpoint is a data file: its config is not the user's to fix
        raise DataError(f"{exc} (damaged checkpoint; use another)") from None
    if len(classes) != len(config.data.classes) and config.data.classes:
        raise DataError(f"{path}: damaged checkpoint ({len(classes)} class names for a {len(config.data.classes)}-class config)")
    tokenizer = _tokenizer(meta, path)
    model = build_model(config, tokenizer, load_weights=False)
    model.load_pretrained(only_missing=True)
    load_trainable_state(model, tensors, str(path))
    return model.to(map_location).eval(), config, classes


def checkpoint_tokenizer(path: str | os.PathLike):
    """The word tokenizer stored in a checkpoint, or None."""
    return _tokenizer(read_checkpoint(path)[1], path)


def _tokenizer(meta: dict[str, str], path: str | os.PathLike):
    if "tokenizer" not in meta:
        return None
    try:
        return word_tokenizer_from_json(meta["tokenizer"])
    except Exception:  # the tokenizers library raises plain Exception for bad JSON
        raise DataError(f"{path}: damaged checkpoint (its tokenizer metadata cannot be read); use another") from None


def checkpoint_provenance(path: str | os.PathLike) -> dict | None:
    """How the bags a checkpoint was trained on were extracted, or None (older checkpoints)."""
    _, meta = read_checkpoint(path)
    return json.loads(meta["provenance"]) if "provenance" in meta else None


def load_trainable_state(model: PathM3, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load a checkpoint's tensors; a missing key is an error unless the checkpoint leaves it out by
    design (:meth:`PathM3.unstored_keys`) or it is tied to a stored one; an extra key is an error."""
    own = model.state_dict()
    for k, v in tensors.items():
        if k in own and own[k].shape != v.shape:
            raise DataError(f"{where}: {k} has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)}; "
                            "this checkpoint was trained with another config")
    allow = [f"^{re.escape(k)}$" for k in model.unstored_keys()]
    by_storage: dict[int, list[str]] = {}
    for k, v in own.items():
        by_storage.setdefault(v.data_ptr(), []).append(k)
    for names in by_storage.values():  # tied weights: one stored name fills them all
        if len(names) > 1 and any(n in tensors for n in names):
            allow += [f"^{re.escape(n)}$" for n in names if n not in tensors]
    load_into(model, tensors, where, allow_missing=allow)
