"""``python -m monai.bundle run inferring`` end to end on a real NRRD with a tiny random-init model file.

Each command line spends ~10 s importing MONAI, so only two go through the bundle CLI (a success and a failure,
started together); the other failure paths call the same entry point, ``run_inference``, in-process.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage
from scripts.inference import run_inference
from scripts.model_file import Preprocessing, save_model_file
from scripts.modeling import build_sgp_sam

REPO_ROOT = Path(__file__).resolve().parents[1]

CONFIG = "bundle/configs/inference.json"


def _launch(args, out_dir):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inferring", "--config_file", CONFIG]
    cmd += [*args, "--output_dir", str(out_dir)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")  # 2 shared cores, 2 processes
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_data_dir):
    tmp = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    ckpt = tmp / "tiny.pt"
    save_model_file(build_sgp_sam("tiny"), Preprocessing(roi_size=64), ckpt)  # the network comes from the file
    four_d = tmp / "four_d.nii.gz"
    nib.Nifti1Image(np.random.default_rng(0).random((16, 18, 8, 2), dtype=np.float32), np.eye(4)).to_filename(four_d)
    image = str(real_data_dir / "breast1_image.nrrd")
    ok_clicks = json.dumps({"foreground": [[22, 60, 10]], "background": [[5, 5, 5]]})
    cases = {
        "ok": ["--image", image, "--clicks", ok_clicks, "--ckpt_path", str(ckpt)],
        "click_out_of_range": ["--image", image, "--clicks", '{"foreground": [[45, 0, 0]]}', "--ckpt_path", str(ckpt)],
    }
    procs = {name: (_launch(args, tmp / name), tmp / name) for name, args in cases.items()}
    results = {}
    for name, (proc, out_dir) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = (proc.returncode, stdout, stderr, out_dir)
    return results, image, ckpt, four_d


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_cli_writes_mask_in_input_geometry(runs):
    results, image, _, _ = runs
    rc, stdout, stderr, out_dir = results["ok"]
    assert rc == 0, stderr[-2000:]
    out = out_dir / "breast1_image_seg.nii.gz"
    assert out.is_file() and sorted(p.name for p in out_dir.iterdir()) == [out.name]  # no temporary leftovers
    ref = LoadImage(image_only=True, ensure_channel_first=True)(image)
    seg = nib.load(str(out))
    assert seg.shape == tuple(ref.shape[1:]) == (45, 120, 21)
    np.testing.assert_allclose(seg.affine, np.asarray(ref.affine), atol=1e-4)
    data = np.asarray(seg.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}
    # MONAI reads it back with the same geometry as the input
    again = LoadImage(image_only=True, ensure_channel_first=True)(str(out))
    np.testing.assert_allclose(np.asarray(again.affine), np.asarray(ref.affine), atol=1e-4)


def test_cli_bad_click_fails_cleanly(runs):
    results = runs[0]
    rc, _, stderr, out_dir = results["click_out_of_range"]
    assert rc != 0
    errors = _error_lines(stderr)
    assert len(errors) == 1 and "outside the image" in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not out_dir.exists() or not any(out_dir.iterdir())


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_image", "image not found"),
        ("four_d_without_channel", "image_channel"),
        ("missing_checkpoint", "checkpoint not found"),
        ("not_a_model_file", "neither an SGP-SAM model file"),
        ("no_model_file", "no model file"),
        ("bad_clicks_json", "valid JSON"),
        ("no_clicks", "no clicks"),
    ],
)
def test_bad_input_one_line_error_no_output(runs, tmp_path, capsys, case, message):
    _, image, ckpt, four_d = runs
    clicks = {"foreground": [[22, 60, 10]], "background": []}
    kwargs = dict(image=image, clicks=clicks, ckpt_path=str(ckpt))
    if case == "missing_image":
        kwargs["image"] = str(tmp_path / "nope.nrrd")
    elif case == "four_d_without_channel":
        kwargs.update(image=str(four_d), clicks={"foreground": [[3, 3, 3]]})
    elif case == "missing_checkpoint":
        kwargs["ckpt_path"] = str(tmp_path / "absent.pt")
    elif case == "not_a_model_file":
        torch.save(build_sgp_sam("tiny").state_dict(), tmp_path / "weights.pt")  # weights without a description
        kwargs["ckpt_path"] = str(tmp_path / "weights.pt")
    elif case == "no_model_file":
        kwargs["ckpt_path"] = "null"
    elif case == "bad_clicks_json":
        kwargs["clicks"] = "{foreground: [[1, 2, 3]]"
    elif case == "no_clicks":
        kwargs["clicks"] = {"foreground": [], "background": []}
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        run_inference(output_dir=str(out_dir), **kwargs)
    assert exc.value.code == 1
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and message in errors[0], errors
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_batch_mode_writes_good_cases_and_reports_bad_ones(runs, tmp_path, capsys):
    _, image, ckpt, _ = runs
    batch = tmp_path / "images"
    batch.mkdir()
    shutil.copy(image, batch / "a.nrrd")
    shutil.copy(image, batch / "b.nrrd")
    clicks = {"a.nrrd": {"foreground": [[22, 60, 10]]}, "b.nrrd": {"foreground": [[22, 600, 10]]}}
    (tmp_path / "clicks.json").write_text(json.dumps(clicks))
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        run_inference(
            str(ckpt),
            output_dir=str(out_dir),
            batch_dir=str(batch),
            batch_clicks=str(tmp_path / "clicks.json"),
        )
    assert exc.value.code == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["a_seg.nii.gz"]
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith("error: b.nrrd:") and "outside the image" in errors[0]
