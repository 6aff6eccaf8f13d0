"""Bad inputs as a new user makes them, for every command but pathm3-extract (tested on its own).

Each refused run must exit 2 (usage or config) or 1 (data), print exactly one ``error:`` line on
stderr that names the offending path, flag or key, print no traceback, and write nothing: no
file and no folder that was not there before, in the test's folder (the working directory is
inside it), in the output location, or beside the shared trained run. Missing input files are
data errors (exit 1); bad flags, keys and values are usage errors (exit 2).

Families: 1 output locations that cannot be created; 2 binary files where text, YAML or JSON is
expected; 3 well-formed but meaningless values; 4 files that are not what they claim; 5 the
feature-provenance lock; 6 other mistakes (old keys, duplicate rows, folders that are not runs).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pathm3.cli import compare_main, eval_main, heatmap_main, predict_main, train_main
from pathm3.config import _main as config_main
from pathm3.datasets.patchgastric import main as patchgastric_main
from pathm3.demo import main as demo_main
from pathm3.errors import PathM3Error, run_cli
from pathm3.synthetic import main as synthetic_main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
WELL = "Well differentiated tubular adenocarcinoma"


# ---------------------------------------------------------------------------------------------
# The inputs a case may need, built in the test's own folder from the shared trained run


class Ctx:
    def __init__(self, tmp: Path, run: Path):
        self.tmp, self.run = tmp, run
        self.root = run.parents[2]  # the trained run's fixture folder: must stay untouched
        self.ckpt = run / "checkpoints" / "best.safetensors"
        self.cohort = self.root / "cohort"
        self.bags = self.cohort / "bags"
        self.manifest = self.cohort / "manifest.csv"
        with open(self.manifest, newline="") as fh:
            self.rows = list(csv.DictReader(fh))
        self.fields = list(self.rows[0])
        self.test_row = next(r for r in self.rows if r["split"] == "test")
        self.sid = self.test_row["slide_id"]
        self.out = tmp / "out"  # where refused runs would have written
        self.blocker = tmp / "somefile.txt"  # a regular file where a folder is needed
        self.blocker.write_text("not a folder\n")
        self.binary = tmp / "binary.bin"  # never valid UTF-8 (0xff), nor YAML, CSV or JSON
        self.binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" + bytes(range(256)) * 8)

    @property
    def bag(self) -> Path:
        return self.bags / f"{self.sid}.h5"

    def file(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text, encoding="utf-8")
        return path

    def csv_file(self, name: str, rows, fields=None) -> Path:
        path = self.tmp / name
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields or self.fields)
            writer.writeheader()
            writer.writerows(rows)
        return path

    def one_row_manifest(self, name: str = "one.csv") -> Path:
        """One test row without a caption: eval is fast (no Java scoring)."""
        return self.csv_file(name, [{**self.test_row, "caption": ""}])

    def mini_rows(self) -> list[dict]:
        """Two training slides (one per class), one validation and one test slide, no captions."""
        by = lambda split, label: next(r for r in self.rows if r["split"] == split and r["label"] == label)  # noqa: E731
        return [{**r, "caption": ""} for r in (by("train", "benign"), by("train", "adenocarcinoma"),
                                               by("val", "benign"), by("test", "adenocarcinoma"))]

    def copy_bag(self, folder: str, sid: str | None = None, edit=None) -> Path:
        """A copy of a cohort bag in tmp/folder, changed in place by ``edit(h5py.File)``."""
        sid = sid or self.sid
        (self.tmp / folder).mkdir(exist_ok=True)
        path = self.tmp / folder / f"{sid}.h5"
        shutil.copy(self.bags / f"{sid}.h5", path)
        if edit is not None:
            with h5py.File(path, "r+") as f:
                edit(f)
        return path

    def checkpoint_with(self, name: str, tensors=None, **meta) -> Path:
        """The trained checkpoint's tensors with its metadata changed (None deletes a key)."""
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(self.ckpt), framework="pt") as f:
            metadata = dict(f.metadata())
        for key, value in meta.items():
            if value is None:
                metadata.pop(key, None)
            else:
                metadata[key] = value
        path = self.tmp / name
        save_file(load_file(str(self.ckpt)) if tensors is None else tensors, str(path), metadata=metadata)
        return path

    # argument lists of a run that would succeed, with the mistake added by the case

    def train(self, *extra: str) -> list[str]:
        return ["--config", str(DEMO), "--no-progress",
                "--set", f"data.manifest={self.manifest}", "--set", f"data.bags_dir={self.bags}",
                "--set", f"train.output_dir={self.out}", "--set", "train.max_epochs=1", *extra]

    def eval(self, *extra: str, checkpoint=None, output=None) -> list[str]:
        return ["--checkpoint", str(checkpoint or self.ckpt), "--output", str(output or self.out / "metrics.json"),
                "--no-progress", *extra]

    def predict(self, *extra: str, checkpoint=None, bags=None, output=None) -> list[str]:
        return ["--checkpoint", str(checkpoint or self.ckpt), *[str(b) for b in (bags or [self.bag])],
                "--output", str(output or self.out / "predictions.csv"), "--no-progress", *extra]

    def heatmap(self, *extra: str, checkpoint=None, bags=None, output=None) -> list[str]:
        return ["--checkpoint", str(checkpoint or self.ckpt), "--bag", *[str(b) for b in (bags or [self.bag])],
                "--output", str(output or self.out), "--no-progress", *extra]

    def compare(self, *extra: str, output=None) -> list[str]:
        return [*self.train(*extra), "--output", str(output or self.out), "--aggregators", "mean"]

    def captions(self, text: str = f"id,subtype,text\nS1,{WELL},regular glands\n") -> Path:
        return self.file("patchgastric_captions.csv", text)

    def patchgastric(self, captions=None, output=None, *extra: str) -> list[str]:
        return ["--captions", str(captions or self.captions()), "--bags", str(self.bags),
                "--output", str(output or self.out / "manifest.csv"), *extra]


@pytest.fixture
def ctx(trained_run, tmp_path, monkeypatch) -> Ctx:
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # relative default outputs would land here and be seen
    return Ctx(tmp_path, trained_run)


# ---------------------------------------------------------------------------------------------
# The checks


def snapshot(*roots: Path) -> dict[str, int | None]:
    """Every file (with its mtime) and folder under ``roots``."""
    seen: dict[str, int | None] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            seen[folder] = None
            for name in files:
                path = os.path.join(folder, name)
                seen[path] = os.stat(path).st_mtime_ns
    return seen


def stderr_lines(err: str, warnings: int = 0) -> list[str]:
    """The ``error:`` lines, after checking that stderr holds nothing else but ``warnings`` warning lines."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    warned = [line for line in lines if line.startswith("warning: ")]
    assert len(warned) == warnings, err
    assert len(errors) + len(warned) == len(lines), f"stray lines on stderr:\n{err}"
    return errors


def check_refused(c: Ctx, capsys, main, argv, names, code: int) -> str:
    """Run ``main(argv)``: exit ``code``, one error line naming every item of ``names``, nothing written."""
    capsys.readouterr()
    before = snapshot(c.tmp, c.root)
    rc = run_cli(main, argv)
    err = capsys.readouterr().err
    errors = stderr_lines(err)
    assert len(errors) == 1, err
    line = errors[0]
    for name in names:
        assert str(name) in line, f"{name!s} not named in: {line}"
    assert rc == code, line
    after = snapshot(c.tmp, c.root)
    created = sorted(set(after) - set(before))
    changed = sorted(p for p in before if p in after and after[p] != before[p])
    assert not created and not changed, f"a refused run wrote {created + changed}"
    assert not c.out.exists()
    return line


def run_case(c, capsys, build, code):
    main, argv, names = build(c)
    return check_refused(c, capsys, main, argv, names, code)


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


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


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


def _set(command, item: str, key: str):
    """``--set item`` to train, compare or the config checker; the line names ``key``."""
    if command is config_main:
        return lambda c: (config_main, [str(DEMO), "--set", item], [key])
    return lambda c: (command, (c.compare if command is compare_main else c.train)("--set", item), [key])


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
# 4. Files that exist but are not what they claim


def _nan_bag(c: Ctx) -> Path:
    def poison(f):
        x = f["features"][()]
        x[3, 5] = np.nan
        f["features"][...] = x

    return c.copy_bag("nan", edit=poison)


def _random_checkpoint(c: Ctx) -> Path:
    path = c.tmp / "model.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    return path


def _not_hdf5(c: Ctx) -> Path:
    return c.file(f"{c.sid}.h5", "slide_id,label\nsynthetic-0001,benign\n")


def _manifest_of(c: Ctx, bag: Path) -> Path:
    return c.csv_file("manifest_one.csv", [{**c.test_row, "slide_id": bag.stem, "caption": ""}])


def _cohort_with(c: Ctx, edit) -> tuple[Path, Path]:
    """A 4-slide cohort in tmp/cohort whose third bag is changed by ``edit``; (manifest, changed bag)."""
    rows = c.mini_rows()
    for r in rows:
        c.copy_bag("cohort", r["slide_id"])
    changed = c.copy_bag("cohort", rows[2]["slide_id"], edit)
    return c.csv_file("cohort.csv", rows), changed


def _train_on(c: Ctx, edit, compare: bool = False):
    """pathm3-train (or pathm3-compare) on a 4-slide cohort whose third bag is changed; the line names that bag."""
    manifest, changed = _cohort_with(c, edit)
    sets = ("--set", f"data.manifest={manifest}", "--set", f"data.bags_dir={changed.parent}")
    return (compare_main, c.compare(*sets), [changed]) if compare else (train_main, c.train(*sets), [changed])


def _foreign(f):
    f["features"].attrs["encoder"] = "eva-vit-g"


def _poison(f):
    x = f["features"][()]
    x[0, 0] = np.inf
    f["features"][...] = x


FILE_CASES = [
    pytest.param(lambda c: (heatmap_main, c.heatmap("--slide", str(c.file("slide.svs", "not a slide\n"))),
                            [c.tmp / "slide.svs"]), 1, id="heatmap--slide-is-text"),
    *[pytest.param(lambda c, cmd=cmd: (cmd, {eval_main: c.eval, predict_main: c.predict, heatmap_main: c.heatmap}[cmd](
        checkpoint=_random_checkpoint(c)), [c.tmp / "model.safetensors"]), 1, id=f"{name}-checkpoint-random-bytes")
      for name, cmd in (("eval", eval_main), ("predict", predict_main), ("heatmap", heatmap_main))],
    pytest.param(lambda c: (eval_main, c.eval(checkpoint=c.run / "checkpoints" / "last.ckpt"),
                            [c.run / "checkpoints" / "last.ckpt"]), 1, id="eval-checkpoint-is-lightning-last.ckpt"),
    pytest.param(lambda c: (predict_main, c.predict(bags=[_not_hdf5(c)]), [c.tmp / f"{c.sid}.h5"]), 1,
                 id="predict-bag-not-hdf5"),
    pytest.param(lambda c: (heatmap_main, c.heatmap(bags=[_not_hdf5(c)]), [c.tmp / f"{c.sid}.h5"]), 1,
                 id="heatmap-bag-not-hdf5"),
    pytest.param(lambda c: (eval_main, c.eval("--manifest", str(c.one_row_manifest()), "--bags",
                                              str(_not_hdf5(c).parent)), [c.tmp / f"{c.sid}.h5"]), 1,
                 id="eval-bag-not-hdf5"),
    pytest.param(lambda c: _train_on(c, lambda f: f.__delitem__("coords")), 1, id="train-bag-without-coords"),
    pytest.param(lambda c: (predict_main, c.predict(bags=[_nan_bag(c)]), [c.tmp / "nan" / f"{c.sid}.h5"]), 1,
                 id="predict-bag-with-nan"),
    pytest.param(lambda c: (eval_main, c.eval("--manifest", str(_manifest_of(c, _nan_bag(c))), "--bags",
                                              str(c.tmp / "nan")), [c.tmp / "nan" / f"{c.sid}.h5"]), 1,
                 id="eval-bag-with-nan"),
    pytest.param(lambda c: _train_on(c, _poison), 1, id="train-bag-with-inf"),
    pytest.param(lambda c: (heatmap_main, c.heatmap(bags=[_nan_bag(c)]), [c.tmp / "nan" / f"{c.sid}.h5"]), 1,
                 id="heatmap-bag-with-nan"),
    pytest.param(lambda c: (heatmap_main, c.heatmap(bags=[c.bags / f"{c.rows[0]['slide_id']}.h5", _nan_bag(c)]),
                            [c.tmp / "nan" / f"{c.sid}.h5"]), 1, id="heatmap-second-bag-with-nan"),
    pytest.param(lambda c: (train_main, c.train("--set", f"data.manifest={_header_only(c)}"), [c.tmp / "empty.csv"]), 1,
                 id="train-manifest-header-only"),
    pytest.param(lambda c: (eval_main, c.eval("--manifest", str(_header_only(c))), [c.tmp / "empty.csv"]), 1,
                 id="eval-manifest-header-only"),
    pytest.param(lambda c: (compare_main, c.compare("--set", f"data.manifest={_header_only(c)}"), [c.tmp / "empty.csv"]),
                 1, id="compare-manifest-header-only"),
    pytest.param(lambda c: (eval_main, c.eval("--manifest", str(c.file("zero.csv", ""))), [c.tmp / "zero.csv"]), 1,
                 id="eval-manifest-zero-bytes"),
    pytest.param(lambda c: (predict_main, c.predict("--captions", str(c.file("zero.csv", ""))), [c.tmp / "zero.csv"]), 1,
                 id="predict-captions-zero-bytes"),
    pytest.param(lambda c: (patchgastric_main, c.patchgastric(c.captions(
        "id,subtype,text\nS1,Signet-ring cell carcinoma,some text\nS2,,other text\n")),
        [c.tmp / "patchgastric_captions.csv"]), 1, id="patchgastric-no-usable-subtype"),
    pytest.param(lambda c: (patchgastric_main, c.patchgastric(c.captions("id,subtype\nS1,x\n")),
                            [c.tmp / "patchgastric_captions.csv", "text"]), 1, id="patchgastric-missing-column"),
    pytest.param(lambda c: (patchgastric_main, c.patchgastric(c.captions(f"id,subtype,text\nS1,{WELL}\n")),
                            [c.tmp / "patchgastric_captions.csv"]), 1, id="patchgastric-row-without-text"),
    pytest.param(lambda c: (patchgastric_main, c.patchgastric(c.captions(
        f"id,subtype,text\n,{WELL},glands\nS1,{WELL},glands\n")), [c.tmp / "patchgastric_captions.csv", "id"]), 1,
        id="patchgastric-empty-id"),
    pytest.param(lambda c: (patchgastric_main, c.patchgastric(c.captions(
        f"id,subtype,text\nS1,{WELL},glands\nS1,{WELL},glands\n")), [c.tmp / "patchgastric_captions.csv", "S1"]), 1,
        id="patchgastric-repeated-id"),
]


def _header_only(c: Ctx) -> Path:
    return c.file("empty.csv", "slide_id,label,caption,split\n")


@pytest.mark.parametrize("build, code", FILE_CASES)
def test_file_that_is_not_what_it_claims(ctx, capsys, build, code):
    run_case(ctx, capsys, build, code)


def test_a_checkpoint_whose_classes_do_not_fit_its_model_is_refused(ctx, capsys):
    """``classes`` metadata that does not match the model's outputs: refused when loaded, before predicting."""
    for i, classes in enumerate(("[]", '["benign", "adenocarcinoma", "other"]', '{"a": 1}')):
        ckpt = ctx.checkpoint_with(f"classes{i}.safetensors", classes=classes)
        check_refused(ctx, capsys, predict_main, ctx.predict(checkpoint=ckpt), [ckpt], 1)



# ---------------------------------------------------------------------------------------------
# 5. The provenance lock: bags extracted differently from the model's training bags


def _foreign_bag(c: Ctx) -> Path:
    return c.copy_bag("foreign", edit=_foreign)


def _what_differs(c: Ctx) -> list:
    """The foreign bag and what differs: the line must name all of it."""
    return [c.tmp / "foreign" / f"{c.sid}.h5", "encoder", "eva-vit-g"]


def _mixed_cohort(c: Ctx, compare: bool = False):
    main, argv, names = _train_on(c, _foreign, compare)
    return main, argv, [*names, "encoder", "eva-vit-g"]


PROVENANCE_CASES = [
    pytest.param(lambda c: (eval_main, c.eval("--manifest", str(_manifest_of(c, _foreign_bag(c))),
                                              "--bags", str(c.tmp / "foreign")), _what_differs(c)), 1, id="eval"),
    pytest.param(lambda c: (predict_main, c.predict(bags=[_foreign_bag(c)]), _what_differs(c)), 1, id="predict"),
    pytest.param(lambda c: (predict_main, c.predict(bags=[_foreign_bag(c).parent]), _what_differs(c)), 1,
                 id="predict-folder"),
    pytest.param(lambda c: (heatmap_main, c.heatmap(bags=[_foreign_bag(c)]), _what_differs(c)), 1, id="heatmap"),
    pytest.param(lambda c: _mixed_cohort(c), 1, id="train-mixed-cohort"),
    pytest.param(lambda c: _mixed_cohort(c, compare=True), 1, id="compare-mixed-cohort"),
    pytest.param(lambda c: (predict_main, c.predict(bags=[c.copy_bag("w32", edit=_narrow)]),
                            [c.tmp / "w32" / f"{c.sid}.h5", "32-d"]), 1, id="predict-other-width"),
]


def _narrow(f):
    x = f["features"][()][:, :32]
    del f["features"]
    f["features"] = x


@pytest.mark.parametrize("build, code", PROVENANCE_CASES)
def test_foreign_bags_are_refused(ctx, capsys, build, code):
    run_case(ctx, capsys, build, code)


@pytest.mark.parametrize("command", ["predict", "heatmap"])
def test_allow_foreign_bags_warns_once_and_runs(ctx, capsys, command):
    bag = _foreign_bag(ctx)
    if command == "predict":
        rc = run_cli(predict_main, ctx.predict("--allow-foreign-bags", bags=[bag]))
        written = [ctx.out / "predictions.csv"]
    else:
        rc = run_cli(heatmap_main, ctx.heatmap("--allow-foreign-bags", bags=[bag]))
        written = [ctx.out / f"{ctx.sid}_scores.csv"]
    err = capsys.readouterr().err
    assert stderr_lines(err, warnings=1) == []
    assert rc == 0 and all(p.is_file() for p in written)
    warning = next(line for line in err.splitlines() if line.startswith("warning: "))
    assert str(bag) in warning and "encoder" in warning and "eva-vit-g" in warning


@pytest.mark.parametrize("command", ["predict", "heatmap"])
def test_bag_without_provenance_is_accepted_with_one_warning(ctx, capsys, command):
    """CLAM bags carry no attributes: used (the width matches) with one warning line."""
    bag = ctx.copy_bag("clam", edit=lambda f: f.attrs.__delitem__("format_version"))
    if command == "predict":
        rc = run_cli(predict_main, ctx.predict(bags=[bag]))
    else:
        rc = run_cli(heatmap_main, ctx.heatmap(bags=[bag]))
    err = capsys.readouterr().err
    assert stderr_lines(err, warnings=1) == []
    assert rc == 0 and ctx.out.exists()
    assert bag.name in err


# ---------------------------------------------------------------------------------------------
# 6. Other mistakes


def _fake_run(c: Ctx) -> Path:
    """A seed folder with its config.yaml but no checkpoints (killed before the first epoch ended)."""
    folder = c.tmp / "runs" / "demo" / "seed0"
    folder.mkdir(parents=True)
    shutil.copy(c.run / "config.yaml", folder / "config.yaml")
    return folder


def _multilabel(c: Ctx, value: str) -> Path:
    r0, r1 = c.rows[0], c.rows[1]
    return c.csv_file("multilabel.csv", [
        {"slide_id": r0["slide_id"], "a": "1", "b": "0", "caption": "", "split": r0["split"]},
        {"slide_id": r1["slide_id"], "a": value, "b": "", "caption": "", "split": r1["split"]},
    ], fields=["slide_id", "a", "b", "caption", "split"])


def _rows_with(c: Ctx, **change) -> Path:
    return c.csv_file("changed.csv", [*c.rows[:2], {**c.rows[2], **change}])


OTHER_CASES = [
    pytest.param(lambda c: (eval_main, c.eval(checkpoint=_mkdir(c.tmp / "empty_run")), [c.tmp / "empty_run"]), 1,
                 id="eval--checkpoint-folder-without-checkpoints"),
    pytest.param(lambda c: (predict_main, c.predict(checkpoint=c.root / "runs"), [c.root / "runs"]), 1,
                 id="predict--checkpoint-runs-folder"),
    pytest.param(lambda c: (heatmap_main, c.heatmap(checkpoint=c.tmp / "nope.safetensors"), [c.tmp / "nope.safetensors"]),
                 1, id="heatmap--checkpoint-missing"),
    pytest.param(lambda c: (train_main, ["--resume", str(_mkdir(c.tmp / "not_a_run"))], [c.tmp / "not_a_run"]), 2,
                 id="train--resume-not-a-run"),
    pytest.param(lambda c: (train_main, ["--resume", str(_fake_run(c))], [c.tmp / "runs" / "demo" / "seed0"]), 2,
                 id="train--resume-without-last.ckpt"),
    pytest.param(lambda c: (train_main, ["--resume", str(c.run), "--config", str(DEMO)], ["--resume", "--config"]), 2,
                 id="train--resume-with--config"),
    pytest.param(lambda c: (train_main, [], ["--config"]), 2, id="train-without--config"),
    pytest.param(lambda c: (config_main, [str(c.file("old.yaml", "model:\n  qformer:\n    num_queries: 8\n"))],
                            [c.tmp / "old.yaml", "model.qformer", "model.aggregator"]), 2, id="config-old-key-model.qformer"),
    pytest.param(lambda c: (train_main, ["--config", str(c.file("old.yaml", "model:\n  qformer:\n    num_queries: 8\n"))],
                            [c.tmp / "old.yaml", "model.aggregator"]), 2, id="train-old-key-model.qformer"),
    pytest.param(lambda c: (train_main, c.train("--set", "model.correlation.enabled=false"), ["model.mixer"]), 2,
                 id="train--set-old-key-model.correlation"),
    pytest.param(lambda c: (train_main, c.train("--set", "model.aggregator.num_querys=3"), ["num_querys", "num_queries"]),
                 2, id="train--set-misspelt-key"),
    pytest.param(lambda c: (train_main, c.train("--set", "train.max_epochs"), ["train.max_epochs"]), 2,
                 id="train--set-without-value"),
    pytest.param(lambda c: (compare_main, c.compare("--set", "data.classes=[a,"), ["data.classes"]), 2,
                 id="compare--set-not-yaml"),
    pytest.param(lambda c: (config_main, [str(c.file("list.yaml", "- a\n- b\n"))], [c.tmp / "list.yaml"]), 2,
                 id="config-not-a-mapping"),
    pytest.param(lambda c: (config_main, [str(c.file("bad.yaml", "model: [1, 2\n"))], [c.tmp / "bad.yaml"]), 2,
                 id="config-not-yaml"),
    pytest.param(lambda c: (train_main, ["--config", str(c.tmp / "nope.yaml")], [c.tmp / "nope.yaml"]), 2,
                 id="train--config-missing"),
    pytest.param(lambda c: (train_main, c.train("--set", "data.classes=[]"), ["data.classes"]), 2,
                 id="train-no-classes"),
    pytest.param(lambda c: (train_main, c.train("--set", "model.feature_dim=32"), [c.bags, "model.feature_dim"]), 1,
                 id="train-feature_dim-does-not-match-bags"),
    pytest.param(lambda c: (train_main, c.train("--epochs", "3"), ["--epochs"]), 2, id="train-unknown-flag"),
    pytest.param(lambda c: (demo_main, ["--nosuch"], ["--nosuch"]), 2, id="demo-unknown-flag"),
    pytest.param(lambda c: (predict_main, ["--checkpoint", str(c.ckpt)], ["--output"]), 2, id="predict-missing-arguments"),
    pytest.param(lambda c: (train_main, c.train("--set", f"data.manifest={c.csv_file('dup.csv', [*c.rows[:3], c.rows[1]])}"),
                            [c.tmp / "dup.csv", c.rows[1]["slide_id"], "row 5"]), 1, id="train-manifest-duplicate-slide_id"),
    pytest.param(lambda c: (eval_main, c.eval("--manifest", str(c.csv_file("dup.csv", [c.test_row, c.test_row]))),
                            [c.tmp / "dup.csv", c.sid]), 1, id="eval-manifest-duplicate-slide_id"),
    pytest.param(lambda c: (train_main, c.train("--set", f"data.manifest={_multilabel(c, 'yes')}", "--set",
                                                "data.multilabel=true", "--set", "data.classes=[a,b]"),
                            [c.tmp / "multilabel.csv", "'a'", "yes"]), 1, id="train-multilabel-value-yes"),
    pytest.param(lambda c: (train_main, c.train("--set", f"data.manifest={_multilabel(c, '1')}", "--set",
                                                "data.multilabel=true", "--set", "data.classes=[a,c]"),
                            [c.tmp / "multilabel.csv", "c"]), 1, id="train-multilabel-missing-column"),
    pytest.param(lambda c: (train_main, c.train("--set", f"data.manifest={_rows_with(c, label='tumour')}"),
                            [c.tmp / "changed.csv", "tumour"]), 1, id="train-label-not-a-class"),
    pytest.param(lambda c: (train_main, c.train("--set", f"data.manifest={_rows_with(c, split='training')}"),
                            [c.tmp / "changed.csv", "training"]), 1, id="train-split-training"),
    pytest.param(lambda c: (train_main, c.train("--set", f"data.manifest={_rows_with(c, slide_id='nosuch')}"),
                            [c.tmp / "changed.csv", c.bags / "nosuch.h5"]), 1, id="train-bag-missing"),
    pytest.param(lambda c: (eval_main, c.eval("--split", "train", "--manifest", str(c.one_row_manifest())),
                            [c.tmp / "one.csv", "split=train"]), 1, id="eval-split-without-rows"),
    pytest.param(lambda c: (eval_main, c.eval("--bags", str(_mkdir(c.tmp / "nobags"))), [c.tmp / "nobags"]), 1,
                 id="eval--bags-wrong-folder"),
    pytest.param(lambda c: (predict_main, c.predict(bags=[_mkdir(c.tmp / "nobags")]), [c.tmp / "nobags"]), 1,
                 id="predict-folder-without-bags"),
    pytest.param(lambda c: (predict_main, c.predict(output=c.out / "predictions.txt"), ["--output"]), 2,
                 id="predict--output-not-csv-or-json"),
    pytest.param(lambda c: (heatmap_main, c.heatmap("--slide", str(c.tmp / "a.svs"), str(c.tmp / "b.svs")), ["--slide"]),
                 2, id="heatmap--slide-count"),
    pytest.param(lambda c: (heatmap_main, c.heatmap("--class", "nosuch"), ["--class", "nosuch"]), 2,
                 id="heatmap--class-nosuch"),
    pytest.param(lambda c: (heatmap_main, c.heatmap(bags=[c.tmp / "nope.h5"]), [c.tmp / "nope.h5"]), 1,
                 id="heatmap--bag-missing"),
    pytest.param(lambda c: (patchgastric_main, c.patchgastric(c.tmp / "nope.csv"), [c.tmp / "nope.csv"]), 1,
                 id="patchgastric--captions-missing"),
    *[pytest.param(_set(train_main, item, item.split("=")[1]), 2, id=f"train-{item.split('=')[0]}-missing-folder")
      for item in ("model.captioner.pretrained=/nonexistent/flan-t5", "model.aggregator.tokenizer=/nonexistent/bert")],
]


@pytest.mark.parametrize("build, code", OTHER_CASES)
def test_other_mistakes(ctx, capsys, build, code):
    run_case(ctx, capsys, build, code)


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
