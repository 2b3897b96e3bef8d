"""Test setup: the bundle's ``scripts`` package and the repo root importable; location of the shared real data."""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"
for path in (str(REPO_ROOT), str(BUNDLE_ROOT)):  # bundle first: its package is `scripts`
    if path not in sys.path:
        sys.path.insert(0, path)

os.environ.setdefault("SGPSAM_SHARED_DATA", str(REPO_ROOT.parent / "shared" / "data" / "real"))
REAL_DATA = Path(os.environ["SGPSAM_SHARED_DATA"])
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not (REAL_DATA / "brain1_image.nrrd").exists():
        pytest.fail(f"real test cases missing under {REAL_DATA} (set SGPSAM_SHARED_DATA)")
    return REAL_DATA
