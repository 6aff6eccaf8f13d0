"""Known-truth cohorts: bags whose telling patches are known, to prove that a model learns and
that its heatmaps point at the right place.

Each slide has one of C classes and, independently, one of A attribute values. Its class puts a
class direction on ~``class_frac`` of its patches (the class "needle"); its attribute value puts
an attribute direction on ~``attribute_frac`` other patches. Every bag is then re-centred, so
mean pooling sees nothing (as :func:`pathm3.synthetic.signal_bags`). The caption names both
findings: ``"<class phrase> <attribute phrase>"``, e.g. "tubular adenocarcinoma with lymphocytic
infiltrate". The needles are ``scattered`` over the bag or laid out as contiguous ``regions`` on
the patch coordinate grid (:func:`pathm3.bags.index_grid`)::

    features (M, D) ~ N(0, 1)
    x[class patches]     += strength * d_class       d: orthonormal, pathm3.synthetic.class_directions
    x[attribute patches] += strength * d_attribute   (rows 0..C-1 classes, C..C+A-1 attribute values)
    x -= strength * (k_class / M * d_class + k_attribute / M * d_attribute)   re-centred

Written: ``bags/<slide_id>.h5``, ``manifest.csv`` (slide_id,label,caption,split) and, beside the
manifest, ``truth.json``: the phrases, and per slide its class, attribute and the coordinates
(and region ids) of the patches of each signal.

    python -m pathm3.cohorts --output cohort                          # the default: 3 classes, 180 bags
    python -m pathm3.cohorts --output c05 --class-frac 0.005 --layout regions --patches 1000 10000
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from pathm3.bags import index_grid
from pathm3.errors import ArgumentParser, DataError, UsageError, add_debug_flag, number, run_cli
from pathm3.files import write_text
from pathm3.manifest import write_manifest

CLASS_PHRASES = ("tubular adenocarcinoma", "signet ring cell carcinoma", "papillary adenocarcinoma",
                 "mucinous carcinoma", "hyperplastic polyp", "tubular adenoma", "neuroendocrine tumour",
                 "gastric lymphoma")
ATTRIBUTE_PHRASES = ("with lymphocytic infiltrate", "with necrosis", "with mucin pools", "with perineural invasion")
SIGNALS = ("class", "attribute")
TRUTH_VERSION = 1


@dataclass(frozen=True)
class CohortSpec:
    """What to draw. Fractions are of each bag's patches (at least one patch per signal)."""

    classes: int = 3  # C
    attributes: int = 2  # A attribute values, independent of the class
    slides: int = 180
    patches: tuple[int, int] = (200, 400)  # bag sizes, uniform in [low, high]
    dim: int = 64  # feature width D
    class_frac: float = 0.02
    attribute_frac: float = 0.02
    layout: Literal["scattered", "regions"] = "scattered"
    regions: int = 2  # contiguous regions per signal with layout=regions
    strength: float = 5.0  # norm of a needle
    seed: int = 0
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, val, test; stratified by class
    patch_size: int = 224  # grid cell of the coordinates

    def check(self) -> None:
        """A :class:`UsageError` for a spec that cannot be drawn."""
        lo, hi = self.patches
        problems = [
            (not 2 <= self.classes <= len(CLASS_PHRASES), f"classes must be 2..{len(CLASS_PHRASES)}, got {self.classes}"),
            (not 1 <= self.attributes <= len(ATTRIBUTE_PHRASES),
             f"attributes must be 1..{len(ATTRIBUTE_PHRASES)}, got {self.attributes}"),
            (self.classes + self.attributes > self.dim, f"dim must be at least classes + attributes, got {self.dim}"),
            (not 2 <= lo <= hi, f"patches must be two sizes 2 <= LOW <= HIGH, got {lo} {hi}"),
            (not (0 < self.class_frac <= 0.5 and 0 < self.attribute_frac <= 0.5),
             f"fractions must lie in (0, 0.5], got {self.class_frac} and {self.attribute_frac}"),
            (self.layout not in ("scattered", "regions"), f"layout is scattered or regions, got {self.layout!r}"),
            (self.regions < 1, f"regions must be at least 1, got {self.regions}"),
            (self.slides < 3 * self.classes, f"slides must be at least 3 per class, got {self.slides}"),
        ]
        for bad, message in problems:
            if bad:
                raise UsageError(f"cohort: {message}")


@dataclass
class Signal:
    """Where one signal of a slide sits: the patch rows, their coordinates and region ids."""

    index: np.ndarray  # (k,) rows of the bag
    coords: np.ndarray  # (k, 2) level-0 x, y
    region: np.ndarray  # (k,) id of the contiguous region of each patch (scattered: one per patch)


@dataclass
class SlideTruth:
    """One slide: its findings and where their needles are."""

    slide_id: str
    label: int  # class index
    attribute: int  # attribute value index
    split: str
    n_patches: int
    signals: dict[str, Signal] = field(default_factory=dict)  # "class", "attribute"

    def signal_mask(self, coords: np.ndarray, signal: str = "class") -> np.ndarray:
        """(M,) bool: which rows of a bag with ``coords`` (M, 2) carry ``signal`` (matched by coordinates)."""
        wanted = {tuple(c) for c in self.signals[signal].coords.tolist()}
        return np.array([tuple(c) in wanted for c in np.asarray(coords).tolist()], dtype=bool)


@dataclass
class Cohort:
    """A written known-truth cohort (what :func:`make_cohort` and :func:`read_cohort` return)."""

    root: Path
    spec: CohortSpec
    classes: list[str]  # label names (manifest ``label``, config ``data.classes``)
    class_phrases: list[str]
    attributes: list[str]
    attribute_phrases: list[str]
    slides: list[SlideTruth]

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def bags_dir(self) -> Path:
        return self.root / "bags"

    @property
    def truth_path(self) -> Path:
        return self.root / "truth.json"

    def split(self, name: str) -> list[SlideTruth]:
        return [s for s in self.slides if s.split == name]

    def slide(self, slide_id: str) -> SlideTruth:
        return next(s for s in self.slides if s.slide_id == slide_id)

    def read_caption(self, caption: str | None) -> tuple[int | None, int | None]:
        """(class index, attribute index) a caption names; None where it names none or several."""
        return _named(caption, self.class_phrases), _named(caption, self.attribute_phrases)

    def overrides(self) -> list[str]:
        """``--set`` overrides that point a config at this cohort."""
        return [f"data.manifest={self.manifest}", f"data.bags_dir={self.bags_dir}",
                f"data.classes=[{', '.join(self.classes)}]", f"model.feature_dim={self.spec.dim}"]


def _named(caption: str | None, phrases: Sequence[str]) -> int | None:
    text = " ".join((caption or "").lower().split())
    hits = [i for i, p in enumerate(phrases) if re.search(rf"\b{re.escape(p)}\b", text)]
    return hits[0] if len(hits) == 1 else None


def slug(phrase: str) -> str:
    """A label name from a phrase: "with mucin pools" -> "mucin_pools"."""
    return re.sub(r"^with_", "", re.sub(r"\W+", "_", phrase.lower()).strip("_"))


# --------------------------------------------------------------------------------------------
# Drawing


def grid_neighbours(i: int, n: int, cols: int) -> list[int]:
    """4-neighbours of patch ``i`` on the :func:`pathm3.bags.index_grid` layout of ``n`` patches."""
    out = [j for j in (i - cols, i + cols) if 0 <= j < n]
    out += [j for j in (i - 1, i + 1) if 0 <= j < n and j // cols == i // cols]
    return out


def grow_region(size: int, free: np.ndarray, cols: int, rng: np.random.Generator) -> list[int]:
    """A 4-connected set of up to ``size`` free patches grown from a random free patch (marked used)."""
    n = len(free)
    start = int(rng.choice(np.flatnonzero(free)))
    region, frontier = [start], set()
    free[start] = False
    while True:
        frontier.update(j for j in grid_neighbours(region[-1], n, cols) if free[j])
        frontier.discard(region[-1])
        if len(region) == size or not frontier:
            return region
        nxt = int(rng.choice(sorted(frontier)))
        frontier.discard(nxt)
        free[nxt] = False
        region.append(nxt)


def place(k: int, free: np.ndarray, spec: CohortSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(rows (k,), region ids (k,)) of ``k`` free patches laid out as ``spec.layout`` (marked used)."""
    if spec.layout == "scattered":
        rows = np.sort(rng.choice(np.flatnonzero(free), size=k, replace=False))
        free[rows] = False
        return rows, np.arange(k)
    cols = int(np.ceil(np.sqrt(len(free))))
    n_regions = min(spec.regions, k)
    sizes = [k // n_regions + (r < k % n_regions) for r in range(n_regions)]
    rows: list[int] = []
    ids: list[int] = []
    while sizes:  # a region stuck against used patches leaves its rest to a new region
        want = sizes.pop(0)
        region = grow_region(want, free, cols, rng)
        ids += [len(set(ids))] * len(region)
        rows += region
        if len(region) < want:
            sizes.insert(0, want - len(region))
    order = np.argsort(rows)
    return np.asarray(rows)[order], np.asarray(ids)[order]


def draw_bag(label: int, attribute: int, directions: np.ndarray, spec: CohortSpec,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(features (M, D) float32, coords (M, 2), {signal: (rows, region ids)}) of one slide."""
    m = int(rng.integers(spec.patches[0], spec.patches[1] + 1))
    x = rng.standard_normal((m, spec.dim), dtype=np.float32)  # (M, D)
    free = np.ones(m, dtype=bool)
    placed = {}
    for name, frac, d in (("class", spec.class_frac, directions[label]),
                          ("attribute", spec.attribute_frac, directions[spec.classes + attribute])):
        k = max(1, round(frac * m))
        rows, regions = place(k, free, spec, rng)
        x[rows] += spec.strength * d
        x -= spec.strength * d * k / m  # re-centre: the bag mean carries no signal
        placed[name] = (rows, regions)
    return x, index_grid(m, spec.patch_size), placed


def assign(spec: CohortSpec, rng: np.random.Generator) -> list[tuple[int, int, str]]:
    """(class, attribute, split) per slide: classes in turn, attributes balanced within each class
    (so independent of it), splits stratified by class."""
    labels = np.arange(spec.slides) % spec.classes
    attributes = np.zeros(spec.slides, dtype=int)
    splits = np.empty(spec.slides, dtype=object)
    for c in range(spec.classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        attributes[members] = rng.permutation(np.arange(len(members)) % spec.attributes)
        n_train = round(spec.splits[0] * len(members))
        n_val = max(1, round(spec.splits[1] * len(members)))
        splits[members] = ["train"] * n_train + ["val"] * n_val + ["test"] * (len(members) - n_train - n_val)
    return [(int(y), int(a), str(s)) for y, a, s in zip(labels, attributes, splits)]


def make_cohort(output: str | os.PathLike, spec: CohortSpec = CohortSpec(), reuse: bool = True) -> Cohort:
    """Write a cohort under ``output`` (``bags/``, ``manifest.csv``, ``truth.json``) and describe it.
    With ``reuse``, a cohort already there with the same spec is read instead of redrawn."""
    from pathm3.synthetic import class_directions, write_synthetic_bag

    spec.check()
    root = Path(output)
    if reuse and (root / "truth.json").is_file():
        found = read_cohort(root)
        if found.spec == spec and all((found.bags_dir / f"{s.slide_id}.h5").is_file() for s in found.slides):
            return found
    rng = np.random.default_rng(spec.seed)
    directions = class_directions(spec.dim, spec.classes + spec.attributes).numpy()  # (C + A, D)
    cohort = Cohort(root, spec, [slug(p) for p in CLASS_PHRASES[:spec.classes]], list(CLASS_PHRASES[:spec.classes]),
                    [slug(p) for p in ATTRIBUTE_PHRASES[:spec.attributes]],
                    list(ATTRIBUTE_PHRASES[:spec.attributes]), [])
    rows = []
    for i, (label, attribute, split) in enumerate(assign(spec, rng)):
        sid = f"known-{i:04d}"
        x, coords, placed = draw_bag(label, attribute, directions, spec, rng)
        write_synthetic_bag(cohort.bags_dir / f"{sid}.h5", x, coords, sid, spec.patch_size)
        signals = {name: Signal(r, coords[r], ids) for name, (r, ids) in placed.items()}
        cohort.slides.append(SlideTruth(sid, label, attribute, split, len(x), signals))
        rows.append({"slide_id": sid, "label": cohort.classes[label], "split": split,
                     "caption": f"{cohort.class_phrases[label]} {cohort.attribute_phrases[attribute]}"})
    write_manifest(rows, cohort.manifest)
    write_text(cohort.truth_path, json.dumps(truth_record(cohort), indent=1))
    return cohort


def truth_record(cohort: Cohort) -> dict:
    """The JSON of ``truth.json``."""
    slides = {s.slide_id: {"class": cohort.classes[s.label], "attribute": cohort.attributes[s.attribute],
                           "split": s.split, "n_patches": s.n_patches,
                           "signals": {k: {"coords": v.coords.tolist(), "index": v.index.tolist(),
                                           "region": v.region.tolist()} for k, v in s.signals.items()}}
              for s in cohort.slides}
    return {"version": TRUTH_VERSION, "spec": asdict(cohort.spec), "classes": cohort.classes,
            "class_phrases": cohort.class_phrases, "attributes": cohort.attributes,
            "attribute_phrases": cohort.attribute_phrases,
            "directions": "pathm3.synthetic.class_directions(dim, classes + attributes): classes first",
            "slides": slides}


def read_cohort(root: str | os.PathLike) -> Cohort:
    """The description of a cohort written by :func:`make_cohort`, from its ``truth.json``."""
    root = Path(root)
    path = root / "truth.json" if root.is_dir() else root
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        spec = CohortSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw["spec"].items()})
        slides = [SlideTruth(sid, raw["classes"].index(s["class"]), raw["attributes"].index(s["attribute"]),
                             s["split"], s["n_patches"],
                             {k: Signal(np.asarray(v["index"], dtype=np.int64),
                                        np.asarray(v["coords"], dtype=np.int64).reshape(-1, 2),
                                        np.asarray(v["region"], dtype=np.int64)) for k, v in s["signals"].items()})
                  for sid, s in raw["slides"].items()]
    except FileNotFoundError:
        raise DataError(f"{path}: truth.json not found (write a cohort with python -m pathm3.cohorts)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a cohort truth file ({exc})") from None
    return Cohort(path.parent, spec, raw["classes"], raw["class_phrases"], raw["attributes"],
                  raw["attribute_phrases"], slides)


# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m pathm3.cohorts", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="folder for bags/, manifest.csv and truth.json")
    p.add_argument("--classes", type=number(int, 2, len(CLASS_PHRASES)), default=3, help="number of classes (default 3)")
    p.add_argument("--attributes", type=number(int, 1, len(ATTRIBUTE_PHRASES)), default=2,
                   help="number of attribute values, independent of the class (default 2)")
    p.add_argument("--slides", type=number(int, 6), default=180, help="number of slides (default 180)")
    p.add_argument("--patches", type=number(int, 2), nargs=2, default=[200, 400], metavar=("LOW", "HIGH"),
                   help="bag sizes, uniform in [LOW, HIGH] (default 200 400)")
    p.add_argument("--dim", type=number(int, 4), default=64, help="feature width (default 64)")
    p.add_argument("--class-frac", type=number(float, 0, 0.5, low_open=True), default=0.02,
                   help="share of each bag's patches carrying the class (default 0.02)")
    p.add_argument("--attribute-frac", type=number(float, 0, 0.5, low_open=True), default=0.02,
                   help="share of each bag's patches carrying the attribute (default 0.02)")
    p.add_argument("--layout", choices=("scattered", "regions"), default="scattered",
                   help="needles scattered over the bag, or contiguous regions on the coordinate grid")
    p.add_argument("--regions", type=number(int, 1), default=2, help="regions per signal with --layout regions")
    p.add_argument("--strength", type=number(float, 0, low_open=True), default=5.0, help="norm of a needle (default 5)")
    p.add_argument("--seed", type=number(int, 0), default=0, help="cohort seed")
    add_debug_flag(p)
    args = p.parse_args(argv)
    spec = CohortSpec(args.classes, args.attributes, args.slides, tuple(args.patches), args.dim, args.class_frac,
                      args.attribute_frac, args.layout, args.regions, args.strength, args.seed)
    cohort = make_cohort(args.output, spec, reuse=False)
    print(f"{len(cohort.slides)} slides ({', '.join(cohort.classes)} x {', '.join(cohort.attributes)}), "
          f"{spec.layout} needles -> {cohort.manifest} and {cohort.truth_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
