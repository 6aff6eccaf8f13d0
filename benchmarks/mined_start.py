"""A start from the data: does PathM3 learn a cohort it misses once its training bags are cut down
to the patches that match other bags of their class?

The similarity baseline (``similarity_probe.py``) reads the small 0.5% cohort from its 108
training bags with no gradient, while PathM3 trained on the whole bags stays near chance. Here
each training bag is cut down to the ``--top`` patches with the largest similarity excess for its
own class, as many for its own attribute value (both leave-own-bag-out: matched against the
other training bags only), and ``--others`` random patches of the rest; validation and test
bags stay whole. PathM3 (``demo.yaml``) trains on the cut bags and is scored against the truth
on the whole test bags as ``known_truth.py`` scores it. An experiment, not a part of the package:
it keeps every training patch in memory to match them.

    python benchmarks/mined_start.py --output runs/mined --others 60 20 4 --seeds 0 1 2
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from known_truth import COHORTS, REPO, cohort_config, cohort_spec, score_run, trained  # noqa: E402
from similarity_probe import excess_rates, training_patches  # noqa: E402

from pathm3.cohorts import Cohort, make_cohort, read_cohort  # noqa: E402
from pathm3.compare import variant  # noqa: E402
from pathm3.config import add_set_arg  # noqa: E402
from pathm3.errors import ArgumentParser, add_debug_flag, number, run_cli  # noqa: E402
from pathm3.files import write_text  # noqa: E402
from pathm3.synthetic import write_synthetic_bag  # noqa: E402

METRICS = ("accuracy", "findings", "agreement", "p_at_k/random_subsets", "term_p_at_k/class", "term_p_at_k/attribute")


def mine_cohort(cohort: Cohort, root: Path, top: int, others: int, quantile: float, seed: int = 0
                ) -> tuple[Cohort, dict[str, float]]:
    """Write ``cohort`` with cut-down training bags to ``root`` (reused when written); return it and
    the share of the mined patches that are class / attribute needles."""
    record = root / "mining.json"
    if record.is_file() and (root / "truth.json").is_file():
        return read_cohort(root), json.loads(record.read_text())
    tp = training_patches(cohort, (quantile,), seed)
    groups = {kind: tp.onehot(cohort, kind) for kind in ("label", "attribute")}
    rng = np.random.default_rng(seed)
    found: dict[str, list[float]] = {"class": [], "attribute": []}
    (root / "bags").mkdir(parents=True, exist_ok=True)
    for j, (s, feats, xy) in enumerate(zip(tp.slides, tp.feats, tp.coords)):
        bag = tp.standardise(feats)  # (M, D)
        chosen = []
        for kind, signal in (("label", "class"), ("attribute", "attribute")):
            others_only = groups[kind] * (tp.owner != j)[:, None]  # (N, G) without this bag's patches
            excess = excess_rates(bag, tp.patches, others_only, tp.thresholds)[0, :, getattr(s, kind)].numpy()  # (M,)
            best = np.argsort(-excess, kind="stable")[:top]
            found[signal].append(float(s.signal_mask(xy, signal)[best].mean()))
            chosen += best.tolist()
        rest = np.setdiff1d(np.arange(len(feats)), chosen)
        keep = np.sort(np.concatenate([np.unique(chosen), rng.choice(rest, min(others, len(rest)), replace=False)]))
        write_synthetic_bag(root / "bags" / f"{s.slide_id}.h5", feats[keep], xy[keep], s.slide_id,
                            cohort.spec.patch_size)
    for s in cohort.slides:
        if s.split != "train":
            link = root / "bags" / f"{s.slide_id}.h5"
            link.unlink(missing_ok=True)
            link.symlink_to((cohort.bags_dir / f"{s.slide_id}.h5").resolve())
    shutil.copy(cohort.manifest, root / "manifest.csv")
    precision = {k: float(np.mean(v)) for k, v in found.items()}
    write_text(record, json.dumps(precision))
    shutil.copy(cohort.truth_path, root / "truth.json")  # last: marks the cohort complete
    return read_cohort(root), precision


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python benchmarks/mined_start.py", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, metavar="DIR", help="folder for cohorts and runs")
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="base config (default demo.yaml)")
    p.add_argument("--cohorts", nargs="+", choices=list(COHORTS), default=["scattered_0.5"], help="cohorts to run")
    p.add_argument("--cohort-root", metavar="DIR", help="where the cohorts are (or are written; default OUTPUT/cohorts)")
    p.add_argument("--cohort-seed", type=number(int, 0), default=0, help="draw of the cohorts, as known_truth.py")
    p.add_argument("--slides", type=number(int, 9), default=None, help="slides per cohort, as known_truth.py")
    p.add_argument("--top", type=number(int, 1), default=2, help="mined patches per bag and signal (default 2)")
    p.add_argument("--others", type=number(int, 0), nargs="+", default=[60, 20, 4],
                   help="random other patches kept per training bag, one run each (default 60 20 4)")
    p.add_argument("--quantile", type=number(float, 0, 1, low_open=True, high_open=True), default=1e-4,
                   help="share of random training-patch pairs that count as a match (default 1e-4)")
    p.add_argument("--seeds", type=number(int, 0), nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--epochs", type=number(int, 1), default=30, help="training epochs (default 30)")
    add_set_arg(p)
    add_debug_flag(p)
    p.set_defaults(quick=False)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    output = Path(args.output)
    print("| cohort | others kept | mined needles: class / attribute | " + " | ".join(METRICS) + " |")
    print("|---|---|---|" + "---|" * len(METRICS))
    for name in args.cohorts:
        spec, name = cohort_spec(name, args.cohort_seed, args.slides)
        cohort = make_cohort(Path(args.cohort_root or output / "cohorts") / name, spec)
        for others in args.others:
            tag = f"{name}_top{args.top}_others{others}"
            mined, precision = mine_cohort(cohort, output / tag / "cohort", args.top, others, args.quantile)
            cfg = cohort_config(args, mined, output / tag)
            values = [score_run(trained(variant(cfg, "qformer", output / tag), seed, False), name, cohort, "qformer",
                                seed, ["random_subsets"]).values for seed in args.seeds]
            cells = [f"{np.mean([v.get(k, np.nan) for v in values]):.3f}" for k in METRICS]
            print(f"| {name} | {others} | {precision['class']:.3f} / {precision['attribute']:.3f} | "
                  + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
