"""Tests for bundle/scripts/data/transforms.py on a real anisotropic, non-RAS case and on small synthetic volumes."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import LoadImage, Randomizable
from scipy import ndimage
from scripts.data import synthetic_data
from scripts.data.crops import LesionCropd, RandLesionCropd, lesion_components, normalise_crop, paste_crop
from scripts.data.inference_image import (
    file_voxel_to_resampled,
    preprocess_image_for_inference,
    resampled_to_file_voxel,
)
from scripts.data.transforms import (
    SelectChanneld,
    get_crop_transforms,
    get_preprocess_transforms,
    get_train_transforms,
    get_val_transforms,
    lesion_items,
    load_datalist,
)


@pytest.fixture(scope="module")
def brain1(real_data_dir):
    files = {"image": str(real_data_dir / "brain1_image.nrrd"), "label": str(real_data_dir / "brain1_label.nrrd")}
    return files, get_preprocess_transforms()(dict(files))


def _region(volume, start, size):
    """volume (C, X, Y, Z) read at [start, start + size) with zeros outside, independent of the code under test."""
    shape = np.asarray(volume.shape[1:])
    pad = int(size)
    padded = np.pad(np.asarray(volume), [(0, 0)] + [(pad, pad)] * 3)
    s = np.asarray(start) + pad
    assert np.all(s >= 0) and np.all(s + size <= shape + 2 * pad)
    return padded[:, s[0] : s[0] + size, s[1] : s[1] + size, s[2] : s[2] + size]


def test_real_case_preprocessing_geometry(brain1):
    files, d = brain1
    raw = LoadImage(image_only=True)(files["image"])
    assert nib.aff2axcodes(raw.affine.numpy()) != ("R", "A", "S")  # the file really is non-RAS
    for key in ("image", "label"):
        np.testing.assert_allclose(affine_to_spacing(d[key].affine).numpy(), [1.5, 1.5, 1.5], atol=1e-6)
        assert nib.aff2axcodes(d[key].affine.numpy()) == ("R", "A", "S")
        assert d[key].shape[0] == 1 and d[key].dtype == torch.float32
    np.testing.assert_allclose(d["image"].affine.numpy(), d["label"].affine.numpy())
    assert set(torch.unique(d["label"]).tolist()) == {0.0, 1.0}
    raw_label = LoadImage(image_only=True)(files["label"])
    volume_mm3 = float((raw_label > 0).sum()) * float(np.prod(affine_to_spacing(raw_label.affine).numpy()))
    assert abs(float(d["label"].sum()) * 1.5**3 / volume_mm3 - 1.0) < 0.1  # nearest resampling keeps the volume


def test_random_lesion_crop_on_real_case(brain1):
    _, d = brain1
    roi = 64
    crop = get_crop_transforms(roi_size=roi)  # jitter roi // 8 = 8
    crop.set_random_state(0)
    _, sizes, bboxes = lesion_components(d["label"])
    assert len(sizes) == 2  # brain1's lesion has two parts
    chosen = set()
    for _ in range(6):
        out = crop(dict(d))
        for key in ("image", "label", "label_all"):
            assert tuple(out[key].shape) == (1, roi, roi, roi)
        idx = out["lesion_index"]
        chosen.add(idx)
        assert out["num_lesions"] == 2 and out["lesion_voxels"] == sizes[idx]
        assert float(out["label"].sum()) == sizes[idx]  # instance target: the whole chosen lesion, nothing else
        assert float((out["label"] * (1 - out["label_all"])).sum()) == 0
        lo, hi = bboxes[idx]
        offset = (lo + hi) / 2.0 - out["crop_start"] - roi // 2
        assert np.all(np.abs(offset) <= roi // 8 + 1)  # lesion near the crop centre
        np.testing.assert_array_equal(out["label_all"].numpy(), _region(d["label"], out["crop_start"], roi))
    assert chosen == {0, 1}


def test_normalisation_matches_sam_med3d(brain1):
    _, d = brain1
    raw = LesionCropd(roi_size=128)(dict(d))  # z has 105 voxels at 1.5 mm: the 128 crop is padded
    start = raw["crop_start"]
    image = raw["image"].numpy().astype(np.float64)
    inside = np.zeros(image.shape, bool)
    lo, hi = np.maximum(-start, 0), np.minimum(np.asarray(d["image"].shape[1:]) - start, 128)
    inside[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    assert (~inside).sum() > 0 and np.all(image[~inside] == 0)  # zero padding before normalisation

    norm = normalise_crop(raw["image"]).numpy()
    pos = image > 0
    mean, std = image[pos].mean(), image[pos].std(ddof=1)  # torchio: torch.std (unbiased) over voxels > 0
    np.testing.assert_allclose(norm, (image - mean) / std, rtol=1e-4, atol=1e-4)
    assert abs(norm[pos].mean()) < 1e-4 and abs(norm[pos].std(ddof=1) - 1) < 1e-4
    # SAM-Med3D applies the shift to every voxel: padding/air become one constant -mean/std (not 0)
    np.testing.assert_allclose(norm[~inside], -mean / std, rtol=1e-5)

    pipeline = get_crop_transforms(roi_size=128, random=False)(dict(d))
    np.testing.assert_allclose(pipeline["image"].numpy(), norm, rtol=1e-6)
    assert normalise_crop(np.zeros((1, 4, 4, 4), np.float32)).max() == 0  # all-air crop: left unchanged


def test_sampler_balances_small_and_large_lesions():
    label = np.zeros((1, 48, 48, 48), np.float32)
    label[0, 2:12, 2:22, 2:27] = 1  # 5000 voxels
    label[0, 38:40, 40:45, 40] = 1  # 10 voxels
    data = {"image": torch.rand(1, 48, 48, 48) + 0.1, "label": torch.as_tensor(label)}
    crop = RandLesionCropd(keys=("image", "label"), roi_size=16, jitter=2)
    crop.set_random_state(1234)
    draws = 120
    picked_small = 0
    for _ in range(draws):
        out = crop(data)
        picked_small += out["lesion_voxels"] == 10
        if out["lesion_voxels"] == 10:
            assert float(out["label"].sum()) == 10 and float(out["label_all"].sum()) == 10
    # per-component sampling: p = 1/2 (a per-voxel sampler would give 10/5010 -> ~0 picks); binomial sd = 5.5
    assert abs(picked_small - draws / 2) < 22


def test_deterministic_crop_index_and_inverse(brain1):
    _, d = brain1
    crop = LesionCropd(roi_size=64)
    largest, second = crop(dict(d)), crop({**d, "lesion_index": 1})
    assert largest["lesion_index"] == 0 and second["lesion_index"] == 1
    assert largest["lesion_voxels"] > second["lesion_voxels"]
    again = crop(dict(d))
    assert torch.equal(again["image"], largest["image"]) and np.array_equal(again["crop_start"], largest["crop_start"])
    restored = crop.inverse(dict(largest))  # MONAI metadata (applied_operations) undoes crop + pad
    assert restored["label_all"].shape == d["label"].shape
    full = paste_crop(largest["label_all"].as_tensor(), largest["crop_start"], d["label"].shape[1:])
    assert torch.equal(restored["label_all"].as_tensor(), full)
    with pytest.raises(ValueError, match="lesion index"):
        crop({**d, "lesion_index": 5})


def _write_nifti(array, path, spacing=1.5):
    nib.save(nib.Nifti1Image(array, np.diag([spacing] * 3 + [1.0])), str(path))
    return str(path)


def test_channel_selection_and_label_selection(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.uniform(1, 100, (12, 10, 8, 4)).astype(np.float32)  # MSD Task01 layout: channels last
    label = rng.integers(0, 4, (12, 10, 8)).astype(np.uint8)
    files = {"image": _write_nifti(image, tmp_path / "img.nii.gz"), "label": _write_nifti(label, tmp_path / "l.nii.gz")}
    out = get_preprocess_transforms(target_label=3, image_channel=2)(dict(files))
    assert tuple(out["image"].shape) == (1, 12, 10, 8)  # RAS 1.5 mm already: resampling is the identity
    np.testing.assert_allclose(out["image"][0].numpy(), image[..., 2], rtol=1e-5)
    np.testing.assert_array_equal(out["label"][0].numpy(), (label == 3).astype(np.float32))
    union = get_preprocess_transforms(target_label=[2, 3], image_channel=-1)(dict(files))
    np.testing.assert_array_equal(union["label"][0].numpy(), (label >= 2).astype(np.float32))
    np.testing.assert_allclose(union["image"][0].numpy(), image[..., 3], rtol=1e-5)
    loaded = LoadImage(image_only=True, ensure_channel_first=True)(files["image"])
    with pytest.raises(ValueError, match="4 channels; set image_channel"):
        SelectChanneld("image")({"image": loaded})
    with pytest.raises(ValueError, match="image_channel=4"):
        SelectChanneld("image", channel=4)({"image": loaded})
    # inside a Compose, MONAI re-raises as RuntimeError("applying transform ...") from the ValueError
    with pytest.raises(RuntimeError) as err:
        get_preprocess_transforms()(dict(files))
    assert isinstance(err.value.__cause__, ValueError) and "4 channels" in str(err.value.__cause__)


def test_ct_clamp():
    img = MetaTensor(
        torch.linspace(-3000, 3000, 8 * 8 * 8).reshape(1, 8, 8, 8), affine=torch.diag(torch.tensor([1.5] * 3 + [1.0]))
    )
    out = get_preprocess_transforms(None, ct_clamp=True, label_key=None, load=False)({"image": img})["image"]
    assert float(out.min()) == -1000 and float(out.max()) == 1000
    inner = (img > -1000) & (img < 1000)
    torch.testing.assert_close(out[inner], img[inner].float())


def test_point_mapping_real_case(brain1, real_data_dir):
    files, d = brain1
    inf = preprocess_image_for_inference(files["image"])
    torch.testing.assert_close(inf.image.as_tensor(), d["image"].as_tensor())
    np.testing.assert_allclose(inf.resampled_affine, d["image"].affine.numpy())
    assert inf.original_shape == (256, 256, 25)

    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1, (50, 3)) * np.asarray(inf.original_shape)
    back = resampled_to_file_voxel(
        file_voxel_to_resampled(pts, inf.original_affine, inf.resampled_affine),
        inf.original_affine,
        inf.resampled_affine,
    )
    np.testing.assert_allclose(back, pts, atol=1e-9)

    label = LoadImage(image_only=True)(files["label"]).numpy() > 0
    spacing = affine_to_spacing(torch.as_tensor(inf.original_affine)).numpy()
    deepest = np.unravel_index(np.argmax(ndimage.distance_transform_edt(label, sampling=spacing)), label.shape)
    lesion_voxels = np.concatenate([np.array([deepest]), np.argwhere(label)[::7]])
    mapped = np.rint(file_voxel_to_resampled(lesion_voxels, inf.original_affine, inf.resampled_affine)).astype(int)
    hits = d["label"][0].numpy()[tuple(mapped.T)]
    assert hits[0] == 1  # the lesion's deepest voxel lands in the resampled lesion
    assert hits.mean() > 0.85  # boundary voxels may round outside


@pytest.fixture(scope="module")
def synthetic_json(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_tx")
    return synthetic_data.generate_dataset(root, num_train=1, num_val=1, num_test=1, seed=2, shape=(64, 64, 20))


def test_datalist_and_full_pipelines(synthetic_json):
    items = {s: load_datalist(synthetic_json, s) for s in ("training", "validation", "test")}
    assert all(len(v) == 1 for v in items.values())
    with pytest.raises(KeyError, match="'testing'.*available"):
        load_datalist(synthetic_json, "testing")

    train = get_train_transforms(roi_size=32)
    first_random = next(i for i, t in enumerate(train.transforms) if isinstance(t, Randomizable))
    assert first_random == len(get_preprocess_transforms().transforms)  # CacheDataset caches all deterministic steps
    train.set_random_state(0)
    out = train(dict(items["training"][0]))
    assert tuple(out["image"].shape) == (1, 32, 32, 32) and float(out["label"].sum()) > 0
    # lesions stay separate components after resampling to 1.5 mm
    cases = json.loads(synthetic_json.read_text())["synthetic"]["cases"]
    assert out["num_lesions"] == len(cases[Path(items["training"][0]["image"]).name[: -len(".nii.gz")]]["lesions"])

    val = get_val_transforms(roi_size=32)
    a, b = val(dict(items["validation"][0])), val(dict(items["validation"][0]))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_augmented_crops_move_image_and_labels_together(synthetic_json):
    item = load_datalist(synthetic_json, "training")[0]
    plain, augmented = get_train_transforms(roi_size=32), get_train_transforms(roi_size=32, augment=True)
    # the augmentation follows the crop, so the cached deterministic prefix is the same
    first_random = next(i for i, t in enumerate(augmented.transforms) if isinstance(t, Randomizable))
    assert first_random == len(get_preprocess_transforms().transforms)
    changed = 0
    for seed in range(6):
        plain.set_random_state(seed)
        augmented.set_random_state(seed)
        a, b = plain(dict(item)), augmented(dict(item))
        assert b["image"].shape == a["image"].shape and b["label_all"].shape == a["label_all"].shape
        # same lesion, same crop: flips / axial quarter turns keep its voxel count and its image values
        assert int(b["label"].sum()) == int(a["label"].sum()) and int(b["label_all"].sum()) == int(a["label_all"].sum())
        inside_a = a["image"][a["label"] > 0].sort().values
        inside_b = b["image"][b["label"] > 0].sort().values
        scale = float(inside_b.abs().sum() / inside_a.abs().sum())
        assert 0.89 < scale < 1.11
        torch.testing.assert_close(inside_b, inside_a * scale)
        changed += not torch.equal(a["label"], b["label"])
    assert changed >= 3  # the label moved with the image in most draws


def test_lesion_items_counts_lesions_on_the_training_grid(tmp_path):
    # 0.75 x 0.75 x 3 mm label: a large and a small lesion, and two specks one 0.75 mm voxel apart that the 1.5 mm
    # grid merges into one lesion, so counting at the file's resolution would ask the crop for a lesion it lacks.
    label = np.zeros((64, 64, 16), np.uint8)
    label[8:30, 8:30, 3:9] = 1
    label[40:46, 40:46, 10:12] = 1
    label[51:53, 10:12, 4:6] = 1
    label[54:56, 10:12, 4:6] = 1
    image = np.random.default_rng(0).normal(size=label.shape).astype(np.float32)
    affine = np.diag([0.75, 0.75, 3.0, 1.0])
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "l.nii.gz"))
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "i.nii.gz"))
    case = {"image": str(tmp_path / "i.nii.gz"), "label": str(tmp_path / "l.nii.gz")}
    assert ndimage.label(label)[1] == 4

    items = lesion_items([case], "all")
    assert [i["lesion_index"] for i in items] == [0, 1, 2]
    val = get_val_transforms(roi_size=16)
    crops = [val(dict(i)) for i in items]
    assert all(c["num_lesions"] == 3 for c in crops)
    sizes = [int(c["lesion_voxels"]) for c in crops]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3  # each item crops a different lesion

    assert [i["lesion_index"] for i in lesion_items([case, case])] == [0, -1, 0, -1]
    assert [i["lesion_index"] for i in lesion_items([case], [1, -1])] == [1, -1]
    with pytest.raises(ValueError, match="'extremes', 'all' or a list"):
        lesion_items([case], "every")
    empty = {"image": case["image"], "label": _write_nifti(np.zeros_like(label), tmp_path / "empty.nii.gz")}
    assert [i["lesion_index"] for i in lesion_items([empty], "all")] == [0]  # one centre crop, as with "extremes"


def test_label_only_preprocessing_matches_the_full_pipeline(brain1):
    files, full = brain1
    label_only = get_preprocess_transforms(image_key=None)({"label": files["label"]})
    assert "image" not in label_only
    assert torch.equal(label_only["label"].as_tensor(), full["label"].as_tensor())
    np.testing.assert_allclose(label_only["label"].affine.numpy(), full["label"].affine.numpy())
    with pytest.raises(ValueError, match="image_key, a label_key or both"):
        get_preprocess_transforms(image_key=None, label_key=None)
