"""Known-truth benchmark: does each aggregator learn the needles, caption both findings, and point
its heatmaps at the right patches?

For each cohort (:mod:`pathm3.cohorts`; default: 2% scattered, 2% in regions, 0.5% scattered in
bags of 200-400 and of 1,000-2,000 patches) every aggregator trains side by side with the same
config, budget and split (:func:`pathm3.compare.variant`: PathM3 keeps the config's mixer, the
baselines run without one, every model keeps the captioner) over several seeds. Per cohort x
aggregator, mean ± std over seeds, on the test split:

    accuracy           image-only classification accuracy
    findings           share of slides whose generated caption names the right class phrase AND
                       the right attribute phrase (also each alone: class / attribute phrase)
    agreement          share of slides whose caption names the class the classifier predicts
    BLEU-4             of the generated captions
    P@k, AUROC         per heatmap method (:data:`pathm3.explain.METHODS`, explaining the predicted
                       class): precision of the top-k patches, k = the slide's true class-signal
                       patches, and patch-level AUROC against them, averaged over the slides
    attention mass     share of the aggregator's attention on class / attribute signal patches
    term P@k           with caption terms scored on the patches (``train.terms.source`` patches or
                       both): P@k of the term heatmap (``pathm3-heatmap --term``) of the slide's own
                       class word / attribute word against that signal's patches

    python benchmarks/known_truth.py --quick --output /tmp/kt_quick
    python benchmarks/known_truth.py --output runs/known_truth --aggregators qformer abmil --seeds 0 1 2
    python benchmarks/known_truth.py --output runs/kt_pd0 --aggregators qformer --set model.patch_dropout=0
    python benchmarks/known_truth.py --output runs/kt_draw1 --aggregators qformer --cohort-seed 1
    python benchmarks/known_truth.py --output runs/kt_big --cohorts scattered_0.5 --slides 1440 --seeds 0

Writes ``OUTPUT/results.json`` (every run's values and the summaries) and ``OUTPUT/results.md``;
runs live in ``OUTPUT/<cohort>/<aggregator>/seed<k>/`` and are reused when their config matches.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pathm3.bags import read_bag
from pathm3.cohorts import Cohort, CohortSpec, SlideTruth, make_cohort
from pathm3.compare import variant
from pathm3.config import Config, add_set_arg, apply_overrides, load_config
from pathm3.data import pad_bags
from pathm3.errors import ArgumentParser, UsageError, add_debug_flag, number, run_cli
from pathm3.explain import METHODS, all_term_scores, has_term_scores, patch_scores
from pathm3.files import read_csv, write_text
from pathm3.parts import AGGREGATORS
from pathm3.parts.terms import words
from pathm3.pretrained import load_checkpoint
from pathm3.summary import lookup, mean_std
from pathm3.train import run_dir, train_one

REPO = Path(__file__).resolve().parents[1]
COHORTS = {
    "scattered_2": CohortSpec(layout="scattered", class_frac=0.02, attribute_frac=0.02),
    "regions_2": CohortSpec(layout="regions", class_frac=0.02, attribute_frac=0.02),
    "scattered_0.5": CohortSpec(layout="scattered", class_frac=0.005, attribute_frac=0.005),
    # 0.5% of slide-sized bags: 5-10 needles among 1,000-2,000 patches (training steps see 512 of them)
    "scattered_0.5_large": CohortSpec(layout="scattered", class_frac=0.005, attribute_frac=0.005, patches=(1000, 2000)),
}
QUICK = dict(slides=36, patches=(40, 80))  # --quick: small cohorts, 2 epochs, one seed
QUICK_SETTINGS = ["eval.num_beams=1", "eval.max_new_tokens=12", "train.warmup_steps=2"]
CAPTION_METRICS = ("accuracy", "findings", "class_phrase", "attribute_phrase", "agreement", "bleu_4",
                   "attention_mass_class", "attention_mass_attribute")


@dataclass
class RunScore:
    """One trained run scored against the truth (means over its test slides)."""

    cohort: str
    aggregator: str
    seed: int
    values: dict[str, float]  # CAPTION_METRICS, "p_at_k/<method>", "auroc/<method>"
    seconds_per_epoch: float
    run: str


@dataclass
class Row:
    """One cohort x aggregator over its seeds."""

    cohort: str
    aggregator: str
    seeds: list[int]
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (mean, std)
    seconds_per_epoch: float = 0.0


# --------------------------------------------------------------------------------------------
# Scoring one run


def caption_scores(run: Path, cohort: Cohort) -> dict[str, float]:
    """Accuracy, caption findings, agreement and BLEU-4 of a run's test predictions."""
    rows = read_csv(run / "predictions.csv", ["slide_id", "label", "pred_image_only", "caption_pred"], "predictions")
    truth = [cohort.slide(r["slide_id"]) for r in rows]
    named = [cohort.read_caption(r["caption_pred"]) for r in rows]
    predicted = [cohort.classes.index(r["pred_image_only"]) for r in rows]
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "accuracy": float(np.mean([p == t.label for p, t in zip(predicted, truth)])),
        "findings": float(np.mean([n == (t.label, t.attribute) for n, t in zip(named, truth)])),
        "class_phrase": float(np.mean([n[0] == t.label for n, t in zip(named, truth)])),
        "attribute_phrase": float(np.mean([n[1] == t.attribute for n, t in zip(named, truth)])),
        "agreement": float(np.mean([n[0] == p for n, p in zip(named, predicted)])),
        "bleu_4": lookup(metrics, "captioning.bleu_4"),
    }


def phrase_word(phrase: str, others: Sequence[str], terms: Sequence[str]) -> str | None:
    """The first caption term that is a word of ``phrase`` and of none of the ``others``."""
    taken = {w for o in others if o != phrase for w in words(o)}
    return next((w for w in words(phrase) if w in terms and w not in taken), None)


def term_precision(model, slides: Sequence[SlideTruth], bags, feats, mask, cohort: Cohort) -> dict[str, list[float]]:
    """P@k per slide of the term heatmap of its own class word and attribute word (source patches / both)."""
    if not has_term_scores(model):
        return {}
    terms = model.terms.cfg.terms
    scores = all_term_scores(model, feats, mask).numpy()  # (B, T, M)
    out: dict[str, list[float]] = {}
    for signal, phrases, index in (("class", cohort.class_phrases, "label"), ("attribute", cohort.attribute_phrases,
                                                                              "attribute")):
        for row, s, bag in zip(scores, slides, bags):
            word = phrase_word(phrases[getattr(s, index)], phrases, terms)
            if word is None:
                continue
            truth = s.signal_mask(bag.coords, signal)
            top = np.argsort(-row[terms.index(word), :len(bag)], kind="stable")[:truth.sum()]
            out.setdefault(f"term_p_at_k/{signal}", []).append(float(truth[top].mean()))
    return out


def heatmap_scores(model, slides: Sequence[SlideTruth], cohort: Cohort, methods: Sequence[str],
                   batch_size: int = 8, options: dict | None = None) -> dict[str, float]:
    """Mean over ``slides`` of P@k and AUROC per method, the attention mass on each signal and
    the term heatmaps' P@k."""
    from sklearn.metrics import roc_auc_score

    per: dict[str, list[float]] = {}
    for i in range(0, len(slides), batch_size):
        group = slides[i:i + batch_size]
        bags = [read_bag(cohort.bags_dir / f"{s.slide_id}.h5", dtype="float32") for s in group]
        feats, mask = pad_bags([torch.from_numpy(b.features) for b in bags])  # (B, M, D), (B, M)
        for key, values in term_precision(model, group, bags, feats, mask, cohort).items():
            per.setdefault(key, []).extend(values)
        for name in methods:
            scores = patch_scores(model, feats, mask, name, **(options or {}).get(name, {})).numpy()  # (B, M)
            for s, bag, row in zip(group, bags, scores):
                row = row[:len(bag)]
                truth = s.signal_mask(bag.coords, "class")
                top = np.argsort(-row, kind="stable")[:truth.sum()]
                per.setdefault(f"p_at_k/{name}", []).append(float(truth[top].mean()))
                per.setdefault(f"auroc/{name}", []).append(float(roc_auc_score(truth, row)))
                if name == "attention":
                    total = max(float(row.sum()), 1e-12)
                    for signal in ("class", "attribute"):
                        mass = float(row[s.signal_mask(bag.coords, signal)].sum()) / total
                        per.setdefault(f"attention_mass_{signal}", []).append(mass)
    return {k: float(np.mean(v)) for k, v in per.items()}


def score_run(run: Path, cohort_name: str, cohort: Cohort, aggregator: str, seed: int, methods: Sequence[str],
              options: dict | None = None) -> RunScore:
    """Score a finished run (cached in ``run/known_truth.json`` for the same methods)."""
    cache = run / "known_truth.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("methods") == list(methods) and cached.get("options") == (options or {}):
            return RunScore(**cached["score"])
    model, _, classes = load_checkpoint(run / "checkpoints" / "best.safetensors")
    if classes != cohort.classes:
        raise UsageError(f"{run}: trained on classes {classes}, not this cohort's {cohort.classes}")
    values = caption_scores(run, cohort) | heatmap_scores(model, cohort.split("test"), cohort, methods, options=options)
    info = json.loads((run / "run.json").read_text())
    score = RunScore(cohort_name, aggregator, seed, values, info["seconds_per_epoch"], str(run))
    write_text(cache, json.dumps({"methods": list(methods), "options": options or {}, "score": asdict(score)}))
    return score


# --------------------------------------------------------------------------------------------
# Training (reusing finished runs with the same config)


def trained(cfg: Config, seed: int, fresh: bool) -> Path:
    """The run folder of ``cfg`` at ``seed``: trained now, or reused when finished with the same config."""
    out = run_dir(cfg, seed)
    if not fresh and (out / "metrics.json").is_file() and (out / "config.yaml").is_file():
        stored = load_config(out / "config.yaml")
        if not cfg.train.terms.terms:  # the run wrote the caption terms it chose
            stored = apply_overrides(stored, ["train.terms.terms=[]"])
        if stored == apply_overrides(cfg, [f"train.seed={seed}"]):
            return out
    return train_one(cfg, seed, progress=False)


def cohort_config(args, cohort: Cohort, output: Path) -> Config:
    """The config of every run on ``cohort``: the base config pointed at the cohort, then --set."""
    settings = cohort.overrides() + [f"train.max_epochs={args.epochs}", f"train.output_dir={output}"]
    return load_config(args.config, settings + (QUICK_SETTINGS if args.quick else []) + args.overrides)


def cohort_spec(name: str, draw: int = 0, slides: int | None = None, quick: bool = False) -> tuple[CohortSpec, str]:
    """(spec, folder name) of cohort ``name`` drawn with seed ``draw`` (another draw: <name>_draw<seed>),
    with ``slides`` slides (<name>_n<slides>: a larger or smaller cohort of the same kind)."""
    spec = replace(COHORTS[name], seed=draw, **(QUICK if quick else {}))
    name = name if draw == 0 else f"{name}_draw{draw}"
    if slides:
        spec, name = replace(spec, slides=slides), f"{name}_n{slides}"
    return spec, name


def run_all(args) -> list[RunScore]:
    """Build the cohorts, train and score every cohort x aggregator x seed."""
    output = Path(args.output)
    scores = []
    for name in args.cohorts:
        spec, name = cohort_spec(name, args.cohort_seed, args.slides, args.quick)
        cohort = make_cohort(Path(args.cohort_root or output / "cohorts") / name, spec)
        cfg = cohort_config(args, cohort, output / name)
        for aggregator in args.aggregators:
            for seed in args.seeds:
                start = time.perf_counter()
                run = trained(variant(cfg, aggregator, output / name), seed, args.fresh)
                score = score_run(run, name, cohort, aggregator, seed, args.methods, args.method_options)
                scores.append(score)
                brief = ", ".join(f"{k} {score.values[k]:.3f}" for k in ("accuracy", "findings", "agreement",
                                                                         "p_at_k/attention") if k in score.values)
                print(f"{name} {aggregator} seed {seed}: {brief} ({time.perf_counter() - start:.0f} s)", flush=True)
    return scores


# --------------------------------------------------------------------------------------------
# Summaries


def summarise(scores: Sequence[RunScore]) -> list[Row]:
    """mean ± std over seeds per cohort x aggregator, in the order the runs came."""
    rows: dict[tuple[str, str], Row] = {}
    for s in scores:
        rows.setdefault((s.cohort, s.aggregator), Row(s.cohort, s.aggregator, []))
    for (cohort, aggregator), row in rows.items():
        mine = [s for s in scores if (s.cohort, s.aggregator) == (cohort, aggregator)]
        row.seeds = [s.seed for s in mine]
        row.seconds_per_epoch = float(np.mean([s.seconds_per_epoch for s in mine]))
        for key in dict.fromkeys(k for s in mine for k in s.values):
            stats = mean_std([s.values.get(key) for s in mine])
            if stats is not None:
                row.stats[key] = stats
    return list(rows.values())


def fmt(row: Row, key: str) -> str:
    m = row.stats.get(key)
    return "n/a" if m is None else f"{m[0]:.3f} ± {m[1]:.3f}"


def markdown(rows: Sequence[Row], methods: Sequence[str], title: str) -> str:
    """Two tables per cohort: learning and captions; heatmaps (P@k / AUROC per method)."""
    lines = [f"# {title}", ""]
    for cohort in dict.fromkeys(r.cohort for r in rows):
        mine = [r for r in rows if r.cohort == cohort]
        head = ["aggregator", "seeds", "accuracy", "findings (class AND attribute)", "class phrase",
                "attribute phrase", "agreement", "BLEU-4", "attention on class / attribute patches", "s / epoch"]
        lines += [f"## {cohort}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in mine:
            cells = [r.aggregator, str(len(r.seeds)), *[fmt(r, k) for k in CAPTION_METRICS[:6]],
                     f"{fmt(r, 'attention_mass_class')} / {fmt(r, 'attention_mass_attribute')}",
                     f"{r.seconds_per_epoch:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        head = ["aggregator", *[f"{m} P@k / AUROC" for m in methods], "term heatmap P@k: class / attribute word"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in mine:
            cells = [f"{fmt(r, f'p_at_k/{m}')} / {fmt(r, f'auroc/{m}')}" for m in methods]
            cells.append(f"{fmt(r, 'term_p_at_k/class')} / {fmt(r, 'term_p_at_k/attribute')}")
            lines.append("| " + " | ".join([r.aggregator, *cells]) + " |")
        lines.append("")
    return "\n".join(lines)


def write_results(scores: Sequence[RunScore], args) -> Path:
    rows = summarise(scores)
    output = Path(args.output)
    settings = {"config": str(args.config), "epochs": args.epochs, "seeds": args.seeds, "quick": args.quick,
                "overrides": args.overrides, "methods": args.methods}
    write_text(output / "results.json", json.dumps({"settings": settings, "rows": [asdict(r) for r in rows],
                                                    "runs": [asdict(s) for s in scores]}, indent=1))
    title = (f"Known-truth benchmark: test split, mean ± std over seeds {', '.join(map(str, args.seeds))}; "
             f"{args.epochs} epochs" + (f"; --set {' '.join(args.overrides)}" if args.overrides else ""))
    return write_text(output / "results.md", markdown(rows, args.methods, title))


# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python benchmarks/known_truth.py", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, metavar="DIR", help="folder for cohorts, runs and results")
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="base config (default demo.yaml)")
    p.add_argument("--cohorts", nargs="+", choices=list(COHORTS), default=list(COHORTS), help="cohorts to run")
    p.add_argument("--cohort-root", metavar="DIR", help="where cohorts are written (default OUTPUT/cohorts)")
    p.add_argument("--cohort-seed", type=number(int, 0), default=0,
                   help="draw the cohorts with this seed (default 0); another seed checks a setting on fresh "
                        "cohorts, as <cohort>_draw<seed>")
    p.add_argument("--slides", type=number(int, 9), default=None,
                   help="slides per cohort (default 180; 60/20/20 split), as <cohort>_n<slides>: is a cohort "
                        "data-limited?")
    p.add_argument("--aggregators", nargs="+", choices=list(AGGREGATORS), default=list(AGGREGATORS),
                   help="aggregators (default: all)")
    p.add_argument("--seeds", type=number(int, 0), nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--epochs", type=number(int, 1), default=30, help="training epochs (default 30, as demo.yaml)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="heatmap methods")
    p.add_argument("--ig-steps", type=number(int, 1), default=16, help="integrated gradients steps (default 16)")
    p.add_argument("--quick", action="store_true", help="smoke run: small cohorts, 2 epochs, seed 0, qformer + abmil")
    p.add_argument("--fresh", action="store_true", help="retrain runs even when a finished one matches")
    add_set_arg(p)
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        args.epochs = args.epochs if "--epochs" in given else 2
        args.seeds = args.seeds if "--seeds" in given else [0]
        args.aggregators = args.aggregators if "--aggregators" in given else ["qformer", "abmil"]
        args.ig_steps = args.ig_steps if "--ig-steps" in given else 4
    args.method_options = {"integrated_gradients": {"steps": args.ig_steps}}
    torch.set_num_threads(1)
    scores = run_all(args)
    print(write_results(scores, args).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
