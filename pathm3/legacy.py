"""Checkpoints of the first release (format ``pathm3-checkpoint-1``), read as today's.

That release had one model class: ``correlation`` / ``qformer`` / ``classifier`` /
``language_projection`` / ``t5`` at the top of the state dict, and the config sections
``model.correlation`` (with ``enabled``), ``model.qformer``, ``model.text_input``,
``model.text_dropout``, ``model.classifier_dropout``, ``model.captioner`` (with ``enabled``).
Both map one to one onto the parts, so old checkpoints load with identical outputs.

Checkpoints of both formats written before ``model.captioner.finetune`` existed say
``freeze: true`` (now ``finetune: frozen``) or ``freeze: false`` (now ``finetune: full``);
:func:`upgrade_finetune` converts them and stores the same tensors either way.
"""

from __future__ import annotations

from typing import Any

import torch

FORMAT = "pathm3-checkpoint-1"
KEY_PREFIXES = (  # old state-dict prefix -> new
    ("correlation.", "mixer."),
    ("query_tokens", "aggregator.query_tokens"),
    ("text_embeddings.", "aggregator.text_embeddings."),
    ("qformer.", "aggregator.qformer."),
    ("classifier.", "head.classifier."),
    ("language_projection.", "captioner.language_projection."),
    ("t5.", "captioner.t5."),
)


def upgrade_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a format-1 state dict's keys to the parts' names."""
    out = {}
    for key, value in tensors.items():
        new = next((n + key[len(o):] for o, n in KEY_PREFIXES if key.startswith(o)), key)
        out[new] = value
    return out


def upgrade_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A format-1 config dict in today's layout."""
    raw = {**raw, "model": dict(raw.get("model", {}))}
    model = raw["model"]
    correlation = dict(model.pop("correlation", {}))
    if correlation.pop("enabled", True):
        model["mixer"] = {"type": "nystrom", **correlation}
    else:
        hidden = correlation.get("hidden_dim")
        model["mixer"] = {"type": "none", "hidden_dim": None if hidden == model.get("feature_dim") else hidden}
    aggregator = {"type": "qformer", **model.pop("qformer", {})}
    for key in ("text_input", "text_dropout"):
        if key in model:
            aggregator[key] = model.pop(key)
    model["aggregator"] = aggregator
    model["head"] = {"type": "auto", "dropout": model.pop("classifier_dropout", 0.1)}
    captioner = dict(model.pop("captioner", {}))
    model["captioner"] = {"type": "t5", **captioner} if captioner.pop("enabled", True) else {"type": "none"}
    return upgrade_finetune(raw)


def upgrade_finetune(raw: dict[str, Any]) -> dict[str, Any]:
    """A config dict with the captioner's ``freeze: bool`` as ``finetune: frozen | full``."""
    captioner = (raw.get("model") or {}).get("captioner")
    if not isinstance(captioner, dict) or "freeze" not in captioner:
        return raw
    captioner = dict(captioner)
    captioner["finetune"] = "frozen" if captioner.pop("freeze") else "full"
    return {**raw, "model": {**raw["model"], "captioner": captioner}}
