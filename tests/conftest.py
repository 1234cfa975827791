"""Shared test helpers: project paths, the ../shared fixtures, small params."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"

# Tests run side by side on 2 cores: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def fixtures_dir() -> Path:
    if not (FIXTURES / "coco2017-tiny50").is_dir():
        pytest.skip(f"real COCO fixtures not found at {FIXTURES} (../shared beside the repo)")
    return FIXTURES
