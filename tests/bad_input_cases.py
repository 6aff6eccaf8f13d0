"""The inputs and checks shared by test_bad_inputs.py and test_bad_files.py (not collected itself).

``Ctx`` builds a case's inputs in the test's own folder from the shared trained run; ``check_refused``
and ``run_case`` check the contract described in test_bad_inputs.py.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from pathm3.cli import compare_main
from pathm3.config import _main as config_main
from pathm3.errors import run_cli

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
# Case builders used by both test files


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _set(command, item: str, key: str):
    """``--set item`` to train, compare or the config checker; the line names ``key``."""
    if command is config_main:
        return lambda c: (config_main, [str(DEMO), "--set", item], [key])
    return lambda c: (command, (c.compare if command is compare_main else c.train)("--set", item), [key])


def _random_checkpoint(c: Ctx) -> Path:
    path = c.tmp / "model.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    return path


def _foreign(f):
    f["features"].attrs["encoder"] = "eva-vit-g"


def _foreign_bag(c: Ctx) -> Path:
    return c.copy_bag("foreign", edit=_foreign)
