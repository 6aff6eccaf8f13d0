"""Typed experiment configuration: YAML files in ``configs/`` loaded into dataclasses.

A config has four sections, ``data``, ``model``, ``train`` and ``eval``. Loading is strict: an
unknown key or a value of the wrong type is a :class:`~pathm3.errors.ConfigError` naming the
file and the dotted key, with a "did you mean" hint for typos::

    error: configs/x.yaml: model.qformer.num_querys is not a known key (did you mean num_queries?)

Every CLI that takes ``--config`` also takes repeated ``--set key=value`` overrides whose values
are parsed as YAML scalars (``--set train.max_epochs=3 --set data.classes=[a,b]``).

    cfg = load_config("configs/demo.yaml", overrides=["train.seed=1"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

from pathm3.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Schema


@dataclass
class DataConfig:
    """Where the bags and the manifest are, and how bags are fed to the model."""

    manifest: str = ""  # CSV: slide_id,label,caption,split
    bags_dir: str = ""  # folder of <slide_id>.h5 bags
    classes: list[str] = field(default_factory=list)  # ordered class names (index = label id)
    max_patches: int | None = None  # training only: random subset of at most this many patches
    strip_class_words: bool = False  # remove class phrases from captions used as classifier input
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class CorrelationConfig:
    """Nyström self-attention over the bag: E = MSA(LN(E)) + E (paper §3.1)."""

    enabled: bool = True  # false: skip the module (ablation), only the input projection remains
    hidden_dim: int = 1408  # width of the correlated patch embeddings (= Q-Former encoder width)
    layers: int = 1
    heads: int = 8
    landmarks: int = 256
    pinv_iterations: int = 6
    dropout: float = 0.1


@dataclass
class QFormerConfig:
    """BLIP-2 Q-Former: learnable queries that cross-attend to the patches."""

    pretrained: str | None = None  # local BLIP-2 checkpoint folder (Q-Former + query tokens)
    text_pretrained: str | None = None  # folder with Q-Former text embeddings (blip2-itm / BERT)
    tokenizer: str | None = None  # BERT-style tokenizer folder for captions fed to the Q-Former
    num_queries: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    vocab_size: int = 30522
    max_text_length: int = 128
    dropout: float = 0.1
    # Weight init std of a randomly initialised Q-Former; null: 1/sqrt(hidden_size). BERT's
    # 0.02 suits width 768 only: at small widths it leaves query-key logits flat, and the
    # model memorises bag noise instead of learning where to look.
    init_std: float | None = None


@dataclass
class CaptionerConfig:
    """Frozen FlanT5 fed the projected query outputs (paper §3.3)."""

    enabled: bool = True
    pretrained: str | None = None  # local FlanT5 or BLIP-2 FlanT5 checkpoint folder
    tokenizer: str | None = None  # T5 tokenizer folder (defaults to `pretrained`)
    freeze: bool = True  # the paper keeps the language model frozen
    prompt: str = ""
    max_caption_length: int = 128
    # Generation defaults (override per call).
    num_beams: int = 5
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    # Architecture of a randomly initialised T5 (only when `pretrained` is null: tests, demo).
    d_model: int = 2048
    num_layers: int = 24
    num_decoder_layers: int | None = None
    num_heads: int = 32
    d_kv: int = 64
    d_ff: int = 5120
    vocab_size: int = 32128


@dataclass
class ModelConfig:
    """The PathM3 model (paper Table 6 defaults)."""

    feature_dim: int = 1408  # width D of the bag features (ViT-g/14: 1408)
    correlation: CorrelationConfig = field(default_factory=CorrelationConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    alpha: float = 0.5  # L = alpha * L_cls + (1 - alpha) * L_gen
    text_input: Literal["always", "never", "dropout"] = "dropout"  # caption as classifier input
    text_dropout: float = 0.5  # with text_input=dropout: P(drop the caption) in training
    classifier_dropout: float = 0.1
    patch_dropout: float = 0.25  # training only: fraction of patches dropped from each bag


@dataclass
class TrainConfig:
    """Optimisation and run layout (paper Table 6 defaults)."""

    output_dir: str = "runs"
    name: str = "pathm3"
    task: Literal["multitask", "classification", "captioning"] = "multitask"
    seed: int = 0
    max_epochs: int = 50
    max_steps: int = -1
    batch_size: int = 16
    accumulate_grad_batches: int = 1
    lr: float = 1e-4
    warmup_lr: float = 1e-5
    warmup_steps: int = 1000
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    gradient_clip: float = 1.0
    precision: str = "auto"  # auto: bf16-mixed on CUDA, 32 on CPU
    accelerator: str = "auto"
    devices: Union[int, str, list[int]] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    monitor: str = "val/accuracy"
    monitor_mode: Literal["max", "min"] = "max"
    check_val_every_n_epoch: int = 1
    deterministic: bool = True


@dataclass
class EvalConfig:
    """Evaluation defaults."""

    split: str = "test"
    batch_size: int = 4
    num_beams: int = 5
    max_new_tokens: int = 64


@dataclass
class Config:
    """A whole experiment: the four sections of a YAML file in ``configs/``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides.

    Raises :class:`ConfigError` naming the file (or ``--set``) and the offending key.
    """
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    cfg = _build(Config, raw, prefix="", source=source)
    return apply_overrides(cfg, overrides)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a validated :class:`Config` from a plain nested dict (e.g. stored in a checkpoint)."""
    return _build(Config, raw, prefix="", source=source)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Return a copy of ``cfg`` with ``section.key=value`` overrides applied and validated."""
    raw = config_to_dict(cfg)
    for item in overrides:
        source = f"--set {item}"
        key, sep, value_text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{source}: expected KEY=VALUE, e.g. --set train.max_epochs=3")
        try:
            value = yaml.safe_load(value_text) if value_text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: value is not valid YAML ({exc.problem})") from None
        parts = key.split(".")
        node: Any = raw
        node_type: Any = Config
        for depth, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(node_type)]
            dotted = ".".join(parts[: depth + 1])
            if part not in names:
                raise ConfigError(f"{source}: {_unknown_key_message(dotted, part, names)}")
            field_type = _field_types(node_type)[part]
            if depth == len(parts) - 1:
                node[part] = value
            else:
                if not dataclasses.is_dataclass(field_type):
                    raise ConfigError(f"{source}: {dotted} is a value, not a section")
                node = node[part]
                node_type = field_type
        cfg = _build(Config, raw, prefix="", source=source)
    return cfg


def add_config_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """Add ``--config FILE`` and repeated ``--set KEY=VALUE`` to a CLI parser."""
    parser.add_argument(
        "--config", required=required, metavar="FILE", help="experiment YAML file (see configs/)"
    )
    add_set_arg(parser)


def add_set_arg(parser: argparse.ArgumentParser) -> None:
    """Add repeated ``--set KEY=VALUE`` config overrides (collected in ``args.overrides``)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.max_epochs=3 (repeatable; "
        "VALUE is read as YAML, so lists look like [a,b])",
    )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (YAML/JSON friendly)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically) and return the path."""
    from pathm3.files import write_text

    return write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------------------------
# Strict dataclass construction


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (see configs/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections data/model/train/eval")
    return raw


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key_message(dotted: str, key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(known)})"
    return f"{dotted} is not a known key{hint}"


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(raw).__name__}")
    types_ = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(f"{source}: {_unknown_key_message(prefix + str(key), str(key), names)}")
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(raw[name], types_[name], prefix + name, source)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=key + ".", source=source)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                continue
        raise _type_error(value, tp, key, source)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _type_error(value, tp, key, source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, key, source)
        (item_type,) = typing.get_args(tp)
        return [_coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(value, tp, key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, tp, key, source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(value, tp, key, source)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(value, tp, key, source)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(value, tp, key, source)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in the schema


def _type_error(value: Any, tp: Any, key: str, source: str) -> ConfigError:
    return ConfigError(f"{source}: {key} must be {_type_name(tp)}, got {value!r}")


# --------------------------------------------------------------------------------------------
# `python -m pathm3.config FILE [--set K=V ...]`: check a config and print it resolved.


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pathm3.config",
        description="Check an experiment config and print it with defaults and overrides applied.",
    )
    parser.add_argument("config", metavar="FILE", help="experiment YAML file (see configs/)")
    add_set_arg(parser)
    from pathm3.errors import add_debug_flag

    add_debug_flag(parser)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    import sys

    from pathm3.errors import run_cli

    sys.exit(run_cli(_main))
