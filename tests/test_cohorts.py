"""Known-truth cohorts: the truth file matches the bags, the needles sit where it says, regions are
contiguous, fractions and splits are right, and a 10k-patch bag works."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest

from pathm3.bags import read_bag
from pathm3.cohorts import CohortSpec, main, make_cohort, read_cohort
from pathm3.errors import run_cli
from pathm3.synthetic import class_directions

SMALL = CohortSpec(slides=30, patches=(100, 300), dim=16)


@pytest.fixture(scope="module")
def scattered(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("scattered"), SMALL)


@pytest.fixture(scope="module")
def regions(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("regions"), CohortSpec(slides=30, patches=(100, 300), dim=16,
                                                                      layout="regions", regions=3, class_frac=0.05))


def projections(cohort, slide):
    """(bag, (M, C + A) projections of the bag on the class and attribute directions)."""
    bag = read_bag(cohort.bags_dir / f"{slide.slide_id}.h5")
    d = class_directions(cohort.spec.dim, cohort.spec.classes + cohort.spec.attributes).numpy()
    return bag, bag.features @ d.T


def test_default_cohort_is_the_issues(tmp_path):
    assert run_cli(main, ["--output", str(tmp_path)]) == 0
    cohort = read_cohort(tmp_path)
    spec = cohort.spec
    assert (spec.classes, spec.attributes, spec.slides, spec.patches, spec.dim) == (3, 2, 180, (200, 400), 64)
    assert (spec.class_frac, spec.attribute_frac) == (0.02, 0.02)
    with open(cohort.manifest) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide_id", "label", "caption", "split"] and len(rows) == 180
    assert Counter(r["split"] for r in rows) == {"train": 108, "val": 36, "test": 36}
    for r, s in zip(rows, cohort.slides):
        assert r["label"] == cohort.classes[s.label]
        assert r["caption"] == f"{cohort.class_phrases[s.label]} {cohort.attribute_phrases[s.attribute]}"
        assert cohort.read_caption(r["caption"]) == (s.label, s.attribute)
        assert 200 <= s.n_patches <= 400 and (cohort.bags_dir / f"{s.slide_id}.h5").is_file()


@pytest.mark.parametrize("layout", ["scattered", "regions"])
def test_truth_matches_the_bags_and_the_signal_sits_there(layout, scattered, regions):
    cohort = scattered if layout == "scattered" else regions
    c = cohort.spec.classes
    on_signal = []
    for s in cohort.slides:
        bag, proj = projections(cohort, s)
        assert len(bag) == s.n_patches
        for name, row in (("class", s.label), ("attribute", c + s.attribute)):
            sig = s.signals[name]
            np.testing.assert_array_equal(bag.coords[sig.index], sig.coords)
            assert s.signal_mask(bag.coords, name).sum() == len(sig.index)
            # the needle is on those patches and nowhere else, and on no other direction
            assert proj[sig.index, row].mean() > 2.5  # 5 + N(0, 1) noise, a few patches
            on_signal += proj[sig.index, row].tolist()
            assert proj[sig.index].mean(0).argmax() == row
            others = np.setdiff1d(np.arange(len(bag)), sig.index)
            assert abs(proj[others, row].mean()) < 0.5
        assert np.abs(proj.mean(0)).max() < 0.5  # re-centred: mean pooling sees nothing
    assert abs(np.mean(on_signal) - cohort.spec.strength) < 0.3


def test_fractions_and_disjoint_signals(scattered, regions):
    for cohort in (scattered, regions):
        spec = cohort.spec
        for s in cohort.slides:
            k_class, k_attr = (len(s.signals[n].index) for n in ("class", "attribute"))
            assert k_class == max(1, round(spec.class_frac * s.n_patches))
            assert k_attr == max(1, round(spec.attribute_frac * s.n_patches))
            assert not set(s.signals["class"].index) & set(s.signals["attribute"].index)


def test_regions_are_contiguous_on_the_grid(regions):
    step = regions.spec.patch_size
    sizes = []
    for s in regions.slides:
        for sig in s.signals.values():
            ids = np.unique(sig.region)
            assert len(ids) <= regions.spec.regions + 1  # a region stuck at an edge may continue in one more
            for r in ids:
                cells = {tuple(c) for c in sig.coords[sig.region == r].tolist()}
                sizes.append(len(cells))
                seen, todo = set(), [next(iter(cells))]
                while todo:  # flood fill over 4-neighbours
                    x, y = todo.pop()
                    if (x, y) in seen:
                        continue
                    seen.add((x, y))
                    todo += [n for n in ((x + step, y), (x - step, y), (x, y + step), (x, y - step)) if n in cells]
                assert seen == cells, f"{s.slide_id}: region {r} is not contiguous"
    assert max(sizes) >= 3  # real regions, not single patches


def test_scattered_needles_are_spread(scattered):
    spans = [np.ptp(s.signals["class"].index) / s.n_patches for s in scattered.slides]
    assert np.median(spans) > 0.5


def test_splits_are_disjoint_stratified_and_attributes_independent(scattered):
    ids = {split: {s.slide_id for s in scattered.split(split)} for split in ("train", "val", "test")}
    assert sum(map(len, ids.values())) == len(scattered.slides) == len(set().union(*ids.values()))
    for c in range(scattered.spec.classes):
        mine = [s for s in scattered.slides if s.label == c]
        assert Counter(s.split for s in mine) == {"train": 6, "val": 2, "test": 2}
        assert Counter(s.attribute for s in mine) == {0: 5, 1: 5}  # balanced within each class


def test_bag_of_10k_patches(tmp_path):
    spec = CohortSpec(classes=2, slides=6, patches=(10_000, 10_000), dim=8, layout="regions")
    cohort = make_cohort(tmp_path, spec)
    s = cohort.slides[0]
    bag, proj = projections(cohort, s)
    assert bag.features.shape == (10_000, 8) and len(s.signals["class"].index) == 200
    assert abs(proj[s.signals["class"].index, s.label].mean() - 5) < 0.3


def test_truth_round_trips_and_a_matching_cohort_is_reused(tmp_path, scattered):
    again = read_cohort(scattered.root)
    assert again.spec == scattered.spec and again.classes == scattered.classes
    for a, b in zip(again.slides, scattered.slides):
        assert (a.slide_id, a.label, a.attribute, a.split) == (b.slide_id, b.label, b.attribute, b.split)
        np.testing.assert_array_equal(a.signals["class"].coords, b.signals["class"].coords)
    stamp = scattered.manifest.stat().st_mtime_ns
    assert make_cohort(scattered.root, SMALL).spec == SMALL
    assert scattered.manifest.stat().st_mtime_ns == stamp  # read, not redrawn


def test_captions_name_findings(scattered):
    assert scattered.read_caption("tubular adenocarcinoma with necrosis") == (0, 1)
    assert scattered.read_caption("tubular adenocarcinoma") == (0, None)
    assert scattered.read_caption("tubular adenocarcinoma papillary adenocarcinoma with necrosis") == (None, 1)
    assert scattered.read_caption("") == (None, None) and scattered.read_caption(None) == (None, None)


@pytest.mark.parametrize("args", [["--patches", "10", "5"], ["--classes", "9"], ["--class-frac", "0"],
                                  ["--dim", "4"]])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args):
    assert run_cli(main, ["--output", str(tmp_path / "c"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()
