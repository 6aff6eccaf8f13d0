"""Command-line entry points: ``pathm3-train``, ``pathm3-eval``, ``pathm3-predict``, ``pathm3-heatmap``,
``pathm3-compare``.

Each is a thin shell over :mod:`pathm3.train`, :mod:`pathm3.evaluate`, :mod:`pathm3.heatmap` and
:mod:`pathm3.compare`; errors go through :func:`pathm3.errors.run_cli` (one ``error:`` line, exit 1 or 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from pathm3.config import add_config_args, load_config
from pathm3.errors import ArgumentParser, DataError, UsageError, add_debug_flag, number, run_cli
from pathm3.files import check_writable
from pathm3.runtime import add_runtime_args


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_debug_flag(p)


def _foreign_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-foreign-bags", action="store_true",
                   help="use bags extracted differently from the model's training bags (another encoder, "
                   "magnification, patch size, ...) with a warning instead of refusing them")


def _check_bags(paths, checkpoint: Path, feature_dim: int, allow_foreign: bool) -> None:
    """Width and provenance of every bag against the checkpoint, before anything is computed or written."""
    from pathm3.data import check_feature_width
    from pathm3.pretrained import checkpoint_provenance
    from pathm3.provenance import check_provenance

    check_feature_width(paths, feature_dim)
    check_provenance(paths, checkpoint_provenance(checkpoint), allow_foreign)


# --------------------------------------------------------------------------------------------


def train_main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(
        prog="pathm3-train",
        description="Train PathM3 with Lightning. Writes train.output_dir/<train.name>/seed<k>/ (config.yaml, "
        "checkpoints/, metrics.csv, then metrics.json and predictions.csv for the test split).",
        epilog="Ablations: --set model.mixer.type=none, --set train.task=classification|captioning|multitask. "
        "Baselines: --set model.aggregator.type=abmil (transmil, dsmil, clam_sb, mean, max), or pathm3-compare.",
    )
    add_config_args(p, required=False)
    p.add_argument("--seeds", type=number(int, 0), nargs="+", metavar="K",
                   help="train one run per seed and write summary.json / summary.md (mean ± std)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from RUN_DIR/checkpoints/last.ckpt (a seed<k> folder)")
    p.add_argument("--strip-class-words", action="store_true",
                   help="remove class names and differentiation-grade phrases from captions used as classifier "
                   "input (same as --set data.strip_class_words=true)")
    _common(p)
    args = p.parse_args(argv)
    from pathm3.train import resume_run, train_one, train_seeds

    progress = not args.no_progress
    if args.resume:
        if args.config or args.overrides or args.seeds:
            raise UsageError("--resume takes the run's saved config.yaml; do not combine it with --config/--set/--seeds")
        out = resume_run(args.resume, progress=progress)
        if out is not None:
            print(f"resumed and finished: {out}")
        return 0
    if not args.config:
        raise UsageError("--config FILE is required (or --resume RUN_DIR)")
    overrides = list(args.overrides) + (["data.strip_class_words=true"] if args.strip_class_words else [])
    cfg = load_config(args.config, overrides)
    if args.seeds:
        out = train_seeds(cfg, args.seeds, progress=progress)
        if out is not None:  # None on DDP ranks other than 0
            print((out / "summary.md").read_text())
            print(f"summary: {out / 'summary.md'}")
    else:
        out = train_one(cfg, cfg.train.seed, progress=progress)
        if out is not None:
            _print_metrics(out / "metrics.json")
            print(f"run: {out}")
    return 0


def _print_metrics(path: Path) -> None:
    m = json.loads(path.read_text())
    parts = []
    if m.get("classification"):
        for mode in ("image_only", "image_text"):
            res = m["classification"].get(mode)
            if res:
                key = "accuracy" if "accuracy" in res else "micro_f1"
                parts.append(f"{key.replace('_', '-')} ({mode.replace('_', ' ')}) {res[key]:.3f}")
    if m.get("captioning"):
        c = m["captioning"]
        parts += [f"BLEU-4 {c['bleu_4']:.3f}", f"METEOR {c['meteor']:.3f}", f"ROUGE-L {c['rouge_l']:.3f}",
                  f"CIDEr {c['cider']:.3f}"]
        if c.get("class_agreement") is not None:
            parts.append(f"caption names the predicted class {c['class_agreement']:.3f}")
    if m.get("captioning_retrieval"):
        parts.append(f"BLEU-4 of the nearest training caption {m['captioning_retrieval']['bleu_4']:.3f}")
    if m.get("retrieval"):
        parts.append(f"slide->caption R@1 {m['retrieval']['slide_to_caption_r@1']:.3f}")
    if m.get("caption_terms"):
        parts.append(f"caption-term micro-F1 {m['caption_terms']['micro_f1']:.3f}")
    print(f"{m.get('split', 'test')} ({m['n_slides']} slides): " + ", ".join(parts))


# --------------------------------------------------------------------------------------------


def eval_main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(
        prog="pathm3-eval",
        description="Evaluate a checkpoint on a split of its manifest: metrics.json (classification image-only "
        "and image+text, captioning BLEU/METEOR/ROUGE-L/CIDEr/SPICE) and predictions.csv beside it.",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a .safetensors checkpoint (e.g. RUN_DIR/checkpoints/best.safetensors) or a run folder")
    p.add_argument("--split", default=None, choices=("train", "val", "test"),
                   help="train, val or test (default: eval.split of the config, test)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="metrics JSON path (default: metrics.json in the checkpoint's run folder for the test split, "
                   "metrics_<split>.json for another split, so the run's test metrics are never overwritten); "
                   "predictions.csv (predictions_<split>.csv) goes beside it")
    p.add_argument("--manifest", help="evaluate another manifest than the checkpoint's data.manifest")
    p.add_argument("--bags", help="bags folder for --manifest (default: the checkpoint's data.bags_dir)")
    p.add_argument("--strip-class-words", action="store_true",
                   help="remove class words from captions used as classifier input")
    _foreign_flag(p)
    add_runtime_args(p)
    _common(p)
    args = p.parse_args(argv)
    from pathm3.config import apply_overrides
    from pathm3.evaluate import evaluate, thresholds_of, training_slides, write_json, write_predictions
    from pathm3.manifest import SPLITS, read_manifest

    ckpt = _checkpoint_path(args.checkpoint)
    model, cfg, classes = _load(ckpt, args)
    if args.strip_class_words:
        cfg = apply_overrides(cfg, ["data.strip_class_words=true"])
    split = args.split or cfg.eval.split
    if split not in SPLITS:
        raise UsageError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    slides = read_manifest(args.manifest or cfg.data.manifest, args.bags or cfg.data.bags_dir, classes, splits=[split],
                           multilabel=cfg.data.multilabel)
    if not slides:
        raise DataError(f"{args.manifest or cfg.data.manifest}: no rows with split={split}")
    _check_bags([s.bag_path for s in slides], ckpt, cfg.model.feature_dim, args.allow_foreign_bags)
    suffix = "" if split == "test" else f"_{split}"
    out = Path(args.output) if args.output else ckpt.parent.parent / f"metrics{suffix}.json"
    predictions = out.parent / f"predictions{suffix}.csv"
    check_writable(out)
    metrics, preds = evaluate(model, cfg, classes, slides, progress=not args.no_progress,
                              reference=training_slides(cfg, classes))
    metrics["checkpoint"], metrics["split"] = str(ckpt), split
    write_json(metrics, out)
    write_predictions(preds, classes, predictions, model.multilabel, thresholds_of(cfg, classes))
    _print_metrics(out)
    print(f"wrote {out} and {predictions}")
    return 0


def _load(ckpt: Path, args: argparse.Namespace):
    """(model on --device, config with --precision / --num-workers applied, classes)."""
    from pathm3.pretrained import load_checkpoint
    from pathm3.runtime import for_inference

    model, cfg, classes = load_checkpoint(ckpt)
    model, cfg = for_inference(model, cfg, args.device, args.precision, getattr(args, "num_workers", None))
    return model, cfg, classes


def _checkpoint_path(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.safetensors", path / "best.safetensors"):
            if candidate.is_file():
                return candidate
        raise DataError(f"{path}: no checkpoints/best.safetensors in this folder")
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found (pass RUN_DIR/checkpoints/best.safetensors)")
    return path


# --------------------------------------------------------------------------------------------


def predict_main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(
        prog="pathm3-predict",
        description="Predict class, probabilities and a caption for bags with no labels at all. The file has the "
        "columns of pathm3-eval's predictions.csv (label and caption_ref stay empty unless --captions is given).",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a .safetensors checkpoint or a run folder")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="bag files (<slide_id>.h5) or folders of them")
    p.add_argument("--captions", metavar="CSV",
                   help="CSV with slide_id,caption: adds the image+text prediction for those slides")
    p.add_argument("--output", required=True, metavar="FILE.csv|FILE.json", help="where to write the predictions")
    p.add_argument("--batch-size", type=number(int, 1), default=4, help="bags per batch (default 4)")
    p.add_argument("--num-beams", type=number(int, 1), default=None, help="beam width for captions (default: the config's)")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=None,
                   help="caption length limit (default: the config's)")
    p.add_argument("--sample", action="store_true", help="sample captions instead of beam search")
    p.add_argument("--temperature", type=number(float, 0, low_open=True), default=None,
                   help="sampling temperature, > 0 (with --sample; report generators use 0.4)")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=None,
                   help="nucleus sampling threshold in (0, 1] (with --sample; report generators use 0.9)")
    p.add_argument("--top-k", type=number(int, 0), default=None,
                   help="sample only among the k likeliest tokens (with --sample; 0: no limit)")
    p.add_argument("--repetition-penalty", type=number(float, 0, low_open=True), default=None,
                   help="> 1 discourages repeating tokens (default: the config's, 1.0)")
    p.add_argument("--no-repeat-ngram-size", type=number(int, 0), default=None,
                   help="never repeat an n-gram of this size (0: off)")
    _foreign_flag(p)
    add_runtime_args(p)
    _common(p)
    args = p.parse_args(argv)
    from pathm3.evaluate import predict, thresholds_of, write_predictions
    from pathm3.manifest import Slide, one_hot

    out = Path(args.output)
    if out.suffix.lower() not in (".csv", ".json"):
        raise UsageError(f"--output {out}: use a .csv or .json file name")
    check_writable(out)
    bags = _bag_files(args.inputs)
    captions = _read_captions(Path(args.captions)) if args.captions else {}
    ckpt = _checkpoint_path(args.checkpoint)
    model, cfg, classes = _load(ckpt, args)
    slides = [Slide(b.stem, one_hot(None, len(classes)), captions.get(b.stem), "test", b, 0) for b in bags]
    _check_bags(bags, ckpt, cfg.model.feature_dim, args.allow_foreign_bags)
    gen = {k: v for k, v in {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens,
                             "do_sample": True if args.sample else None, "temperature": args.temperature,
                             "top_p": args.top_p, "top_k": args.top_k, "repetition_penalty": args.repetition_penalty,
                             "no_repeat_ngram_size": args.no_repeat_ngram_size}.items() if v is not None}
    preds = predict(model, slides, classes, batch_size=args.batch_size, strip_words=cfg.data.strip_class_words,
                    progress=not args.no_progress, precision=cfg.eval.precision, num_workers=cfg.data.num_workers,
                    **gen)
    write_predictions(preds, classes, out, model.multilabel, thresholds_of(cfg, classes))
    print(f"{len(preds)} slides -> {out}")
    return 0


def _bag_files(inputs: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(p.glob("*.h5"))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such bag file or folder")
    if not files:
        raise DataError(f"no .h5 bags in {', '.join(inputs)}")
    return files


def _read_captions(path: Path) -> dict[str, str]:
    from pathm3.files import read_csv

    return {r["slide_id"]: r["caption"] for r in read_csv(path, ("slide_id", "caption"), "a captions CSV")
            if r.get("caption")}


# --------------------------------------------------------------------------------------------


def heatmap_main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(
        prog="pathm3-heatmap",
        description="Export where the model looked: per-patch scores (--method; or --term) as CSV and "
        "GeoJSON (QuPath: File > Import objects from file), and with --slide a heatmap over the thumbnail "
        "plus a montage of the top-k patches (patch-folder bags: the montage from the patch images).",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a .safetensors checkpoint or a run folder")
    p.add_argument("--bag", required=True, nargs="+", metavar="BAG.h5", help="bag file(s) to explain")
    p.add_argument("--slide", nargs="+", metavar="SLIDE_FILE",
                   help="the slide file(s) of the bag(s), in the same order, for the heatmap and the montage")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the outputs")
    p.add_argument("--top-k", type=number(int, 1), default=5, help="patches in the montage (default 5)")
    p.add_argument("--per-query", action="store_true", help="also write one score column per query in the CSV "
                   "(aggregators with several tokens: the Q-Former)")
    p.add_argument("--method", default=None, metavar="NAME",
                   help="how patches are scored (the CSV's score column): attention (the aggregator's own), "
                   "gradient_x_input, class_attention, attention_x_gradient, feature_gradient_x_input, "
                   "integrated_gradients, occlusion or random_subsets; class-specific methods explain the "
                   "predicted class or --class (default: the most faithful on the known-truth benchmark, see README)")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="explain one class (e.g. one finding of a multi-label model) with a class-specific "
                   "--method (default gradient_x_input when the default method is attention)")
    p.add_argument("--term", metavar="WORD",
                   help="score patches by one caption term instead (a finding word, e.g. necrosis): that term's "
                   "own per-patch score, for models trained with train.terms.source patches or both (or "
                   "train.prototypes); not with --method or --class")
    _foreign_flag(p)
    add_runtime_args(p, workers=False)
    _common(p)
    args = p.parse_args(argv)
    from pathm3.bags import read_bag
    from pathm3.evaluate import thresholds_of
    from pathm3.explain import check_term
    from pathm3.heatmap import check_slide, export, resolve_method

    if args.slide and len(args.slide) != len(args.bag):
        raise UsageError(f"--slide got {len(args.slide)} file(s) for {len(args.bag)} bag(s); give one per bag")
    ckpt = _checkpoint_path(args.checkpoint)
    model, cfg, classes = _load(ckpt, args)
    if args.class_name is not None and args.class_name not in classes:
        raise UsageError(f"--class {args.class_name}: not a class of this model ({', '.join(classes)})")
    method = resolve_method(args.method, args.class_name)
    if args.term is not None:
        if args.method is not None or args.class_name is not None:
            raise UsageError("--term scores patches by a caption term; leave out --method and --class")
        check_term(model, args.term)
    for bag in args.bag:  # every input is checked before anything is written
        if not Path(bag).is_file():
            raise DataError(f"{bag}: no such bag file")
        read_bag(bag)  # NaN/inf features, a file that is not a bag
    _check_bags(args.bag, ckpt, cfg.model.feature_dim, args.allow_foreign_bags)
    for slide in args.slide or []:
        check_slide(slide)
    for i, bag in enumerate(args.bag):
        slide = args.slide[i] if args.slide else None
        written = export(model, classes, bag, args.output, slide_path=slide, top_k=args.top_k, per_query=args.per_query,
                         class_name=args.class_name, thresholds=thresholds_of(cfg, classes),
                         precision=cfg.eval.precision, method=method, term=args.term)
        for kind, path in written.items():
            print(f"{kind:8s} {path}")
    return 0


def compare_main(argv: Sequence[str] | None = None) -> int:
    from pathm3.parts import AGGREGATORS

    p = ArgumentParser(
        prog="pathm3-compare",
        description="Train several aggregators side by side (same manifest, split, head, captioner and budget) over "
        "several seeds; write DIR/comparison.md and DIR/comparison.json (the layout of the paper's Table 1) and "
        "each run under DIR/<aggregator>/seed<k>/. The MIL baselines run without the correlation module.",
    )
    add_config_args(p)
    p.add_argument("--aggregators", nargs="+", metavar="NAME", default=list(AGGREGATORS),
                   help=f"aggregators to compare (default: all of {', '.join(AGGREGATORS)})")
    p.add_argument("--seeds", type=number(int, 0), nargs="+", default=[0], metavar="K", help="seeds (default 0)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the runs and the comparison")
    _common(p)
    args = p.parse_args(argv)
    from pathm3.compare import compare

    rows = compare(load_config(args.config, args.overrides), args.aggregators, args.seeds, args.output,
                   progress=not args.no_progress)
    if rows:
        print((Path(args.output) / "comparison.md").read_text())
    return 0


def train_entry() -> None:
    sys.exit(run_cli(train_main))


def eval_entry() -> None:
    sys.exit(run_cli(eval_main))


def predict_entry() -> None:
    sys.exit(run_cli(predict_main))


def heatmap_entry() -> None:
    sys.exit(run_cli(heatmap_main))


def compare_entry() -> None:
    sys.exit(run_cli(compare_main))
