"""Typed configs: shipped YAML files, strict errors naming file and key, --set overrides."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pathm3.config import Config, apply_overrides, load_config, save_config
from pathm3.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _yaml(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_patchgastric_config_has_paper_table6_values():
    cfg = load_config(REPO / "configs" / "pathm3_patchgastric.yaml")
    assert (cfg.train.lr, cfg.train.warmup_lr, cfg.train.warmup_steps) == (1e-4, 1e-5, 1000)
    assert cfg.train.weight_decay == 0.05 and cfg.train.betas == [0.9, 0.999]
    assert cfg.train.batch_size == 16
    assert cfg.model.feature_dim == 1408 and cfg.model.mixer.type == "nystrom" and cfg.model.mixer.hidden_dim == 1408
    q = cfg.model.aggregator
    assert q.type == "qformer" and (q.num_queries, q.hidden_size, q.num_layers) == (32, 768, 12)
    assert cfg.model.captioner.finetune == "frozen"
    assert len(cfg.data.classes) == 3


def test_demo_config_is_small_and_trains_its_random_captioner():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.model.aggregator.pretrained is None and cfg.model.captioner.pretrained is None
    assert cfg.model.captioner.finetune == "full"
    assert cfg.model.aggregator.hidden_size <= 128 and cfg.model.captioner.d_model <= 128


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = _yaml(tmp_path, "model:\n  aggregator:\n    num_querys: 16\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: model.aggregator.num_querys is not a known key (did you mean num_queries?)"


def test_unknown_section_lists_known_keys(tmp_path):
    path = _yaml(tmp_path, "trainer:\n  max_epochs: 3\n")
    with pytest.raises(ConfigError, match=r"trainer is not a known key \(did you mean train\?\)"):
        load_config(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  max_epochs: three\n", "train.max_epochs must be int, got 'three'"),
        ("train:\n  max_epochs: 2.5\n", "train.max_epochs must be int, got 2.5"),
        ("train:\n  seed: true\n", "train.seed must be int, got True"),
        ("model:\n  captioner:\n    finetune: partial\n",
         "model.captioner.finetune must be 'frozen' | 'lora' | 'full', got 'partial'"),
        ("model:\n  captioner:\n    freeze: true\n", "model.captioner.freeze is now model.captioner.finetune (frozen, lora"),
        ("model:\n  aggregator:\n    text_input: sometimes\n",
         "model.aggregator.text_input must be 'always' | 'never' | 'dropout', got 'sometimes'"),
        ("model:\n  mixer:\n    type: transformer\n", "model.mixer.type must be one of 'nystrom', 'none', got 'transformer'"),
        ("model:\n  mixer:\n    type: none\n    landmarks: 8\n",
         "model.mixer.landmarks is not a known key (known keys: type, hidden_dim)"),
        ("data:\n  classes: tumour\n", "data.classes must be list of str, got 'tumour'"),
        ("data:\n  classes: [a, 3]\n", "data.classes[1] must be str, got 3"),
        ("model: 5\n", "model must be a mapping"),
        ("train:\n  lr: fast\n", "train.lr must be float, got 'fast'"),
    ],
)
def test_wrong_types_name_file_and_key(tmp_path, text, message):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  alpha: 1.5\n", "model.alpha must be less than or equal to 1, got 1.5"),
        ("train:\n  lr: -0.001\n", "train.lr must be greater than 0, got -0.001"),
        ("train:\n  max_epochs: 0\n", "train.max_epochs must be greater than or equal to 1, got 0"),
        ("train:\n  batch_size: 0\n", "train.batch_size must be greater than or equal to 1, got 0"),
        ("model:\n  patch_dropout: 1.0\n", "model.patch_dropout must be less than 1, got 1.0"),
        ("model:\n  mixer:\n    hidden_dim: 100\n", "model.mixer.hidden_dim (100) must be a multiple of heads (8)"),
        ("eval:\n  thresholds: 1.5\n", "eval.thresholds must lie in (0, 1), got 1.5"),
        ("data:\n  multilabel: true\nmodel:\n  head:\n    type: single_label\n",
         "model.head.type is single_label but data.multilabel is True"),
    ],
)
def test_values_out_of_range_name_file_key_and_rule(tmp_path, text, message):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {message}" or str(err.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  qformer:\n    num_queries: 4\n", "model.qformer is now model.aggregator (type: qformer)"),
        ("model:\n  correlation:\n    enabled: false\n", "model.correlation is now model.mixer"),
        ("model:\n  text_input: never\n", "model.text_input is now model.aggregator.text_input"),
        ("model:\n  classifier_dropout: 0.2\n", "model.classifier_dropout is now model.head.dropout"),
        ("model:\n  captioner:\n    enabled: false\n", "model.captioner.enabled is now model.captioner.type"),
    ],
)
def test_renamed_keys_name_their_new_name(tmp_path, text, message):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: {message}")):
        load_config(path)


def test_part_types_switch_to_that_parts_defaults():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["model.mixer.type=none", "model.captioner.type=none"])
    assert cfg.model.mixer.type == "none" and cfg.model.mixer.hidden_dim is None and cfg.model.captioner.type == "none"
    same = load_config(REPO / "configs" / "demo.yaml", ["model.mixer.type=nystrom"])
    assert same.model.mixer.hidden_dim == 64  # the same type keeps the file's settings


def test_numbers_are_read_leniently_where_unambiguous(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; an int is a fine float.
    cfg = load_config(_yaml(tmp_path, "train:\n  lr: 1e-4\n  weight_decay: 0\n"))
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.weight_decay, float)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        load_config(_yaml(tmp_path, "train:\n  lr: [1, 2\n  seed: 3\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_apply_and_are_validated():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["train.max_epochs=3", "data.classes=[x, y, z]",
                                                        "model.mixer.type=none"])
    assert cfg.train.max_epochs == 3 and cfg.data.classes == ["x", "y", "z"]
    assert cfg.model.mixer.type == "none"
    with pytest.raises(ConfigError, match=r"^--set train.max_epoch=3: train.max_epoch is not a known key \(did you mean max_epochs\?\)"):
        apply_overrides(cfg, ["train.max_epoch=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(cfg, ["train.max_epochs"])
    with pytest.raises(ConfigError, match="train.max_epochs must be int"):
        apply_overrides(cfg, ["train.max_epochs=many"])
    with pytest.raises(ConfigError, match="train.seed is a value, not a section"):
        apply_overrides(cfg, ["train.seed.x=1"])


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(REPO / "configs" / "pathm3_patchgastric.yaml", ["train.seed=2"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert load_config(None) == Config()


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    path = _yaml(tmp_path, "model:\n  aggregator:\n    num_querys: 3\n")
    proc = subprocess.run([sys.executable, "-m", "pathm3.config", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {path}: model.aggregator.num_querys is not a known key (did you mean num_queries?)\n"
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    ok = subprocess.run([sys.executable, "-m", "pathm3.config", str(REPO / "configs" / "demo.yaml"),
                         "--set", "train.seed=7"], capture_output=True, text=True)
    assert ok.returncode == 0 and "seed: 7" in ok.stdout
    debug = subprocess.run([sys.executable, "-m", "pathm3.config", str(path), "--debug"],
                           capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
