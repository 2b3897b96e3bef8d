"""Test setup: the bundle's ``scripts`` package and the repo root importable; the vendored test data (tests/data)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"
for path in (str(REPO_ROOT), str(BUNDLE_ROOT)):  # bundle first: its package is `scripts`
    if path not in sys.path:
        sys.path.insert(0, path)

TEST_DATA = Path(__file__).resolve().parent / "data"  # real NRRD cases and the SAM-Med3D key list (README there)
SAM_MED3D_KEYS = TEST_DATA / "sam_med3d_state_dict.txt"
REFERENCE_DIR = TEST_DATA  # older name, still imported by test_model.py


@pytest.fixture(scope="module")
def one_thread():
    """The CI box has 2 shared cores: one intra-op thread avoids oversubscription (4x faster decoder rounds)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The vendored pyradiomics cases: ``{brain1,brain2,breast1,lung1crop}_{image,label}.nrrd`` (three MR, one CT)."""
    return TEST_DATA


def bundle_env() -> dict:
    """Environment for bundle subprocesses: the bundle's ``scripts`` importable, one thread, CPU only (gloo/CPU
    paths even on a GPU machine)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BUNDLE_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_bundle_cli(*args: str, timeout: float = 300) -> tuple[int, str]:
    """``python -m monai.bundle ARGS`` from the repo root, as a user runs it; (exit code, stdout + stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=REPO_ROOT,
        env=bundle_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small embedded-generator dataset (4 train, 2 validation, 2 test cases) shared by the workflow tests."""
    from scripts.data.synthetic_data import generate_dataset

    root = tmp_path_factory.getbasetemp() / "synthetic_4_2_2"
    generate_dataset(root, num_train=4, num_val=2, num_test=2)
    return root
