"""The crop's intensity normalisation: "upstream" (SAM-Med3D) and "robust" (CT and MR alike), and that every path
that normalises a crop (training/validation transforms, the interactive engine) uses the configured one."""

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scripts.data.crops import crop_at, normalise_crop
from scripts.data.transforms import NormaliseCropd, get_val_transforms
from scripts.interactive import InteractiveSegmenter
from scripts.modeling import build_sgp_sam


def ct_like_crop() -> np.ndarray:
    """100 voxels of air (-1000 HU), 100 of liver (40 HU) and one bone outlier (3000 HU)."""
    return np.asarray([-1000.0] * 100 + [40.0] * 100 + [3000.0], np.float32).reshape(1, 201, 1, 1)


def test_robust_on_ct_clips_the_bone_outlier_and_keeps_air():
    out = normalise_crop(ct_like_crop(), "robust")[0, :, 0, 0]
    # 201 values: the 0.5th percentile is sorted value #1 (-1000), the 99.5th is #199 (40): the bone becomes liver.
    # A crop with two levels, fractions p (air) and q (rest), maps to -sqrt(q / p) and +sqrt(p / q), whatever the HU.
    p, q = 100 / 201, 101 / 201
    np.testing.assert_allclose(out[:100], -math.sqrt(q / p), rtol=1e-5)
    np.testing.assert_allclose(out[100:], math.sqrt(p / q), rtol=1e-5)
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1.0) < 1e-5


def test_upstream_on_the_same_ct_ignores_air_and_keeps_the_outlier():
    crop = ct_like_crop()
    out = normalise_crop(crop, "upstream")[0, :, 0, 0]
    positive = np.asarray([40.0] * 100 + [3000.0])  # "> 0": air is left out of the statistics
    mean, std = positive.mean(), positive.std(ddof=1)
    assert mean == pytest.approx(7000 / 101) and std == pytest.approx(294.5308, rel=1e-5)  # by hand
    np.testing.assert_allclose(out, (crop[0, :, 0, 0] - mean) / std, rtol=1e-5)
    assert out[-1] > 9.9 and out[0] < -3.6  # the bone dominates; air far below the tissue


def test_robust_percentiles_and_statistics_by_hand():
    crop = np.arange(1000, dtype=np.float32).reshape(1, 10, 10, 10)
    out = normalise_crop(crop, "robust")
    # numpy's linear percentiles of 0..999: 0.5 % -> 4.995, 99.5 % -> 994.005; the clipped crop stays symmetric
    clipped = np.clip(np.arange(1000, dtype=np.float64), 4.995, 994.005)
    mean, std = clipped.mean(), clipped.std()
    assert mean == pytest.approx(499.5)
    np.testing.assert_allclose(out.ravel(), (clipped - mean) / std, rtol=1e-5, atol=1e-6)
    assert out.min() == pytest.approx((4.995 - 499.5) / std, rel=1e-5)


def test_robust_is_the_same_for_any_linear_intensity_scale():
    """An MR crop in arbitrary units and the same anatomy as CT-like HU (shifted, scaled) normalise alike."""
    rng = np.random.default_rng(0)
    mr = rng.gamma(2.0, 150.0, size=(1, 12, 12, 12)).astype(np.float32)
    ct = (mr * 2.5 - 1000.0).astype(np.float32)
    np.testing.assert_allclose(normalise_crop(ct, "robust"), normalise_crop(mr, "robust"), atol=1e-4)
    assert not np.allclose(normalise_crop(ct, "upstream"), normalise_crop(mr, "upstream"), atol=1e-2)


def test_constant_and_typed_inputs():
    assert np.all(normalise_crop(np.full((1, 4, 4, 4), -1000.0, np.float32), "robust") == 0)  # constant crop
    assert normalise_crop(np.zeros((1, 4, 4, 4), np.float32), "upstream").max() == 0  # all air: unchanged
    meta = MetaTensor(torch.arange(64.0).reshape(1, 4, 4, 4), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    out = normalise_crop(meta, "robust")
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and torch.equal(out.affine, meta.affine)
    with pytest.raises(ValueError, match="normalisation must be one of"):
        normalise_crop(meta, "zscore")
    with pytest.raises(ValueError, match="normalisation must be one of"):
        NormaliseCropd("image", mode="minmax")


def _ct_volume() -> MetaTensor:
    """A CT-like volume (HU): air, a soft-tissue box with a hypodense lesion, a bright bone rod."""
    vol = torch.full((1, 40, 40, 40), -1000.0)
    vol[0, 5:35, 5:35, 5:35] = 50.0
    vol[0, 17:23, 17:23, 17:23] = 10.0
    vol[0, 8:10, 8:10, 5:35] = 1500.0
    return MetaTensor(vol, affine=torch.eye(4))


@pytest.mark.parametrize("mode", ["upstream", "robust"])
def test_validation_transforms_use_the_configured_mode(mode, tmp_path):
    image = _ct_volume()
    label = np.zeros(image.shape[1:], np.uint8)
    label[17:23, 17:23, 17:23] = 1
    files = {"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "ct_label.nii.gz")}
    nib.save(nib.Nifti1Image(image[0].numpy(), np.eye(4)), files["image"])
    nib.save(nib.Nifti1Image(label, np.eye(4)), files["label"])
    out = get_val_transforms(roi_size=16, target_label=1, spacing=1.0, normalisation=mode)(files)
    raw = crop_at(image, out["crop_start"], 16)
    np.testing.assert_allclose(out["image"].numpy(), normalise_crop(raw, mode).numpy(), rtol=1e-5, atol=1e-5)


def test_engine_crops_use_the_configured_mode():
    network = build_sgp_sam("tiny")
    image = _ct_volume()
    robust = InteractiveSegmenter(network, spacing=1.0, normalisation="robust")
    upstream = InteractiveSegmenter(network, spacing=1.0)
    inf = robust._cache.volume("ct", image)
    start = (0, 0, 0)
    raw = crop_at(inf.image, start, robust.crop_size)
    np.testing.assert_allclose(robust._crop(inf, start)[0].numpy(), normalise_crop(raw, "robust").numpy(), atol=1e-5)
    np.testing.assert_allclose(upstream._crop(inf, start)[0].numpy(), normalise_crop(raw).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="normalisation must be one of"):
        InteractiveSegmenter(network, normalisation="ct")
