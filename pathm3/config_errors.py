"""Pydantic validation errors as one line naming the dotted key, the rule and the value.

    model.aggregator.num_querys is not a known key (did you mean num_queries?)
    train.max_epochs must be int, got 'three'
    model.alpha must be less than or equal to 1, got 1.5
    model.qformer is now model.aggregator (type: qformer)
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ValidationError

# Keys of earlier releases: a config that still uses one is told the new name.
RENAMED = {
    "model.correlation.enabled": "model.mixer.type (nystrom, or none for the no-correlation ablation)",
    "model.correlation": "model.mixer (type: nystrom; `enabled: false` is now `type: none`)",
    "model.qformer": "model.aggregator (type: qformer)",
    "model.text_input": "model.aggregator.text_input",
    "model.text_dropout": "model.aggregator.text_dropout",
    "model.classifier_dropout": "model.head.dropout",
    "model.captioner.enabled": "model.captioner.type (t5, causal_lm, or none for no captioner)",
    "model.captioner.freeze": "model.captioner.finetune (frozen, lora or full; `freeze: true` is `finetune: frozen`, "
                              "`freeze: false` is `finetune: full`)",
}
TYPE_ERRORS = {"int_type", "float_type", "bool_type", "string_type", "list_type", "literal_error", "int_from_float",
               "float_parsing", "int_parsing", "bool_parsing", "none_required", "is_instance_of"}
MAPPING_ERRORS = {"model_type", "dict_type", "model_attributes_type"}


def explain(exc: ValidationError, root: type[BaseModel]) -> str:
    """The first error of ``exc`` as one line (``root`` is the validated model class)."""
    err = exc.errors(include_url=False)[0]
    key, annotation, parent = _walk(err["loc"], root)
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "extra_forbidden":
        for old, new in RENAMED.items():
            if key == old or key.startswith(old + "."):
                return f"{old} is now {new}"
        return unknown_key_message(key, list(parent.model_fields) if parent else [])
    if kind == "missing":
        return f"{key} is required"
    if kind == "union_tag_invalid":
        return f"{key}.type must be one of {ctx.get('expected_tags')}, got {ctx.get('tag')!r}"
    if kind in MAPPING_ERRORS:
        return f"{key or 'the config'} must be a mapping, got {type(value).__name__}"
    if kind in TYPE_ERRORS:
        return f"{key} must be {type_name(annotation)}, got {value!r}"
    if kind == "value_error":
        message = err["msg"].removeprefix("Value error, ")
        return f"{key}.{message}" if key else message
    message = err["msg"].replace("Input should be", "must be").replace("List should have", "must have")
    return f"{key} {message}, got {value!r}" if key else message


def unknown_key_message(dotted: str, known: list[str]) -> str:
    """``X is not a known key (did you mean Y?)``, or the list of known keys."""
    key = dotted.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(known)})"
    return f"{dotted} is not a known key{hint}"


def _walk(loc: tuple, root: type[BaseModel]) -> tuple[str, Any, type[BaseModel] | None]:
    """(dotted key, annotation at the error, model class holding the last key) along ``loc``,
    skipping the union-member labels pydantic puts in ``loc``."""
    names: list[str] = []
    cls: Any = root
    annotation: Any = root
    parent = None
    for item in loc:
        if isinstance(item, int):
            names[-1] += f"[{item}]"
            args = typing.get_args(annotation)
            annotation = args[0] if args else Any
            continue
        if _is_model(cls) and item in cls.model_fields:
            parent, annotation = cls, cls.model_fields[item].annotation
            names.append(item)
            cls = annotation if _is_model(annotation) else None
            continue
        member = _union_member(annotation, item)
        if member is not None:  # a union member label, or a `type:` tag
            if _is_model(member):
                cls = annotation = member
            continue
        parent = cls if _is_model(cls) else parent
        names.append(str(item))
        cls = None
    return ".".join(names), annotation, parent


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _union_member(annotation: Any, label: str) -> Any:
    if typing.get_origin(annotation) not in (Union, types.UnionType):
        return None
    for option in typing.get_args(annotation):
        if _is_model(option) and "type" in option.model_fields and option.model_fields["type"].default == label:
            return option
        if label in (getattr(option, "__name__", None), str(option), type_name(option)) or \
                label == repr(option).replace("typing.", ""):
            return option
    return None


def type_name(tp: Any) -> str:
    """``int``, ``list of str``, ``'a' | 'b'``, ``int or null``: how an annotation reads in a message."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if _is_model(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))
