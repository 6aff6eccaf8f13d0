"""The manifest: limited annotation is allowed, every broken row is named."""

from __future__ import annotations

import numpy as np
import pytest

from pathm3.bags import write_bag
from pathm3.errors import DataError
from pathm3.manifest import read_manifest

CLASSES = ["benign", "tumour"]


@pytest.fixture
def bags_dir(tmp_path):
    d = tmp_path / "bags"
    for sid in ("a", "b", "c", "d"):
        write_bag(d / f"{sid}.h5", np.ones((2, 3), np.float32), np.zeros((2, 2)))
    return d


def _manifest(tmp_path, body):
    path = tmp_path / "manifest.csv"
    path.write_text("slide_id,label,caption,split\n" + body)
    return path


def test_reads_rows_with_missing_labels_and_captions(tmp_path, bags_dir):
    path = _manifest(tmp_path, 'a,tumour,"Tubular glands, well formed.",train\nb,,,train\nc,benign,,val\nd,,Some text,test\n')
    rows = read_manifest(path, bags_dir, CLASSES)
    assert [r.slide_id for r in rows] == ["a", "b", "c", "d"]
    assert [r.label for r in rows] == [1, None, 0, None]
    assert [r.caption for r in rows] == ["Tubular glands, well formed.", None, None, "Some text"]
    assert rows[0].bag_path == bags_dir / "a.h5" and rows[3].row == 5
    assert [r.slide_id for r in read_manifest(path, bags_dir, CLASSES, splits=["test"])] == ["d"]


@pytest.mark.parametrize(
    "body, message",
    [
        ("a,tumour,,train\nzz,benign,,train\n", "row 3 (zz): bag not found: "),
        ("a,tumour,,train\nb,carcinoma,,val\n", "row 3 (b): label 'carcinoma' is not in data.classes [benign, tumour]"),
        ("a,tumour,,training\n", "row 2 (a): split must be one of train, val, test, got 'training'"),
        ("a,tumour,,train\na,tumour,,val\n", "row 3 (a): slide_id repeats row 2"),
        (",tumour,,train\n", "row 2: empty slide_id"),
        ("", "manifest has no rows"),
    ],
)
def test_broken_rows_are_named(tmp_path, bags_dir, body, message):
    path = _manifest(tmp_path, body)
    with pytest.raises(DataError) as err:
        read_manifest(path, bags_dir, CLASSES)
    assert str(err.value).startswith(str(path))
    assert message in str(err.value)


def test_missing_columns_and_file(tmp_path, bags_dir):
    path = tmp_path / "m.csv"
    path.write_text("id,label\nx,benign\n")
    with pytest.raises(DataError, match="missing column.*slide_id, split"):
        read_manifest(path, bags_dir, CLASSES)
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "none.csv", bags_dir, CLASSES)
