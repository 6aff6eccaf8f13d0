"""Bad inputs as a new user makes them, for every command but pathm3-extract (tested on its own).

Each refused run must exit 2 (usage or config) or 1 (data), print exactly one ``error:`` line on
stderr that names the offending path, flag or key, print no traceback, and write nothing: no
file and no folder that was not there before, in the test's folder (the working directory is
inside it), in the output location, or beside the shared trained run. Missing input files are
data errors (exit 1); bad flags, keys and values are usage errors (exit 2).

Families, here: 1 output locations that cannot be created; 2 binary files where text, YAML or JSON
is expected; 3 well-formed but meaningless values; and ``--debug``. In test_bad_files.py: 4 files
that are not what they claim; 5 the feature-provenance lock; 6 other mistakes (old keys, duplicate
rows, folders that are not runs). The inputs (``Ctx``) and the checks are in bad_input_cases.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bad_input_cases import (REPO, Ctx, _foreign_bag, _mkdir, _random_checkpoint, _set, check_refused,
                             run_case)
from pathm3.cli import compare_main, eval_main, heatmap_main, predict_main, train_main
from pathm3.config import _main as config_main
from pathm3.datasets.patchgastric import main as patchgastric_main
from pathm3.demo import main as demo_main
from pathm3.errors import PathM3Error, run_cli
from pathm3.synthetic import main as synthetic_main


# ---------------------------------------------------------------------------------------------
# 1. Output locations that cannot be created: under a regular file, or a folder where a file goes


def _under(c: Ctx, *parts: str) -> Path:
    return c.blocker.joinpath("out", *parts)


OUTPUT_CASES = [
    pytest.param(lambda c: (eval_main, c.eval("--manifest", str(c.one_row_manifest()), output=_under(c, "m.json")),
                            [c.blocker]), 1, id="eval--output"),
    pytest.param(lambda c: (predict_main, c.predict(output=_under(c, "p.csv")), [c.blocker]), 1, id="predict--output"),
    pytest.param(lambda c: (heatmap_main, c.heatmap(output=_under(c)), [c.blocker]), 1, id="heatmap--output"),
    pytest.param(lambda c: (heatmap_main, c.heatmap(output=c.blocker), [c.blocker]), 1, id="heatmap--output-is-a-file"),
    pytest.param(lambda c: (train_main, c.train("--set", f"train.output_dir={_under(c)}"), [c.blocker]), 1,
                 id="train-output_dir"),
    pytest.param(lambda c: (compare_main, c.compare(output=_under(c)), [c.blocker]), 1, id="compare--output"),
    pytest.param(lambda c: (demo_main, ["--output", str(_under(c)), "--slides", "10", "--no-progress"], [c.blocker]), 1,
                 id="demo--output"),
    pytest.param(lambda c: (synthetic_main, ["--output", str(_under(c)), "--slides", "5"], [c.blocker]), 1,
                 id="synthetic--output"),
    pytest.param(lambda c: (synthetic_main, ["--output", str(c.blocker), "--slides", "5"], [c.blocker]), 1,
                 id="synthetic--output-is-a-file"),
    pytest.param(lambda c: (patchgastric_main, c.patchgastric(output=_under(c, "manifest.csv")), [c.blocker]), 1,
                 id="patchgastric--output"),
    pytest.param(lambda c: (predict_main, c.predict(output=_mkdir(c.tmp / "predictions.csv")), [c.tmp / "predictions.csv"]),
                 1, id="predict--output-is-a-folder"),
]


@pytest.mark.parametrize("build, code", OUTPUT_CASES)
def test_output_location_that_cannot_be_created(ctx, capsys, build, code):
    run_case(ctx, capsys, build, code)


# ---------------------------------------------------------------------------------------------
# 2. A binary file where a CSV, YAML or JSON is expected


BINARY_CASES = [
    pytest.param(lambda c: (train_main, c.train("--set", f"data.manifest={c.binary}"), [c.binary]), 1,
                 id="train-data.manifest"),
    pytest.param(lambda c: (compare_main, c.compare("--set", f"data.manifest={c.binary}"), [c.binary]), 1,
                 id="compare-data.manifest"),
    pytest.param(lambda c: (eval_main, c.eval("--manifest", str(c.binary)), [c.binary]), 1, id="eval--manifest"),
    pytest.param(lambda c: (predict_main, c.predict("--captions", str(c.binary)), [c.binary]), 1, id="predict--captions"),
    pytest.param(lambda c: (patchgastric_main, c.patchgastric(captions=c.binary), [c.binary]), 1,
                 id="patchgastric--captions"),
    pytest.param(lambda c: (train_main, ["--config", str(c.binary)], [c.binary]), 2, id="train--config"),
    pytest.param(lambda c: (compare_main, ["--config", str(c.binary), "--output", str(c.out)], [c.binary]), 2,
                 id="compare--config"),
    pytest.param(lambda c: (config_main, [str(c.binary)], [c.binary]), 2, id="config-FILE"),
    *[pytest.param(lambda c, cmd=cmd: _bad_metadata(c, cmd, config="{not json", classes="[]"), 1,
                   id=f"{cmd}-checkpoint-config-not-json") for cmd in ("eval", "predict", "heatmap")],
    pytest.param(lambda c: _bad_metadata(c, "predict", provenance="{not json"), 1,
                 id="predict-checkpoint-provenance-not-json"),
    pytest.param(lambda c: _bad_metadata(c, "heatmap", tokenizer="{not json"), 1,
                 id="heatmap-checkpoint-tokenizer-not-json"),
    pytest.param(lambda c: _bad_metadata(c, "predict", config="[1, 2]"), 1, id="predict-checkpoint-config-not-a-mapping"),
]


def _bad_metadata(c: Ctx, command: str, **meta):
    ckpt = c.checkpoint_with("damaged.safetensors", **meta)
    main = {"eval": eval_main, "predict": predict_main, "heatmap": heatmap_main}[command]
    argv = {"eval": c.eval, "predict": c.predict, "heatmap": c.heatmap}[command](checkpoint=ckpt)
    return main, argv, [ckpt]


@pytest.mark.parametrize("build, code", BINARY_CASES)
def test_binary_or_damaged_file_where_text_is_expected(ctx, capsys, build, code):
    run_case(ctx, capsys, build, code)


# ---------------------------------------------------------------------------------------------
# 3. Well-formed but meaningless values


VALUE_CASES = [
    *[pytest.param(_set(train_main, item, item.split("=")[0]), 2, id=f"train-{item}")
      for item in ("model.alpha=1.5", "train.lr=-1", "train.max_epochs=0", "train.batch_size=0",
                   "model.patch_dropout=1", "model.aggregator.type=nosuch", "train.max_steps=0", "data.max_patches=0",
                   "eval.thresholds=1.5")],
    pytest.param(_set(compare_main, "model.aggregator.type=nosuch", "model.aggregator.type"), 2,
                 id="compare-model.aggregator.type=nosuch"),
    pytest.param(_set(config_main, "model.alpha=1.5", "model.alpha"), 2, id="config-model.alpha=1.5"),
    pytest.param(_set(config_main, "train.max_epochs=three", "train.max_epochs"), 2, id="config-train.max_epochs=three"),
    pytest.param(lambda c: (train_main, c.train("--seeds", "-1"), ["--seeds"]), 2, id="train--seeds-1"),
    pytest.param(lambda c: (eval_main, c.eval("--split", "nosuch"), ["--split", "nosuch"]), 2, id="eval--split-nosuch"),
    *[pytest.param(lambda c, flag=flag, value=value: (predict_main, c.predict(flag, value), [flag]), 2,
                   id=f"predict{flag}={value}")
      for flag, value in (("--batch-size", "0"), ("--num-beams", "0"), ("--temperature", "0"), ("--top-p", "1.5"),
                          ("--max-new-tokens", "0"), ("--top-p", "nan"), ("--batch-size", "two"))],
    pytest.param(lambda c: (heatmap_main, c.heatmap("--top-k", "0"), ["--top-k"]), 2, id="heatmap--top-k=0"),
    pytest.param(lambda c: (heatmap_main, c.heatmap("--method", "nosuch"), ["--method"]), 2, id="heatmap--method=nosuch"),
    pytest.param(lambda c: (heatmap_main, c.heatmap("--method", "attention", "--class", "benign"), ["--class"]), 2,
                 id="heatmap--class-with-attention"),
    pytest.param(lambda c: (eval_main, c.eval("--device", "tpu"), ["tpu"]), 2, id="eval--device=tpu"),
    pytest.param(lambda c: (predict_main, c.predict("--precision", "fp8"), ["--precision"]), 2, id="predict--precision=fp8"),
    pytest.param(lambda c: (predict_main, c.predict("--top-k", "-1"), ["--top-k"]), 2, id="predict--top-k=-1"),
    pytest.param(_set(config_main, "eval.device=gpu0", "eval.device"), 2, id="config-eval.device=gpu0"),
    pytest.param(_set(config_main, "train.param_groups={decoder: {lr: 0.1}}", "train.param_groups"), 2,
                 id="config-train.param_groups-unknown-part"),
    pytest.param(lambda c: (demo_main, ["--output", str(c.out), "--slides", "3"], ["--slides"]), 2, id="demo--slides=3"),
    pytest.param(lambda c: (compare_main, [*c.train(), "--output", str(c.out), "--aggregators", "nosuch"],
                            ["--aggregators", "nosuch"]), 2, id="compare--aggregators=nosuch"),
    pytest.param(lambda c: (compare_main, [*c.compare(), "--seeds", "x"], ["--seeds"]), 2, id="compare--seeds=x"),
    pytest.param(lambda c: (synthetic_main, ["--output", str(c.out), "--slides", "0"], ["--slides"]), 2,
                 id="synthetic--slides=0"),
    pytest.param(lambda c: (synthetic_main, ["--output", str(c.out), "--dim", "0"], ["--dim"]), 2, id="synthetic--dim=0"),
    pytest.param(lambda c: (patchgastric_main, c.patchgastric(None, None, "--seed", "-1"), ["--seed"]), 2,
                 id="patchgastric--seed=-1"),
    *[pytest.param(_set(train_main, item, item.split("=")[0]), 2, id=f"train-{item}")
      for item in ("train.precision=nosuch", "train.accelerator=nosuch", "train.devices=nosuch")],
]


@pytest.mark.parametrize("build, code", VALUE_CASES)
def test_meaningless_value(ctx, capsys, build, code):
    run_case(ctx, capsys, build, code)


def test_unknown_monitor_is_refused_before_training(ctx, capsys):
    """``train.monitor: val/acc`` (a typo) would train the whole run without ever saving best.safetensors."""
    manifest = ctx.csv_file("mini.csv", ctx.mini_rows())
    argv = ctx.train("--set", f"data.manifest={manifest}", "--set", "train.task=classification",
                     "--set", "train.monitor=val/acc")
    line = check_refused(ctx, capsys, train_main, argv, ["train.monitor", "val/acc"], 2)
    assert "val/accuracy" in line


# ---------------------------------------------------------------------------------------------
# --debug: the traceback instead of the one line


DEBUG_CASES = [
    pytest.param(lambda c: (config_main, [str(c.binary)]), id="config-binary"),
    pytest.param(lambda c: (predict_main, c.predict("--batch-size", "0")), id="predict--batch-size-0"),
    pytest.param(lambda c: (eval_main, c.eval(checkpoint=_random_checkpoint(c))), id="eval-random-checkpoint"),
    pytest.param(lambda c: (synthetic_main, ["--output", str(_under(c)), "--slides", "5"]), id="synthetic-output-under-file"),
    pytest.param(lambda c: (heatmap_main, c.heatmap(bags=[_foreign_bag(c)])), id="heatmap-foreign-bag"),
]


@pytest.mark.parametrize("build", DEBUG_CASES)
def test_debug_raises_instead_of_one_line(ctx, capsys, build):
    main, argv = build(ctx)
    with pytest.raises((PathM3Error, OSError)):
        run_cli(main, [*argv, "--debug"])
    assert "error:" not in capsys.readouterr().err


def test_debug_prints_the_traceback_from_the_console(ctx):
    cmd = [sys.executable, "-m", "pathm3.synthetic", "--output", str(_under(ctx)), "--slides", "5"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ctx.tmp)
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, env=env, cwd=ctx.tmp)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith("error: ") and str(ctx.blocker) in plain.stderr
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "NotADirectoryError" in debug.stderr
