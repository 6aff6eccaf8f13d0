"""The HDF5 bag format: one file per slide, written by extraction, read by training.

Layout of ``<slide_id>.h5``::

    features  (N, D) float16 (float32 on request), chunked along N
              attrs: encoder, name
    coords    (N, 2) int64, top-left x, y of each patch in level-0 pixels
              attrs: patch_size, patch_size_level0, level0_magnification,
                     target_magnification, level0_width, level0_height, name
    file attrs: mpp, slide_path, format_version (and any extra provenance)

The coords/features attribute names match TRIDENT's where they overlap, so bags written by
TRIDENT (and by CLAM, which writes no attributes) are read as they are. Writes are atomic: the
file is written under a temporary name in the same folder and renamed when complete, so a crash
never leaves a file that looks done.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from pathm3.errors import DataError
from pathm3.files import atomic_output

FORMAT_VERSION = 1
COORD_ATTRS = (
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "level0_width",
    "level0_height",
    "name",
)
FEATURE_ATTRS = ("encoder", "name")
CHUNK_ROWS = 1024


@dataclass
class Bag:
    """One slide's patch features and where the patches came from."""

    features: np.ndarray  # (N, D) float16 or float32
    coords: np.ndarray  # (N, 2) int64, level-0 x, y
    attrs: dict[str, Any] = field(default_factory=dict)  # merged provenance attributes
    path: Path | None = None

    @property
    def slide_id(self) -> str:
        if self.attrs.get("name"):
            return str(self.attrs["name"])
        return self.path.stem if self.path is not None else ""

    def __len__(self) -> int:
        return int(self.features.shape[0])


@dataclass
class BagInfo:
    """Shapes and attributes of a bag, read without loading the features."""

    path: Path
    n_patches: int
    feature_dim: int
    dtype: str
    attrs: dict[str, Any]


def write_bag(
    path: str | os.PathLike,
    features: np.ndarray,
    coords: np.ndarray,
    *,
    dtype: str = "float16",
    coords_attrs: Mapping[str, Any] | None = None,
    features_attrs: Mapping[str, Any] | None = None,
    file_attrs: Mapping[str, Any] | None = None,
    extra_datasets: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write a bag atomically and return its path.

    ``features`` (N, D) is stored as ``dtype`` (``float16`` or ``float32``); ``coords`` (N, 2)
    as int64. ``coords_attrs`` / ``features_attrs`` / ``file_attrs`` hold the provenance
    attributes of the module docstring; ``format_version`` is added. None values are skipped.
    ``extra_datasets`` are stored beside them (e.g. ``patch_names`` for patch-folder bags).
    """
    path = Path(path)
    if dtype not in ("float16", "float32"):
        raise ValueError(f"bag dtype must be float16 or float32, not {dtype!r}")
    features = np.asarray(features)
    coords = np.asarray(coords)
    _check_arrays(features, coords, path)
    n, d = features.shape
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            _set_attrs(f.attrs, file_attrs)
            feats = f.create_dataset(
                "features", data=features.astype(dtype), chunks=(min(n, CHUNK_ROWS), d)
            )
            _set_attrs(feats.attrs, features_attrs)
            crd = f.create_dataset("coords", data=coords.astype(np.int64))
            _set_attrs(crd.attrs, coords_attrs)
            for name, values in (extra_datasets or {}).items():
                values = np.asarray(values)
                if values.dtype.kind in "UO":
                    values = values.astype(h5py.string_dtype())
                f.create_dataset(name, data=values)
        with open(tmp, "rb") as fh:  # make the data durable before the rename publishes it
            os.fsync(fh.fileno())
    return path


def read_bag(path: str | os.PathLike, *, dtype: str | None = None, with_attrs: bool = True) -> Bag:
    """Read and validate a bag (ours, CLAM's or TRIDENT's).

    Raises :class:`~pathm3.errors.DataError` for a file that is not a bag, whose features and
    coords disagree on N, or whose features hold NaN/inf. ``dtype`` casts the features.
    ``with_attrs=False`` skips the attributes (``attrs`` is empty): a training loop reads each bag
    every epoch and needs only the arrays.
    """
    path = Path(path)
    with _open(path) as f:
        feats_ds, coords_ds = _datasets(f, path)
        features = feats_ds[()]
        coords = coords_ds[()]
        attrs = _collect_attrs(f, feats_ds, coords_ds) if with_attrs else {}
    features = _squeeze_leading(features)
    coords = _squeeze_leading(coords)
    _check_arrays(features, coords, path)
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(axis=1).sum())
        raise DataError(f"{path}: {bad} patch feature row(s) hold NaN or inf; re-extract this slide")
    if dtype is not None:
        features = features.astype(dtype)
    return Bag(features=features, coords=coords.astype(np.int64), attrs=attrs, path=path)


def inspect_bag(path: str | os.PathLike) -> BagInfo:
    """Shapes, dtype and attributes of a bag without reading the features into memory."""
    path = Path(path)
    with _open(path) as f:
        feats_ds, coords_ds = _datasets(f, path)
        fshape = _squeeze_shape(feats_ds.shape)
        _check_shapes(fshape, _squeeze_shape(coords_ds.shape), path)
        return BagInfo(
            path=path,
            n_patches=int(fshape[0]),
            feature_dim=int(fshape[1]),
            dtype=str(feats_ds.dtype),
            attrs=_collect_attrs(f, feats_ds, coords_ds),
        )


def index_grid(n: int, cell: int) -> np.ndarray:
    """(n, 2) int64 level-0 coords for patches whose position is unknown: patch i on a square
    grid of ``cell``-sized cells, row by row."""
    cols = int(np.ceil(np.sqrt(n)))
    idx = np.arange(n)
    return np.stack([(idx % cols) * cell, (idx // cols) * cell], axis=1).astype(np.int64)


def read_patch_names(path: str | os.PathLike) -> list[str] | None:
    """Source image names of a patch-folder bag (row order), or None for slide bags."""
    with _open(Path(path)) as f:
        if "patch_names" not in f:
            return None
        return [n.decode() if isinstance(n, bytes) else str(n) for n in f["patch_names"][()]]


def is_complete_bag(path: str | os.PathLike) -> bool:
    """True when ``path`` is a readable bag with matching features and coords."""
    try:
        inspect_bag(path)
    except DataError:
        return False
    return True


# --------------------------------------------------------------------------------------------


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise DataError(f"{path}: bag not found")
    try:
        return h5py.File(path, "r")
    except OSError:
        raise DataError(f"{path}: not an HDF5 file (a bag is written by pathm3-extract)") from None


def _datasets(f: h5py.File, path: Path) -> tuple[h5py.Dataset, h5py.Dataset]:
    missing = [k for k in ("features", "coords") if not isinstance(f.get(k), h5py.Dataset)]
    if missing:
        raise DataError(
            f"{path}: not a bag: missing dataset(s) {', '.join(missing)} "
            f"(expected 'features' (N, D) and 'coords' (N, 2))"
        )
    return f["features"], f["coords"]


def _squeeze_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    # Some pipelines store (1, N, D); accept it as (N, D).
    return tuple(shape[1:]) if len(shape) == 3 and shape[0] == 1 else tuple(shape)


def _squeeze_leading(a: np.ndarray) -> np.ndarray:
    return a.reshape(_squeeze_shape(a.shape))


def _check_shapes(fshape: tuple[int, ...], cshape: tuple[int, ...], path: Path) -> None:
    if len(fshape) != 2 or len(cshape) != 2 or cshape[1] != 2:
        raise DataError(
            f"{path}: not a bag: features must be (N, D) and coords (N, 2), got {fshape} and {cshape}"
        )
    if fshape[0] != cshape[0]:
        raise DataError(f"{path}: features has {fshape[0]} rows but coords has {cshape[0]}")
    if fshape[0] == 0:
        raise DataError(f"{path}: bag has no patches")


def _check_arrays(features: np.ndarray, coords: np.ndarray, path: Path) -> None:
    _check_shapes(features.shape, coords.shape, path)
    if not np.issubdtype(features.dtype, np.floating):
        raise DataError(f"{path}: features must be floating point, got {features.dtype}")


def _set_attrs(target: h5py.AttributeManager, attrs: Mapping[str, Any] | None) -> None:
    for key, value in (attrs or {}).items():
        if value is not None:
            target[key] = value


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _collect_attrs(f: h5py.File, feats: h5py.Dataset, coords: h5py.Dataset) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for source in (f.attrs, coords.attrs, feats.attrs):
        for key, value in source.items():
            if key == "name" and source is feats.attrs and "name" in attrs:
                continue  # coords' slide name wins over the features' one
            attrs[key] = _plain(value)
    return attrs
