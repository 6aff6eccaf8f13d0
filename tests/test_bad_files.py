"""Bad inputs, families 4-6: files that are not what they claim, the feature-provenance lock, and
other mistakes (old keys, duplicate rows, folders that are not runs).

The contract every refused run must meet is described in test_bad_inputs.py; the inputs (``Ctx``)
and the checks are in bad_input_cases.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bad_input_cases import (DEMO, WELL, Ctx, _foreign, _foreign_bag, _mkdir, _random_checkpoint, _set,
                             check_refused, run_case, stderr_lines)
from pathm3.cli import compare_main, eval_main, heatmap_main, predict_main, train_main
from pathm3.config import _main as config_main
from pathm3.datasets.patchgastric import main as patchgastric_main
from pathm3.demo import main as demo_main
from pathm3.errors import run_cli


# ---------------------------------------------------------------------------------------------
# 4. Files that exist but are not what they claim


def _nan_bag(c: Ctx) -> Path:
    def poison(f):
        x = f["features"][()]
        x[3, 5] = np.nan
        f["features"][...] = x

    return c.copy_bag("nan", edit=poison)


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
