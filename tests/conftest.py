"""Shared test fixtures: the real MVTec sample lives in ../shared beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
MVTEC_REDUCED = SHARED / "data" / "mvtec_reduced"


@pytest.fixture(scope="session")
def mvtec_reduced() -> Path:
    """The real MVTec AD sample (hazelnut, transistor); CI provides ../shared beside the clone."""
    if not MVTEC_REDUCED.is_dir():
        pytest.fail(f"the real MVTec sample is missing: expected {MVTEC_REDUCED}")
    return MVTEC_REDUCED
