"""Typed configs: shipped YAML files, strict errors naming file and key, --set overrides."""

from __future__ import annotations

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
    assert cfg.model.feature_dim == 1408 and cfg.model.correlation.hidden_dim == 1408
    q = cfg.model.qformer
    assert (q.num_queries, q.hidden_size, q.num_layers) == (32, 768, 12)
    assert cfg.model.captioner.freeze is True
    assert len(cfg.data.classes) == 3


def test_demo_config_is_small_and_trains_its_random_captioner():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.model.qformer.pretrained is None and cfg.model.captioner.pretrained is None
    assert cfg.model.captioner.freeze is False
    assert cfg.model.qformer.hidden_size <= 128 and cfg.model.captioner.d_model <= 128


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = _yaml(tmp_path, "model:\n  qformer:\n    num_querys: 16\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: model.qformer.num_querys is not a known key (did you mean num_queries?)"


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
        ("model:\n  correlation:\n    enabled: 1\n", "model.correlation.enabled must be bool, got 1"),
        ("model:\n  text_input: sometimes\n", "model.text_input must be 'always' | 'never' | 'dropout'"),
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
                                                        "model.correlation.enabled=false"])
    assert cfg.train.max_epochs == 3 and cfg.data.classes == ["x", "y", "z"]
    assert cfg.model.correlation.enabled is False
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
    path = _yaml(tmp_path, "model:\n  qformer:\n    num_querys: 3\n")
    proc = subprocess.run([sys.executable, "-m", "pathm3.config", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {path}: model.qformer.num_querys is not a known key (did you mean num_queries?)\n"
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    ok = subprocess.run([sys.executable, "-m", "pathm3.config", str(REPO / "configs" / "demo.yaml"),
                         "--set", "train.seed=7"], capture_output=True, text=True)
    assert ok.returncode == 0 and "seed: 7" in ok.stdout
    debug = subprocess.run([sys.executable, "-m", "pathm3.config", str(path), "--debug"],
                           capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
