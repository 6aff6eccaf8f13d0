"""Shared fixtures: the real test data beside the repo, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (or $PATHM3_TEST_DATA): real slides and the PatchGastric captions."""
    root = Path(os.environ.get("PATHM3_TEST_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"real test data not found at {root} (set PATHM3_TEST_DATA)")
    return root


@pytest.fixture(scope="session")
def slides_dir(shared_data: Path) -> Path:
    return shared_data / "slides"
