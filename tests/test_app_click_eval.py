"""experiments/app_click_eval.py: the plugin-style annotator on whole volumes through the real app (no --conf)."""

import json
import shutil
import sys

import numpy as np

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "experiments"))
import app_click_eval  # noqa: E402


def test_each_connected_lesion_is_its_own_target():
    label = np.zeros((20, 20, 20), np.uint8)
    label[2:5, 2:5, 2:5] = 1
    label[10:14, 10:14, 10:14] = 1
    label[15:18, 2:4, 2:4] = 2  # another structure: not a lesion of label 1
    lesions = app_click_eval.lesions_of(label, 1)
    assert sorted(int(m.sum()) for m in lesions) == [27, 64]
    assert len(app_click_eval.lesions_of(label, None)) == 3


def test_real_ct_lesion_through_the_app_as_the_plugin_clicks(tmp_path, real_data_dir):
    cases = tmp_path / "cases"
    cases.mkdir()
    for kind in ("image", "label"):
        shutil.copy(real_data_dir / f"lung1crop_{kind}.nrrd", cases / f"lung1crop_{kind}.nrrd")
    out = tmp_path / "result.json"
    app_click_eval.main(["--dataset_dir", str(cases), "--clicks", "3", "--output", str(out)])
    (record,) = json.loads(out.read_text())["lesions"]
    assert record["case"] == "lung1crop" and record["bin"] == "10-30mm"
    assert len(record["dice"]) == 3
    # the shipped model on this nodule: about 0.8 (docs/experiments.md); an untrained network stays near 0
    assert max(record["dice"]) >= 0.6
