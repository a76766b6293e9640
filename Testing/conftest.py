"""Shared test fixtures. The real benchmark data lives in ../shared/data beside the checkout; tests
that need it skip with a clear message when it is absent (a user's clone has no such folder)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for sub in ("SemiSegLib", "SemiSegTrainer"):  # run from a plain checkout too
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

SHARED_DATA = Path(os.environ.get("SEMISEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def private_preprocessing_cache(tmp_path_factory):
    """Planned runs cache preprocessed arrays; the tests (and the trainer processes they start, which
    inherit the environment) use a throw-away folder, never the user's ~/.cache/semiseg."""
    old = os.environ.get("SEMISEG_CACHE")
    os.environ["SEMISEG_CACHE"] = str(tmp_path_factory.mktemp("semiseg_cache"))
    yield
    if old is None:
        os.environ.pop("SEMISEG_CACHE", None)
    else:
        os.environ["SEMISEG_CACHE"] = old
ACDC = SHARED_DATA / "ACDC"
LA = SHARED_DATA / "LA"


def need(path: Path, what: str):
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (the real benchmark data is only in ../shared/data)")
    return path


@pytest.fixture
def acdc_root():
    return need(ACDC / "train_slices.list", "ACDC data").parent


@pytest.fixture
def la_root():
    return need(LA / "train.list", "LA data").parent
