"""Where a bag's features came from, and the lock that keeps a model to features like the ones it
was trained on.

A bag's provenance is the part of its extraction that changes what the features mean: encoder,
encoder weights (the folder's name), magnification or mpp, patch size, feature width and dtype,
and the bag format version. A checkpoint stores the provenance of its training bags;
``pathm3-eval``, ``pathm3-predict`` and ``pathm3-heatmap`` refuse bags whose provenance differs
(``--allow-foreign-bags`` overrides), and training refuses a cohort that mixes provenances.
Bags without our attributes (written by CLAM or TRIDENT) cannot be checked: they are accepted
with one warning when their width matches. Published numbers go wrong exactly this way when
features come from another pipeline.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from pathm3.bags import inspect_bag
from pathm3.errors import DataError

KEYS = ("encoder", "weights", "magnification", "mpp", "patch_size", "feature_dim", "dtype", "format_version")


def bag_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance of one bag, or None for a bag without our attributes (CLAM, TRIDENT)."""
    info = inspect_bag(path)
    attrs = info.attrs
    if "format_version" not in attrs:
        return None
    try:
        settings = json.loads(attrs.get("extraction_json") or "{}")
    except json.JSONDecodeError:
        settings = {}
    weights = settings.get("weights")
    return {"encoder": attrs.get("encoder"), "weights": Path(weights).name if weights else None,
            "magnification": settings.get("magnification"), "mpp": settings.get("mpp"),
            "patch_size": attrs.get("patch_size"), "feature_dim": info.feature_dim, "dtype": info.dtype,
            "format_version": attrs.get("format_version")}


def describe(provenance: dict[str, Any]) -> str:
    return ", ".join(f"{k}={provenance[k]}" for k in KEYS if provenance.get(k) is not None)


def differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    """``encoder tiny-vit vs eva-vit-g, mpp 0.5 vs 0.25``: the keys where two provenances differ."""
    return ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in KEYS if a.get(k) != b.get(k))


def cohort_provenance(paths: Sequence[str | os.PathLike]) -> dict[str, Any] | None:
    """The one provenance of a training cohort (None when no bag has our attributes); a cohort
    whose bags were extracted differently is refused, naming two bags and what differs."""
    seen: tuple[Path, dict] | None = None
    for path in paths:
        prov = bag_provenance(path)
        if prov is None:
            continue
        if seen is None:
            seen = (Path(path), prov)
        elif prov != seen[1]:
            raise DataError(f"{path}: extracted differently from {seen[0].name} ({differences(prov, seen[1])}); "
                            "a cohort's bags must come from one extraction (re-extract them with one setting)")
    return None if seen is None else seen[1]


def check_provenance(paths: Sequence[str | os.PathLike], trained_on: dict[str, Any] | None,
                     allow_foreign: bool = False) -> None:
    """Refuse bags extracted differently from the checkpoint's training bags (``allow_foreign``:
    warn instead); warn once about bags that carry no provenance."""
    if trained_on is None:
        return
    unknown = []
    for path in paths:
        prov = bag_provenance(path)
        if prov is None:
            unknown.append(Path(path).name)
        elif prov != trained_on:
            message = f"{path}: extracted differently from the model's training bags ({differences(prov, trained_on)})"
            if not allow_foreign:
                raise DataError(f"{message}; re-extract with the training settings, or pass --allow-foreign-bags "
                                "to use it anyway")
            print(f"warning: {message}; used because of --allow-foreign-bags", file=sys.stderr)
    if unknown:
        print(f"warning: {len(unknown)} bag(s) carry no extraction attributes (e.g. {unknown[0]}, written by CLAM "
              "or TRIDENT?); they are used because their feature width matches, but their provenance is unchecked",
              file=sys.stderr)
