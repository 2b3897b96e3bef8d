"""The threshold ceiling: 1 for a clean bright or dark lesion, low for one the image does not show."""

import numpy as np
import pytest
from experiments.lesion_visibility import dataset_threshold_ceiling, threshold_ceiling
from scripts.data.synthetic_data import generate_dataset


def _cube_case(contrast: float, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, noise, (24, 24, 24)).astype(np.float32)
    target = np.zeros(image.shape, dtype=bool)
    target[10:14, 9:13, 11:14] = True
    image[target] += contrast
    return image, target


@pytest.mark.parametrize("contrast", [3.0, -3.0])
def test_clean_lesion_of_either_polarity_reaches_one(contrast):
    image, target = _cube_case(contrast, noise=0.05)
    assert threshold_ceiling(image, target) == pytest.approx(1.0)


def test_invisible_lesion_scores_low():
    image, target = _cube_case(0.0, noise=1.0)
    assert threshold_ceiling(image, target) < 0.5


def test_empty_target_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        threshold_ceiling(np.zeros((8, 8, 8)), np.zeros((8, 8, 8), dtype=bool))


def test_dataset_summary_on_generated_cases(tmp_path):
    dataset = generate_dataset(tmp_path / "data", 0, 0, 2, seed=3, shape=(48, 48, 16))
    result = dataset_threshold_ceiling(str(dataset), "test", crop=32)
    assert result["lesions"] and result["summary"]["overall"]["n"] == len(result["lesions"])
    assert all(0.0 <= r["ceiling"] <= 1.0 for r in result["lesions"])
    assert result["summary"]["overall"]["mean"] > 0.3  # the generator's lesions are visible, mostly
