"""``evaluate.json`` on a folder of image/label pairs without a dataset.json (scripts/data/folders.py): the layouts,
and the bundle CLI on the vendored real NRRD cases with the shipped default model file."""

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from scripts.data.folders import dataset_source, find_pairs, folder_datalist
from scripts.data.transforms import load_datalist

from conftest import BUNDLE_ROOT, run_bundle_cli

DEFAULT_MODEL = BUNDLE_ROOT / "models" / "pretrained" / "sgp_sam_default.pt"
CONFIGS = "['bundle/configs/train.json','bundle/configs/evaluate.json']"


def _nifti(path, value=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), value, np.uint8), np.eye(4)), str(path))


def test_layouts_are_paired_by_case_name(tmp_path, caplog):
    suffixed = tmp_path / "suffixed"
    _nifti(suffixed / "a_image.nii.gz")
    _nifti(suffixed / "a_label.nii")  # formats may differ within a pair
    _nifti(suffixed / "b_image.nii.gz")  # no label: left out, with a warning
    (suffixed / "notes.txt").write_text("not an image")
    assert [(p["case"], p["label"].endswith("a_label.nii")) for p in find_pairs(suffixed)] == [("a", True)]
    assert "no partner" in caplog.text and "b" in caplog.text

    msd = tmp_path / "msd"
    _nifti(msd / "imagesTr" / "liver_3_0000.nii.gz")  # nnU-Net channel suffix
    _nifti(msd / "labelsTr" / "liver_3.nii.gz")
    _nifti(msd / "imagesTs" / "liver_9.nii.gz")
    _nifti(msd / "labelsTs" / "liver_9.nii.gz")
    assert [p["case"] for p in find_pairs(msd)] == ["liver_3", "liver_9"]

    plain = tmp_path / "plain"
    _nifti(plain / "images" / "x.nii.gz")
    _nifti(plain / "labels" / "x.nii.gz")
    assert load_datalist(plain, "test") == find_pairs(plain) and dataset_source(plain) == str(plain)
    with pytest.raises(KeyError, match="gives the 'test' list only"):
        load_datalist(plain, "training")


def test_a_folder_with_images_but_no_pairs_is_not_overwritten(tmp_path):
    _nifti(tmp_path / "scan.nii.gz")
    with pytest.raises(FileNotFoundError, match="no dataset.json and no image/label pairs"):
        dataset_source(tmp_path)
    with pytest.raises(FileNotFoundError, match="layouts: <case>_image"):
        folder_datalist(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]  # no synthetic dataset generated into it


def test_cli_evaluates_a_folder_of_real_nrrd_pairs(tmp_path, real_data_dir):
    data = tmp_path / "cases"
    shutil.copytree(real_data_dir, data)  # the README and key list beside the pairs are not images: ignored
    before = sorted(p.name for p in data.iterdir())
    out = tmp_path / "eval"
    code, log = run_bundle_cli(
        "run", "evaluating", "--config_file", CONFIGS, "--dataset_dir", str(data), "--target_label", "1",
        "--ckpt_path", str(DEFAULT_MODEL), "--eval_output_dir", str(out), "--max_clicks", "3", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, log[-4000:]
    assert sorted(p.name for p in data.iterdir()) == before  # nothing written into the user's folder

    with open(out / "per_lesion.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["case"] for r in rows} == {"brain1", "brain2", "breast1", "lung1crop"}
    for row in rows:
        voxels, mm3, diameter = int(row["num_voxels"]), float(row["volume_mm3"]), float(row["equivalent_diameter_mm"])
        assert voxels > 0 and mm3 == pytest.approx(voxels * 1.5**3, rel=1e-3)  # the model file's 1.5 mm grid
        assert diameter == pytest.approx((6 * mm3 / np.pi) ** (1 / 3), rel=1e-3)
        assert row["size_bin"] == ("<10mm" if diameter < 10 else "10-30mm" if diameter <= 30 else ">30mm")
        assert 0.0 <= float(row["dice@1"]) <= 1.0 and len(row["dice_curve"].split()) == 3
    per_lesion = json.loads((out / "per_lesion.json").read_text())
    assert [(r["case"], r["lesion"]) for r in per_lesion] == [(r["case"], int(r["lesion"])) for r in rows]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == 4 and summary["num_lesions"] == len(rows)
    assert summary["crop_size"] == 64 and summary["spacing"] == 1.5  # the network and preprocessing of the file
    bins = {r["size_bin"] for r in rows}
    assert bins <= set(summary["metrics"]) and summary["metrics"]["overall"]["dice@1"]["n"] == len(rows)
