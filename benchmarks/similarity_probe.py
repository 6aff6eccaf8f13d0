"""A baseline with no gradient: can a known-truth cohort's training bags tell its needles apart?

For every patch of a validation or test bag, count the training patches it matches (similarity
above a threshold) in the bags of each class, as a rate per training patch of that class; its
*excess* for a class is that rate minus the mean rate over the classes. A needle of class c
matches the needles of other class-c bags, a background patch matches every class alike, so::

    excess_c(x) = hits(x, class-c training patches) / |class-c training patches| - mean over classes
    bag score_c = max over the bag's patches of excess_c(x)          predicted class: argmax_c
    heatmap     = excess_{predicted class}(x)                          P@k against the class patches

and the same with the attribute values in place of the classes (attribute accuracy). Features are
standardised with the training patches' mean and std; the threshold is the quantile of random
training-patch pairs' similarities chosen by validation accuracy (class and attribute together).
Nothing is trained, so a cohort on which this baseline is accurate is not data-limited: what a
gradient-trained MIL model misses there, it misses for want of a start, not of examples.

    python benchmarks/similarity_probe.py --cohort-root runs/known_truth/cohorts --cohorts scattered_0.5
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from known_truth import COHORTS, cohort_spec  # noqa: E402  (the benchmark's cohorts)

from pathm3.bags import read_bag  # noqa: E402
from pathm3.cohorts import Cohort, SlideTruth, make_cohort  # noqa: E402
from pathm3.errors import ArgumentParser, add_debug_flag, number, run_cli  # noqa: E402
from pathm3.mining import match_thresholds  # noqa: E402

QUANTILES = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5)  # share of random training-patch pairs above the threshold


@dataclass
class ProbeScore:
    """One cohort: the threshold chosen on validation and the test values."""

    cohort: str
    quantile: float
    val_accuracy: float  # mean of class and attribute accuracy at the chosen quantile
    accuracy: float  # test, class
    attribute_accuracy: float  # test
    p_at_k: float  # test, class-patch heatmap of the predicted class
    attribute_p_at_k: float  # test, attribute-patch heatmap of the predicted attribute value


def bags_of(cohort: Cohort, split: str) -> tuple[list[SlideTruth], list[np.ndarray], list[np.ndarray]]:
    """(slides, features (M, D) per slide, coords (M, 2) per slide) of one split."""
    slides = cohort.split(split)
    read = [read_bag(cohort.bags_dir / f"{s.slide_id}.h5", dtype="float32") for s in slides]
    return slides, [b.features for b in read], [b.coords for b in read]


def excess_rates(bag: torch.Tensor, train: torch.Tensor, groups: torch.Tensor, thresholds: torch.Tensor,
                 chunk: int = 512) -> torch.Tensor:
    """(Q, M, G) each patch's match rate per group of training patches minus its mean over the
    groups, at each threshold. ``bag`` (M, D), ``train`` (N, D), ``groups`` (N, G) one-hot."""
    sizes = groups.sum(0)  # (G,)
    out = []
    for rows in bag.split(chunk):
        sim = rows @ train.T  # (m, N)
        hits = torch.stack([(sim > t).float() @ groups for t in thresholds])  # (Q, m, G)
        rate = hits / sizes
        out.append(rate - rate.mean(-1, keepdim=True))
    return torch.cat(out, dim=1)


@dataclass
class TrainingPatches:
    """Every training patch, standardised, with its bag and the match thresholds."""

    slides: list[SlideTruth]
    feats: list[np.ndarray]  # (M, D) per training slide, as read
    coords: list[np.ndarray]  # (M, 2) per training slide
    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)
    patches: torch.Tensor  # (N, D) standardised
    owner: torch.Tensor  # (N,) index of each patch's slide
    thresholds: torch.Tensor  # (Q,) similarity that a share ``quantiles`` of random pairs exceeds

    def standardise(self, feats: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((feats - self.mean) / self.std)

    def onehot(self, cohort: Cohort, kind: str) -> torch.Tensor:
        """(N, G) each patch's slide's class (``kind`` "label") or attribute value, one-hot."""
        n = len(cohort.classes if kind == "label" else cohort.attributes)
        return torch.from_numpy(np.eye(n, dtype=np.float32)[[getattr(s, kind) for s in self.slides]])[self.owner]


def training_patches(cohort: Cohort, quantiles: Sequence[float] = QUANTILES, seed: int = 0) -> TrainingPatches:
    """Read and standardise the training patches; thresholds from 200,000 random pairs of them."""
    slides, feats, coords = bags_of(cohort, "train")
    flat = np.concatenate(feats)
    mean, std = flat.mean(0), flat.std(0) + 1e-6
    patches = torch.from_numpy((flat - mean) / std)
    owner = torch.from_numpy(np.concatenate([np.full(len(f), i) for i, f in enumerate(feats)]))
    thresholds = match_thresholds(patches, quantiles, np.random.default_rng(seed))
    return TrainingPatches(slides, feats, coords, mean, std, patches, owner, thresholds)


def score_cohort(name: str, cohort: Cohort, quantiles: Sequence[float] = QUANTILES, seed: int = 0) -> ProbeScore:
    """Choose the threshold on the validation bags, then score the test bags."""
    tp = training_patches(cohort, quantiles, seed)
    train, thresholds = tp.patches, tp.thresholds
    onehot = {kind: tp.onehot(cohort, kind) for kind in ("label", "attribute")}

    def run(split: str):
        slides, bag_feats, coords = bags_of(cohort, split)
        right = {k: np.zeros((len(quantiles), len(slides))) for k in onehot}
        precision = {k: np.zeros((len(quantiles), len(slides))) for k in onehot}
        for j, (s, f, xy) in enumerate(zip(slides, bag_feats, coords)):
            bag = tp.standardise(f)
            for kind, signal in (("label", "class"), ("attribute", "attribute")):
                excess = excess_rates(bag, train, onehot[kind], thresholds).numpy()  # (Q, M, G)
                predicted = excess.max(1).argmax(-1)  # (Q,)
                truth = s.signal_mask(xy, signal)
                for q in range(len(quantiles)):
                    right[kind][q, j] = predicted[q] == getattr(s, kind)
                    top = np.argsort(-excess[q, :, predicted[q]], kind="stable")[:truth.sum()]
                    precision[kind][q, j] = truth[top].mean()
        return {k: v.mean(1) for k, v in right.items()}, {k: v.mean(1) for k, v in precision.items()}

    val_right, _ = run("val")
    val = (val_right["label"] + val_right["attribute"]) / 2  # (Q,)
    q = int(np.argmax(val))
    right, precision = run("test")
    return ProbeScore(name, quantiles[q], float(val[q]), float(right["label"][q]), float(right["attribute"][q]),
                      float(precision["label"][q]), float(precision["attribute"][q]))


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python benchmarks/similarity_probe.py", description=__doc__.splitlines()[0])
    p.add_argument("--cohort-root", required=True, metavar="DIR", help="where the cohorts are (or are written)")
    p.add_argument("--cohorts", nargs="+", choices=list(COHORTS), default=list(COHORTS), help="cohorts to score")
    p.add_argument("--cohort-seed", type=number(int, 0), default=0, help="draw of the cohorts, as known_truth.py")
    p.add_argument("--slides", type=number(int, 9), default=None, help="slides per cohort, as known_truth.py")
    add_debug_flag(p)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| cohort | threshold quantile (val) | accuracy | attribute accuracy | heatmap P@k: class / attribute |")
    print("|---|---|---|---|---|")
    for name in args.cohorts:
        spec, name = cohort_spec(name, args.cohort_seed, args.slides)
        s = score_cohort(name, make_cohort(Path(args.cohort_root) / name, spec))
        print(f"| {s.cohort} | {s.quantile:g} | {s.accuracy:.3f} | {s.attribute_accuracy:.3f} | "
              f"{s.p_at_k:.3f} / {s.attribute_p_at_k:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
