"""Typed experiment configuration: YAML files in ``configs/`` validated by pydantic.

A config has four sections, ``data``, ``model``, ``train`` and ``eval``. Model parts are chosen
by ``type:`` (``model.mixer``, ``model.aggregator``, ``model.head``, ``model.captioner``); each
type has its own settings class, next to its module in :mod:`pathm3.parts`. Loading is strict:
an unknown key, a value of the wrong type or out of range is a :class:`~pathm3.errors.ConfigError`
naming the file and the dotted key::

    error: configs/x.yaml: model.aggregator.num_querys is not a known key (did you mean num_queries?)
    error: configs/x.yaml: model.alpha must be less than or equal to 1, got 1.5

Pydantic does the validation (discriminated unions for ``type:``, ranges, strict types); this
module turns its errors into those lines. Every CLI that takes ``--config`` also takes repeated
``--set key=value`` overrides whose values are parsed as YAML (``--set data.classes=[a,b]``).

    cfg = load_config("configs/demo.yaml", overrides=["train.seed=1"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from pathm3.config_errors import explain
from pathm3.errors import ConfigError
from pathm3.parts import AGGREGATORS, CAPTIONER_CONFIGS, CAPTIONERS, MIXERS, section_type
from pathm3.parts.base import PartConfig as Section
from pathm3.parts.contrastive import ContrastiveConfig
from pathm3.parts.heads import HeadConfig
from pathm3.parts.nystrom import NystromConfig
from pathm3.parts.qformer import QFormerConfig
from pathm3.parts.t5 import T5CaptionerConfig
from pathm3.parts.prototypes import PrototypesConfig
from pathm3.parts.terms import TermsConfig

# --------------------------------------------------------------------------------------------
# Schema


class DataConfig(Section):
    """Where the bags and the manifest are, and how bags are fed to the model."""

    manifest: str = ""  # CSV: slide_id,label,caption,split (multi-label: one column per class)
    bags_dir: str = ""  # folder of <slide_id>.h5 bags
    classes: list[str] = []  # ordered class names (index = label id)
    multilabel: bool = False  # several findings per slide: one 1/0/empty manifest column per class
    max_patches: int | None = Field(None, ge=1)  # training only: random subset of at most this many patches
    strip_class_words: bool = False  # remove class phrases from captions used as classifier input
    num_workers: int = Field(0, ge=0)  # DataLoader worker processes
    # The words captions use for each class ({class: [phrase, ...]}), for captioning.class_agreement;
    # a class not listed is named by its own name (underscores read as spaces).
    class_phrases: dict[str, list[str]] = {}


class ModelConfig(Section):
    """The model: mixer -> aggregator -> head (+ captioner); paper Table 6 defaults."""

    feature_dim: int = Field(1408, ge=1)  # width D of the bag features (ViT-g/14: 1408)
    mixer: section_type(MIXERS) = Field(default_factory=NystromConfig)
    aggregator: section_type(AGGREGATORS) = Field(default_factory=QFormerConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    captioner: section_type(CAPTIONERS, CAPTIONER_CONFIGS) = Field(default_factory=T5CaptionerConfig)
    alpha: float = Field(0.5, ge=0, le=1)  # L = alpha * L_cls + (1 - alpha) * L_gen
    patch_dropout: float = Field(0.25, ge=0, lt=1)  # training only: fraction of patches dropped from each bag
    # training only: weight of an extra classification loss on pairs of bags merged into one, whose
    # target is both bags' classes (PathM3._mixed_loss); 0 = off
    bag_mix: float = Field(0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _default_types(cls, raw: Any) -> Any:
        """A section without ``type:`` is the default part (nystrom, qformer, t5)."""
        if isinstance(raw, dict):
            raw = dict(raw)
            for key, default in DEFAULT_TYPES.items():
                if isinstance(raw.get(key), dict) and "type" not in raw[key]:
                    raw[key] = {"type": default, **raw[key]}
        return raw


DEFAULT_TYPES = {"mixer": "nystrom", "aggregator": "qformer", "captioner": "t5"}


PartName = Literal["mixer", "aggregator", "head", "captioner", "projection", "contrastive", "terms",
                   "prototypes"]


class ParamGroupConfig(Section):
    """One part's optimizer settings in ``train.param_groups`` (unset: the train section's)."""

    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)


class TrainConfig(Section):
    """Optimisation and run layout (paper Table 6 defaults)."""

    output_dir: str = "runs"
    name: str = "pathm3"
    task: Literal["multitask", "classification", "captioning"] = "multitask"
    seed: int = Field(0, ge=0)
    max_epochs: int = Field(50, ge=1)
    max_steps: int = Field(-1, ge=-1)  # -1: no limit
    batch_size: int = Field(16, ge=1)
    accumulate_grad_batches: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_lr: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(1000, ge=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)
    gradient_clip: float = Field(1.0, ge=0)  # 0: off
    precision: Literal["auto", "32", "32-true", "64", "64-true", "16-mixed", "bf16-mixed", "16-true",
                       "bf16-true"] = "auto"  # auto: bf16-mixed on CUDA, 32 on CPU
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "auto"
    devices: Union[int, Literal["auto"], list[int]] = "auto"  # a count (-1: all), or a list of device indices
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"  # auto, ddp, fsdp, deepspeed, ... (Lightning's names)
    monitor: Literal["val/accuracy", "val/accuracy_image_text", "val/loss", "val/loss_gen"] = "val/accuracy"
    monitor_mode: Literal["max", "min"] = "max"
    check_val_every_n_epoch: int = Field(1, ge=1)
    deterministic: bool = True
    scheduler: Literal["warmup_cosine", "onecycle"] = "warmup_cosine"  # per optimizer step
    # Per-part learning rate / weight decay, e.g. {captioner: {lr: 2.0e-5}}; unnamed parts use lr.
    param_groups: dict[PartName, ParamGroupConfig] = {}
    contrastive: ContrastiveConfig = Field(default_factory=ContrastiveConfig)
    terms: TermsConfig = Field(default_factory=TermsConfig)  # caption-term supervision (parts/terms.py)
    prototypes: PrototypesConfig = Field(default_factory=PrototypesConfig)  # mined stream (parts/prototypes.py)

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.devices, int) and self.devices == 0 or self.devices == [] or \
                isinstance(self.devices, int) and self.devices < -1 or \
                isinstance(self.devices, list) and any(d < 0 for d in self.devices):
            raise ValueError(f"devices must be a count >= 1, -1 (all), auto or a list of device indices, got {self.devices}")
        if self.max_steps == 0:
            raise ValueError("max_steps must be -1 (no limit) or at least 1")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        return self


class EvalConfig(Section):
    """Evaluation defaults."""

    split: Literal["train", "val", "test"] = "test"
    batch_size: int = Field(4, ge=1)
    num_beams: int = Field(5, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    # Multi-label: probability at or above which a finding is predicted, one for all or per class.
    thresholds: Union[float, dict[str, float]] = 0.5
    tune_thresholds: bool = False  # multi-label: choose per-class thresholds on val (saved with the run)
    # Where evaluation (after training, and pathm3-eval/-predict/-heatmap unless --device is given) runs.
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # auto: CUDA when present
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # the model's matrix products (torch.autocast)


class Config(Section):
    """A whole experiment: the four sections of a YAML file in ``configs/``."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _consistent(self):
        head = self.model.head.type
        if head != "auto" and (head == "multi_label") != self.data.multilabel:
            raise ValueError(f"model.head.type is {head} but data.multilabel is {self.data.multilabel} "
                             "(use model.head.type: auto)")
        if len(set(self.data.classes)) != len(self.data.classes):
            raise ValueError(f"data.classes repeats a name: {self.data.classes}")
        if self.train.contrastive.weight > 0 and not AGGREGATORS[self.model.aggregator.type].takes_text:
            raise ValueError(f"train.contrastive needs an aggregator that encodes captions (qformer), "
                             f"not {self.model.aggregator.type}; set train.contrastive.weight: 0")
        thresholds = self.eval.thresholds
        values = thresholds.values() if isinstance(thresholds, dict) else [thresholds]
        if not all(0 < t < 1 for t in values):
            raise ValueError(f"eval.thresholds must lie in (0, 1), got {thresholds}")
        if set(self.data.class_phrases) - set(self.data.classes):
            raise ValueError(f"data.class_phrases names unknown classes "
                             f"{sorted(set(self.data.class_phrases) - set(self.data.classes))}")
        if isinstance(thresholds, dict) and set(thresholds) - set(self.data.classes):
            raise ValueError(f"eval.thresholds names unknown classes {sorted(set(thresholds) - set(self.data.classes))}")
        return self

    @property
    def head_type(self) -> str:
        """The head in use: ``model.head.type``, with ``auto`` resolved from ``data.multilabel``."""
        if self.model.head.type != "auto":
            return self.model.head.type
        return "multi_label" if self.data.multilabel else "single_label"


# --------------------------------------------------------------------------------------------
# Loading


class _Loader(yaml.SafeLoader):
    """YAML 1.1 with ``1e-4`` read as a float (plain PyYAML reads it as a string)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """YAML as configs are read (``1e-4`` is a float)."""
    return yaml.load(text, Loader=_Loader)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides.

    Raises :class:`ConfigError` naming the file (or ``--set``) and the offending key.
    """
    raw = read_yaml(Path(path)) if path is not None else {}
    cfg = config_from_dict(raw, str(path) if path is not None else "<defaults>")
    return apply_overrides(cfg, overrides)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a validated :class:`Config` from a plain nested dict (e.g. stored in a checkpoint)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {explain(exc, Config)}") from None


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
            value = parse_yaml(value_text) if value_text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: value is not valid YAML ({getattr(exc, 'problem', exc)})") from None
        parts = key.split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {'.'.join(parts[:depth + 1])} is a value, not a section")
            node = child
        if parts[-1] == "type" and len(parts) == 3 and node.get("type") != value:
            node.clear()  # a part switched to another type starts from that type's defaults
        node[parts[-1]] = value
        cfg = config_from_dict(raw, source)
    return cfg


def add_config_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """Add ``--config FILE`` and repeated ``--set KEY=VALUE`` to a CLI parser."""
    parser.add_argument("--config", required=required, metavar="FILE", help="experiment YAML file (see configs/)")
    add_set_arg(parser)


def add_set_arg(parser: argparse.ArgumentParser) -> None:
    """Add repeated ``--set KEY=VALUE`` config overrides (collected in ``args.overrides``)."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.max_epochs=3 (repeatable; VALUE is read as YAML, so "
        "lists look like [a,b]; --set model.aggregator.type=abmil switches a part to that type's defaults)",
    )


def config_to_dict(cfg: Section) -> dict[str, Any]:
    """Plain nested dict of a config (YAML/JSON friendly)."""
    return cfg.model_dump(mode="json")


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically) and return the path."""
    from pathm3.files import write_text

    return write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping, or a :class:`ConfigError` naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (see configs/ for examples)")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; a config is YAML (see configs/)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections data/model/train/eval")
    return raw


# --------------------------------------------------------------------------------------------
# `python -m pathm3.config FILE [--set K=V ...]`: check a config and print it resolved.


def _main(argv: Sequence[str] | None = None) -> int:
    from pathm3.errors import ArgumentParser, add_debug_flag

    parser = ArgumentParser(prog="python -m pathm3.config",
                                     description="Check an experiment config and print it with defaults and "
                                     "overrides applied.")
    parser.add_argument("config", metavar="FILE", help="experiment YAML file (see configs/)")
    add_set_arg(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    print(yaml.safe_dump(config_to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    from pathm3.errors import run_cli

    sys.exit(run_cli(_main))
