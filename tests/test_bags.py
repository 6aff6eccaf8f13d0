"""The HDF5 bag format: our round trip, CLAM and TRIDENT bags, every rejection, atomic writes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pathm3 import bags
from pathm3.bags import inspect_bag, is_complete_bag, read_bag, write_bag
from pathm3.errors import DataError


def _arrays(n=37, d=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 50_000, size=(n, 2))


def test_round_trip_float32_is_exact_with_all_attributes(tmp_path):
    feats, coords = _arrays()
    path = write_bag(
        tmp_path / "s1.h5", feats, coords, dtype="float32",
        coords_attrs={"patch_size": 224, "patch_size_level0": 448, "level0_magnification": 40,
                      "target_magnification": 20, "level0_width": 90_000, "level0_height": 70_000,
                      "name": "s1"},
        features_attrs={"encoder": "tiny-vit", "name": "s1"},
        file_attrs={"mpp": 0.25, "slide_path": "/data/s1.svs"},
    )
    bag = read_bag(path)
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.features.dtype == np.float32 and bag.coords.dtype == np.int64
    assert bag.attrs["patch_size_level0"] == 448 and bag.attrs["encoder"] == "tiny-vit"
    assert bag.attrs["mpp"] == 0.25 and bag.attrs["slide_path"] == "/data/s1.svs"
    assert bag.attrs["format_version"] == bags.FORMAT_VERSION
    assert bag.slide_id == "s1" and len(bag) == 37


def test_default_is_float16_chunked_along_n(tmp_path):
    feats, coords = _arrays(n=3000, d=16)
    path = write_bag(tmp_path / "s.h5", feats, coords)
    with h5py.File(path) as f:
        assert f["features"].dtype == np.float16
        assert f["features"].chunks == (bags.CHUNK_ROWS, 16)
        assert f["coords"].dtype == np.int64
    np.testing.assert_array_equal(read_bag(path).features, feats.astype(np.float16))
    info = inspect_bag(path)
    assert (info.n_patches, info.feature_dim, info.dtype) == (3000, 16, "float16")


def test_reads_clam_bag_without_attributes(tmp_path):
    feats, coords = _arrays(n=10, d=1024)
    path = tmp_path / "clam_slide.h5"
    with h5py.File(path, "w") as f:  # CLAM's extract_features_fp.py layout
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords)
    bag = read_bag(path)
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.slide_id == "clam_slide"


def test_reads_trident_bag_with_its_attributes(tmp_path):
    feats, coords = _arrays(n=12, d=1536)
    path = tmp_path / "TCGA-XX.h5"
    with h5py.File(path, "w") as f:  # TRIDENT's features_<encoder>/ layout
        fd = f.create_dataset("features", data=feats)
        fd.attrs.update({"encoder": "uni_v2", "name": "TCGA-XX", "savetodir": "/job/features_uni_v2"})
        cd = f.create_dataset("coords", data=coords)
        cd.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                         "target_magnification": 20, "overlap": 0, "name": "TCGA-XX",
                         "savetodir": "/job"})
    bag = read_bag(path)
    np.testing.assert_array_equal(bag.features, feats)
    assert bag.attrs["encoder"] == "uni_v2"
    assert bag.attrs["patch_size_level0"] == 512 and bag.attrs["target_magnification"] == 20
    assert bag.slide_id == "TCGA-XX"


def test_leading_singleton_batch_dimension_is_accepted(tmp_path):
    feats, coords = _arrays(n=5, d=8)
    path = tmp_path / "b.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats[None])
        f.create_dataset("coords", data=coords[None])
    assert read_bag(path).features.shape == (5, 8)
    assert inspect_bag(path).n_patches == 5


def _text(path, text):
    path.write_text(text)
    return path


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _text(p, "slide_id,label\n"), "not an HDF5 file"),
        (lambda p: _h5(p, coords=np.zeros((3, 2))), "missing dataset(s) features"),
        (lambda p: _h5(p, features=np.zeros((3, 4), np.float32)), "missing dataset(s) coords"),
        (lambda p: _h5(p, features=np.zeros((3, 4), np.float32), coords=np.zeros((4, 2))),
         "features has 3 rows but coords has 4"),
        (lambda p: _h5(p, features=np.zeros((3,), np.float32), coords=np.zeros((3, 2))),
         "features must be (N, D)"),
        (lambda p: _h5(p, features=np.array([[0.0, np.nan], [1, 2]], np.float32), coords=np.zeros((2, 2))),
         "1 patch feature row(s) hold NaN or inf"),
        (lambda p: _h5(p, features=np.array([[np.inf, 0], [1, -np.inf]], np.float16), coords=np.zeros((2, 2))),
         "2 patch feature row(s) hold NaN or inf"),
        (lambda p: _h5(p, features=np.zeros((0, 4), np.float32), coords=np.zeros((0, 2))),
         "bag has no patches"),
    ],
)
def test_rejections_name_the_file_and_the_problem(tmp_path, make, message):
    path = make(tmp_path / "bad.h5")
    with pytest.raises(DataError) as err:
        read_bag(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_bag_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="bag not found"):
        read_bag(tmp_path / "nope.h5")
    assert not is_complete_bag(tmp_path / "nope.h5")


def test_writer_refuses_mismatched_arrays_and_writes_nothing(tmp_path):
    with pytest.raises(DataError, match="features has 4 rows but coords has 3"):
        write_bag(tmp_path / "x.h5", np.zeros((4, 2), np.float32), np.zeros((3, 2)))
    assert list(tmp_path.iterdir()) == []


def test_crash_during_write_leaves_old_file_untouched_and_no_temp(tmp_path, monkeypatch):
    feats, coords = _arrays(n=8, d=4)
    path = write_bag(tmp_path / "s.h5", feats, coords, dtype="float32")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(OSError, match="disk full"):
        write_bag(path, feats * 2, coords, dtype="float32")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_killed_writer_never_leaves_a_complete_looking_file(tmp_path):
    """SIGKILL a process in the middle of writing a large bag: the final name never appears."""
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "big.h5"
    code = (
        "import numpy as np, sys\n"
        "from pathm3.bags import write_bag\n"
        "f = np.ones((400_000, 256), np.float32)\n"
        "print('ready', flush=True)\n"
        f"write_bag({str(target)!r}, f, np.zeros((400_000, 2)), dtype='float32')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 30
    while not any(tmp_path.glob(".big.h5.tmp-*")) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(tmp_path.glob(".big.h5.tmp-*")), "the writer should have been killed mid-write"
    assert not target.exists()
