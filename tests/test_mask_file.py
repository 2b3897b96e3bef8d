"""The app's fast NRRD mask writer must give the file MONAI Label's own writer gives: same voxels, same geometry."""

import sys

import numpy as np
import pytest
import SimpleITK as sitk
from app_testing import APP_DIR
from monai.transforms import LoadImage
from monailabel.transform.writer import write_itk


@pytest.fixture(scope="module")
def write_mask_nrrd():
    sys.path.insert(0, str(APP_DIR))
    try:
        from lib.mask_file import write_mask_nrrd
    finally:
        sys.path.remove(str(APP_DIR))
    return write_mask_nrrd


def oblique_affine() -> np.ndarray:
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[-c, s, 0], [-s, -c, 0], [0, 0, 1.0]]) @ np.diag([0.6, 0.8, 2.5])
    affine[:3, 3] = [110.0, -42.0, 7.5]
    return affine


def test_box_written_as_nrrd_equals_monai_labels_writer(tmp_path, write_mask_nrrd):
    shape = (40, 30, 12)
    rng = np.random.default_rng(0)
    part = (rng.random((9, 7, 4)) > 0.5).astype(np.uint8)
    start = [20, 3, 8]
    full = np.zeros(shape, dtype=np.uint8)
    full[20:29, 3:10, 8:12] = part
    affine = oblique_affine()

    ours = write_mask_nrrd(shape, (start, part), affine, str(tmp_path / "ours.nrrd"))
    theirs = str(tmp_path / "theirs.nrrd")
    write_itk(full, theirs, affine, "uint8", False)

    a, b = sitk.ReadImage(ours), sitk.ReadImage(theirs)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    loaded = LoadImage(image_only=True)(ours)  # as a MONAI client reads it: the file array and RAS affine
    np.testing.assert_array_equal(np.asarray(loaded), full)
    np.testing.assert_allclose(loaded.affine.numpy(), affine, atol=1e-5)


def test_empty_mask_and_temporary_file(write_mask_nrrd):
    path = write_mask_nrrd((8, 9, 10), None, np.eye(4))
    try:
        assert path.endswith(".nrrd")
        image = sitk.ReadImage(path)
        assert image.GetSize() == (8, 9, 10)
        assert not sitk.GetArrayFromImage(image).any()
    finally:
        import os

        os.remove(path)
