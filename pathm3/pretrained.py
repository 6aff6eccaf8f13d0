"""Pretrained parts from local folders, and PathM3's own checkpoints.

Folders (Hugging Face format, read with ``local_files_only``; nothing is downloaded):

* ``model.qformer.pretrained``: a BLIP-2 FlanT5 checkpoint (e.g. a download of
  ``Salesforce/blip2-flan-t5-xl``): ``qformer.*``, ``query_tokens``, ``language_projection.*``.
* ``model.qformer.text_pretrained``: the Q-Former's text parts, which the FlanT5 checkpoints lack:
  a BLIP-2 ITM checkpoint (``Salesforce/blip2-itm-vit-g``: ``embeddings.*`` and each layer's text
  feed-forward) or a BERT folder (``bert-base-uncased``). Without it they start from the query
  feed-forward weights and random word embeddings.
* ``model.qformer.tokenizer``: a BERT tokenizer folder (``bert-base-uncased``).
* ``model.captioner.pretrained``: a plain FlanT5 folder (``google/flan-t5-xl``) or the BLIP-2 folder
  (its ``language_model.*``); its tokenizer comes from the same folder unless
  ``model.captioner.tokenizer`` is set.

Our checkpoints are one safetensors file holding the trainable weights (never the frozen T5) and,
in its metadata, the resolved config, the class names and any tokenizer built from captions.
Loading reads tensors and JSON only; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Blip2QFormerConfig, T5Config

from pathm3.config import Config, ModelConfig, config_from_dict, config_to_dict
from pathm3.errors import DataError, MissingWeightsError
from pathm3.files import atomic_output
from pathm3.model import PathM3, qformer_config, t5_config
from pathm3.text import load_tokenizer, word_tokenizer_from_json, word_tokenizer_to_json

BLIP2_HINT = "a BLIP-2 FlanT5 checkpoint in Hugging Face format (e.g. Salesforce/blip2-flan-t5-xl)"
TEXT_HINT = "Salesforce/blip2-itm-vit-g (or bert-base-uncased)"
BERT_TOKENIZER_HINT = "bert-base-uncased (its tokenizer files)"
T5_HINT = "google/flan-t5-xl (or use the BLIP-2 FlanT5 folder)"
CHECKPOINT_FORMAT = "pathm3-checkpoint-1"

# --------------------------------------------------------------------------------------------
# Reading local Hugging Face folders


def read_hf_config(folder: str | os.PathLike, hint: str, key: str) -> dict[str, Any]:
    """``config.json`` of a local checkpoint folder, or an error naming what to download."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise MissingWeightsError(
            f"{folder}: no checkpoint here ({key}); download {hint} and put its files in this folder"
        )
    return json.loads(path.read_text())


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


def _load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str, allow_missing=()) -> None:
    result = module.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not any(re.search(p, k) for p in allow_missing)]
    if missing or result.unexpected_keys:
        raise DataError(
            f"{where}: weights do not fit the model (missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}); is this the checkpoint the config names?"
        )


# --------------------------------------------------------------------------------------------
# Building the model


def _architectures(cfg: ModelConfig) -> tuple[Blip2QFormerConfig, T5Config | None]:
    qcfg = qformer_config(cfg)
    q = cfg.qformer
    if q.pretrained:
        blip = read_hf_config(q.pretrained, BLIP2_HINT, "model.qformer.pretrained")
        qcfg = Blip2QFormerConfig(**{**blip["qformer_config"], "use_qformer_text_input": True})
        if blip.get("num_query_tokens", q.num_queries) != q.num_queries:
            raise DataError(
                f"{q.pretrained}: has {blip['num_query_tokens']} query tokens but "
                f"model.qformer.num_queries is {q.num_queries}"
            )
        if qcfg.encoder_hidden_size != cfg.correlation.hidden_dim:
            raise DataError(
                f"{q.pretrained}: the Q-Former cross-attends to width {qcfg.encoder_hidden_size} but "
                f"model.correlation.hidden_dim is {cfg.correlation.hidden_dim}"
            )
    tcfg = None
    c = cfg.captioner
    if c.enabled:
        tcfg = t5_config(c)
        if c.pretrained:
            raw = read_hf_config(c.pretrained, T5_HINT, "model.captioner.pretrained")
            tcfg = T5Config(**raw["text_config"]) if raw.get("model_type") == "blip-2" else T5Config(**raw)
    return qcfg, tcfg


def _load_pretrained_weights(model: PathM3, cfg: ModelConfig) -> None:
    q, c = cfg.qformer, cfg.captioner
    if q.pretrained:
        folder = q.pretrained
        # The FlanT5 checkpoints carry no text feed-forward: start it from the query one.
        qf = read_tensors(folder, "qformer.", BLIP2_HINT, "model.qformer.pretrained")
        for k in list(qf):
            if "_query." in k:
                qf.setdefault(k.replace("_query.", "."), qf[k].clone())
        _load_into(model.qformer, qf, str(folder))
        model.query_tokens.data.copy_(read_tensors(folder, "query_tokens", BLIP2_HINT, "model.qformer.pretrained")[""])
        if model.t5 is not None:
            proj = read_tensors(folder, "language_projection.", BLIP2_HINT, "model.qformer.pretrained")
            if proj and proj["weight"].shape == model.language_projection.weight.shape:
                model.language_projection.load_state_dict(proj)
    if q.text_pretrained:
        _load_qformer_text(model, q.text_pretrained)
    if model.t5 is not None and c.pretrained:
        raw = read_hf_config(c.pretrained, T5_HINT, "model.captioner.pretrained")
        prefix = "language_model." if raw.get("model_type") == "blip-2" else ""
        t5 = read_tensors(c.pretrained, prefix, T5_HINT, "model.captioner.pretrained")
        _load_into(model.t5, t5, str(c.pretrained), allow_missing=(r"embed_tokens", r"lm_head"))


def _load_qformer_text(model: PathM3, folder: str) -> None:
    raw = read_hf_config(folder, TEXT_HINT, "model.qformer.text_pretrained")
    is_bert = raw.get("model_type") == "bert"
    emb_prefix = "bert.embeddings." if is_bert else "embeddings."
    layer_prefix = "bert.encoder.layer." if is_bert else "qformer.encoder.layer."
    emb = read_tensors(folder, emb_prefix, TEXT_HINT, "model.qformer.text_pretrained")
    emb = {k: v for k, v in emb.items() if k.split(".")[0] in ("word_embeddings", "position_embeddings")}
    _load_into(model.text_embeddings, emb, folder)
    layers = read_tensors(folder, layer_prefix, TEXT_HINT, "model.qformer.text_pretrained")
    text_ffn = {f"encoder.layer.{k}": v for k, v in layers.items() if re.match(r"\d+\.(intermediate|output)\.", k)}
    model.qformer.load_state_dict(text_ffn, strict=False)


def resolve_tokenizers(cfg: ModelConfig, fallback=None):
    """(qformer_tokenizer, t5_tokenizer) from local folders, else ``fallback`` (a built one)."""
    q, c = cfg.qformer, cfg.captioner
    q_tok = load_tokenizer(q.tokenizer, "Q-Former (BERT)", BERT_TOKENIZER_HINT) if q.tokenizer else fallback
    t5_folder = c.tokenizer or c.pretrained
    t5_tok = load_tokenizer(t5_folder, "T5", T5_HINT) if (c.enabled and t5_folder) else fallback
    if q_tok is None or (c.enabled and t5_tok is None):
        raise MissingWeightsError(
            "no tokenizer: set model.qformer.tokenizer (a bert-base-uncased folder) and "
            "model.captioner.pretrained or model.captioner.tokenizer (a flan-t5 folder)"
        )
    return q_tok, t5_tok


def build_model(cfg: ModelConfig, num_classes: int, fallback_tokenizer=None, load_weights: bool = True) -> PathM3:
    """Build PathM3 from the ``model`` config, loading every pretrained part from local folders."""
    qcfg, tcfg = _architectures(cfg)
    q_tok, t5_tok = resolve_tokenizers(cfg, fallback_tokenizer)
    model = PathM3(cfg, num_classes, q_tok, t5_tok, qformer_cfg=qcfg, t5_cfg=tcfg)
    if load_weights:
        _load_pretrained_weights(model, cfg)
    return model


# --------------------------------------------------------------------------------------------
# Our own checkpoints


def save_checkpoint(model: PathM3, path: str | os.PathLike, config: Config, classes: list[str]) -> Path:
    """Save the trainable weights (not the frozen T5) and the config, as safetensors, atomically."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        if (model.t5_frozen and k.startswith("t5.")) or v.data_ptr() in seen:
            continue  # frozen parts come from their folder; tied weights are stored once
        seen.add(v.data_ptr())
        tensors[k] = v.detach().cpu().contiguous()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(config_to_dict(config)),
        "classes": json.dumps(list(classes)),
    }
    if not config.model.qformer.tokenizer:
        meta["qformer_tokenizer"] = word_tokenizer_to_json(model.qformer_tokenizer)
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[PathM3, Config, list[str]]:
    """Load a checkpoint written by :func:`save_checkpoint`: (model in eval mode, config, classes)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise DataError(f"{path}: not a PathM3 checkpoint ({exc})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a PathM3 checkpoint (no '{CHECKPOINT_FORMAT}' metadata)")
    config = config_from_dict(json.loads(meta["config"]), source=str(path))
    classes = json.loads(meta["classes"])
    fallback = word_tokenizer_from_json(meta["qformer_tokenizer"]) if "qformer_tokenizer" in meta else None
    model = build_model(config.model, len(classes), fallback, load_weights=model_needs_frozen_weights(config.model))
    load_trainable_state(model, tensors, str(path))
    return model.eval(), config, classes


def model_needs_frozen_weights(cfg: ModelConfig) -> bool:
    """Whether loading a checkpoint must read pretrained folders (for the frozen T5)."""
    return bool(cfg.captioner.enabled and cfg.captioner.freeze and cfg.captioner.pretrained)


def load_trainable_state(model: PathM3, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load a checkpoint's tensors; anything but the frozen T5 missing or extra is an error."""
    own = model.state_dict()
    for k, v in tensors.items():
        if k in own and own[k].shape != v.shape:
            raise DataError(
                f"{where}: {k} has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)}; "
                "this checkpoint was trained with another config"
            )
    allow = [r"^t5\."] if model.t5_frozen else []
    by_storage: dict[int, list[str]] = {}
    for k, v in own.items():
        by_storage.setdefault(v.data_ptr(), []).append(k)
    for names in by_storage.values():  # tied weights: one stored name fills them all
        if len(names) > 1 and any(n in tensors for n in names):
            allow += [f"^{re.escape(n)}$" for n in names if n not in tensors]
    _load_into(model, tensors, where, allow_missing=allow)
