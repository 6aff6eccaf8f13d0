"""A learnable synthetic cohort of bags, for tests, ``configs/demo.yaml`` and benchmarks.

Each bag holds N(0, 1) patch features; about 2% of its patches carry a class-specific direction
and the whole bag is re-centred, so the class is invisible to mean pooling and a model has to find
the few telling patches (as a pathologist does). Captions are drawn from a few templates per
class, so a captioner can learn them.

    python -m pathm3.synthetic --output demo_output                # bags/ + manifest.csv for configs/demo.yaml
    python -m pathm3.synthetic --output ml --multilabel            # 3 independent findings, some unknown
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pathm3.bags import index_grid, write_bag
from pathm3.errors import ArgumentParser, add_debug_flag, number, run_cli
from pathm3.manifest import write_manifest

CLASSES = ("benign", "adenocarcinoma")
CAPTIONS = {
    "benign": [
        "benign gastric mucosa with regular glands and no atypia",
        "regular foveolar glands in benign mucosa without atypia",
        "benign mucosa with evenly spaced regular glands",
    ],
    "adenocarcinoma": [
        "adenocarcinoma with irregular fused glands and atypical nuclei",
        "irregular fused glands of adenocarcinoma with nuclear atypia",
        "adenocarcinoma forming irregular glands with atypical cells",
    ],
}


def signal_bags(n: int, seed: int, dim: int = 32, frac: float = 0.02, strength: float = 5.0,
                num_classes: int = 2, sizes: tuple[int, int] = (100, 200), return_signal: bool = False):
    """``n`` bags (M_i, dim) with labels i % num_classes; ~``frac`` of each bag carries the signal.

    Returns ``(bags, labels)``, plus the signal patch indices of each bag with ``return_signal``."""
    g = torch.Generator().manual_seed(seed)
    directions = class_directions(dim, num_classes)
    bags, labels, signal = [], [], []
    for i in range(n):
        y = i % num_classes
        m = int(torch.randint(sizes[0], sizes[1], (1,), generator=g))
        x = torch.randn(m, dim, generator=g)
        k = max(1, round(frac * m))
        idx = torch.randperm(m, generator=g)[:k]
        x[idx] += strength * directions[y]
        x -= strength * directions[y] * k / m  # re-centre: the bag mean carries no class signal
        bags.append(x)
        labels.append(y)
        signal.append(idx.sort().values)
    return (bags, torch.tensor(labels), signal) if return_signal else (bags, torch.tensor(labels))


def class_directions(dim: int, num_classes: int) -> torch.Tensor:
    """Orthonormal (num_classes, dim) directions, fixed for every cohort."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(123)))
    return q[:, :num_classes].T


def write_synthetic_bag(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray, name: str,
                        patch_size: int = 224) -> Path:
    """Write one drawn bag (float32) with the provenance every synthetic bag shares: encoder
    ``synthetic``, ``patch_size`` px patches at level 0, the slide's ``name``."""
    return write_bag(path, features, coords, dtype="float32",
                     coords_attrs={"patch_size": patch_size, "patch_size_level0": patch_size, "name": name},
                     features_attrs={"encoder": "synthetic", "name": name})


def write_cohort(output: str | os.PathLike, n_slides: int = 120, dim: int = 64, seed: int = 0,
                 splits: Sequence[float] = (0.6, 0.2, 0.2)) -> Path:
    """Write ``bags/<slide_id>.h5`` and ``manifest.csv`` (labels, captions, splits); returns the manifest."""
    out = Path(output)
    bags, labels = signal_bags(n_slides, seed, dim=dim, num_classes=len(CLASSES))
    rng = np.random.default_rng(seed)
    n_train, n_val = round(splits[0] * n_slides), round(splits[1] * n_slides)
    order = rng.permutation(n_slides)
    split = {int(i): "train" if r < n_train else "val" if r < n_train + n_val else "test" for r, i in enumerate(order)}
    rows = []
    for i, (bag, y) in enumerate(zip(bags, labels.tolist())):
        sid = f"synthetic-{i:04d}"
        write_synthetic_bag(out / "bags" / f"{sid}.h5", bag.numpy(), index_grid(len(bag), 224), sid)
        cls = CLASSES[y]
        rows.append({"slide_id": sid, "label": cls, "caption": CAPTIONS[cls][int(rng.integers(3))], "split": split[i]})
    return write_manifest(rows, out / "manifest.csv")


FINDINGS = ("intestinal_metaplasia", "atrophy", "dysplasia")


def write_multilabel_cohort(output: str | os.PathLike, n_slides: int = 120, dim: int = 64, seed: int = 0,
                            findings: Sequence[str] = FINDINGS, unknown: float = 0.2, frac: float = 0.02,
                            strength: float = 5.0, splits: Sequence[float] = (0.6, 0.2, 0.2)) -> Path:
    """A multi-label cohort: each finding is present in a slide with probability 1/2, independently;
    a present finding puts its own direction on ~``frac`` of the patches (re-centred, so mean pooling
    sees nothing). Each (slide, finding) entry is left empty (unknown) with probability ``unknown``.
    The manifest has one 1/0/empty column per finding (``data.multilabel: true``)."""
    out = Path(output)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    directions = class_directions(dim, len(findings))
    order = rng.permutation(n_slides)
    n_train, n_val = round(splits[0] * n_slides), round(splits[1] * n_slides)
    rows = []
    for i in range(n_slides):
        m = int(torch.randint(100, 200, (1,), generator=g))
        x = torch.randn(m, dim, generator=g)
        present = rng.random(len(findings)) < 0.5
        for f in np.flatnonzero(present):
            k = max(1, round(frac * m))
            idx = torch.randperm(m, generator=g)[:k]
            x[idx] += strength * directions[f]
            x -= strength * directions[f] * k / m
        sid = f"multilabel-{i:04d}"
        write_synthetic_bag(out / "bags" / f"{sid}.h5", x.numpy(), index_grid(m, 224), sid)
        rank = int(np.flatnonzero(order == i)[0])
        row = {"slide_id": sid, "label": "", "split": "train" if rank < n_train else "val" if rank < n_train + n_val else "test",
               "caption": ", ".join(f for f, p in zip(findings, present) if p) or "no findings"}
        for f, p in zip(findings, present):
            row[f] = "" if rng.random() < unknown else str(int(p))
        rows.append(row)
    return write_manifest(rows, out / "manifest.csv")


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m pathm3.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="folder for bags/ and manifest.csv")
    p.add_argument("--slides", type=number(int, 5), default=120, help="number of slides (default 120)")
    p.add_argument("--dim", type=number(int, 4), default=64, help="feature width (default 64, as configs/demo.yaml)")
    p.add_argument("--seed", type=number(int, 0), default=0, help="cohort seed")
    p.add_argument("--multilabel", action="store_true",
                   help=f"several independent findings per slide ({', '.join(FINDINGS)}), 20%% of entries unknown; "
                   "train with --set data.multilabel=true --set data.classes=[...]")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.multilabel:
        manifest = write_multilabel_cohort(args.output, args.slides, args.dim, args.seed)
        print(f"{args.slides} synthetic slides, findings {', '.join(FINDINGS)} -> {manifest}")
        return 0
    manifest = write_cohort(args.output, args.slides, args.dim, args.seed)
    print(f"{args.slides} synthetic slides ({', '.join(CLASSES)}) -> {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
