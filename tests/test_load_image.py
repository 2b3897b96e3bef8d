"""The engine's file reader (ITK's buffer in the file's voxel type, no C-order copy) must give what the training
transforms read: the same array, affine and channel layout as ``LoadImage``, and the same resampled windows."""

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage
from scripts.data.crops import crop_at
from scripts.data.inference_image import ImageReadError, load_image, preprocess_image_for_inference
from scripts.data.transforms import get_preprocess_transforms

AFFINE = np.array([[0.0, -0.8, 0.1, 12.0], [0.9, 0.0, 0.0, -30.0], [0.0, 0.1, 2.5, 7.0], [0, 0, 0, 1]])


def nifti(path, array, slope_inter=None) -> str:
    image = nib.Nifti1Image(array, AFFINE)
    if slope_inter:
        image.header.set_slope_inter(*slope_inter)
    nib.save(image, str(path))
    return str(path)


@pytest.fixture
def files(tmp_path, real_data_dir):
    rng = np.random.default_rng(0)
    return {
        "ct_nrrd_int16": (str(real_data_dir / "lung1crop_image.nrrd"), torch.int16),
        "mr_uint16": (nifti(tmp_path / "mr.nii.gz", rng.integers(0, 4000, (21, 19, 9)).astype(np.uint16)), None),
        "four_channels": (nifti(tmp_path / "mc.nii.gz", rng.normal(size=(21, 19, 9, 4)).astype(np.float32)), None),
        "scaled_int16": (  # scl_slope / scl_inter applied by both readers: float values
            nifti(tmp_path / "scaled.nii.gz", rng.integers(-500, 500, (12, 10, 8)).astype(np.int16), (2.0, -100.0)),
            None,
        ),
    }


@pytest.mark.parametrize("name", ["ct_nrrd_int16", "mr_uint16", "four_channels", "scaled_int16"])
def test_load_image_reads_what_load_image_transform_reads(files, name):
    path, kept_dtype = files[name]
    expected = LoadImage(image_only=True, ensure_channel_first=True)(path)
    got = load_image(path)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.affine.numpy(), expected.affine.numpy(), atol=1e-6)
    torch.testing.assert_close(got.as_tensor().to(torch.float32), expected.as_tensor(), rtol=0, atol=0)
    # int16 stays int16 (half the bytes, no conversion pass); uint16 has too few torch operations: float32
    assert got.dtype == (kept_dtype or torch.float32)


@pytest.mark.parametrize("ct_clamp", [False, True])
def test_windows_from_an_int16_file_equal_the_training_pipeline(real_data_dir, ct_clamp):
    path = str(real_data_dir / "lung1crop_image.nrrd")
    inf = preprocess_image_for_inference(path, spacing=1.25, ct_clamp=ct_clamp)
    assert inf.source.dtype == torch.int16
    pre = get_preprocess_transforms(None, None, ct_clamp, spacing=1.25, label_key=None)
    whole = pre({"image": path})["image"]  # LoadImaged -> float32 -> clamp -> RAS -> spacing
    centre = tuple(int(n) // 2 - 12 for n in whole.shape[1:])
    for start in [centre, (-5, 3, -9)]:
        expected = crop_at(whole, start, 24).as_tensor()
        torch.testing.assert_close(inf.crop(start, 24), expected, atol=1e-3, rtol=1e-5)


def test_a_file_itk_cannot_read_fails_with_the_readers_error(tmp_path):
    broken = tmp_path / "broken.nrrd"
    broken.write_bytes(b"NRRD0004\ntype: short\nsizes: 4 4\n")  # header without data
    with pytest.raises(ImageReadError, match="broken.nrrd cannot be read: .*dimension") as caught:
        load_image(broken)  # MONAI's NRRD reader names what is missing
    assert isinstance(caught.value, ValueError) and str(tmp_path) not in str(caught.value)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"\0")
    with pytest.raises(ImageReadError, match="garbage.nii.gz cannot be read: .*not a gzip file"):
        load_image(garbage)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.nii.gz")
