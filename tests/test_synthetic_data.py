"""Tests for bundle/scripts/data/synthetic_data.py: determinism, MSD layout, idempotency and lesion realism."""

import json

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from scipy import ndimage
from scripts.data import synthetic_data as sd

SMALL_SHAPE = (64, 64, 20)  # fast grid for layout/determinism tests; statistics use the default grid
FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity, as the lesion sampler uses


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    path = sd.generate_dataset(root, num_train=3, num_val=1, num_test=2, seed=5, shape=SMALL_SHAPE)
    return root, path


@pytest.fixture(scope="module")
def cases():
    """Eight default-size cases drawn in memory (what the bundle trains on)."""
    return [sd.generate_case(np.random.default_rng([7, i])) for i in range(8)]


def _spacing(affine):
    return np.linalg.norm(affine[:3, :3], axis=0)


def _equivalent_diameters(label, affine):
    comps, n = ndimage.label(label, structure=FULL)
    sizes = np.bincount(comps.ravel())[1:]
    return (6.0 * sizes * np.prod(_spacing(affine)) / np.pi) ** (1.0 / 3.0)


def _sphere_dice(mask, spacing):
    """Dice between a lesion and the ball of equal volume at its centroid (1 = sphere)."""
    lo = np.maximum(np.argwhere(mask).min(0) - 8, 0)
    hi = np.minimum(np.argwhere(mask).max(0) + 9, mask.shape)
    sub = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1) * spacing
    centre = (np.argwhere(sub) + lo).mean(0) * spacing
    radius = (3.0 * sub.sum() * np.prod(spacing) / (4.0 * np.pi)) ** (1.0 / 3.0)
    ball = np.linalg.norm(grid - centre, axis=-1) <= radius
    return 2.0 * (sub & ball).sum() / (sub.sum() + ball.sum())


def test_dataset_json_layout_and_splits(dataset):
    root, path = dataset
    meta = json.loads(path.read_text())
    assert meta["labels"] == {"0": "background", "1": "lesion"}
    assert meta["modality"] == {"0": "MR"}
    assert [len(meta[s]) for s in ("training", "validation", "test")] == [3, 1, 2]
    assert (meta["numTraining"], meta["numValidation"], meta["numTest"]) == (3, 1, 2)
    for split, folder in (("training", "Tr"), ("validation", "Tr"), ("test", "Ts")):
        for item in meta[split]:
            assert item["image"].startswith(f"images{folder}/") and item["label"].startswith(f"labels{folder}/")
            assert item["image"].split("/")[1] == item["label"].split("/")[1]  # MSD: same file name
        items = load_decathlon_datalist(str(path), True, split)
        assert all((root / i["image"]).exists() and (root / i["label"]).exists() for i in items)
    names = [i["image"] for s in ("training", "validation", "test") for i in meta[s]]
    assert len(set(names)) == 6
    assert meta["synthetic"]["params"]["shape"] == list(SMALL_SHAPE)


def test_nifti_content(dataset):
    root, path = dataset
    meta = json.loads(path.read_text())
    for item in meta["training"] + meta["test"]:
        img, lab = nib.load(root / item["image"]), nib.load(root / item["label"])
        assert img.shape == lab.shape == SMALL_SHAPE
        np.testing.assert_allclose(img.affine, lab.affine)
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # DICOM-like, loaders must reorient
        spacing = _spacing(img.affine)
        assert sd.INPLANE_SPACING_RANGE[0] <= spacing[0] <= sd.INPLANE_SPACING_RANGE[1]
        assert sd.SLICE_SPACING_RANGE[0] <= spacing[2] <= sd.SLICE_SPACING_RANGE[1]
        assert spacing[2] > 1.9 * spacing[:2].max()  # anisotropic: thick slices
        label = np.asarray(lab.dataobj)
        assert set(np.unique(label)) == {0, 1}


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = sd.generate_dataset(tmp_path / "a", num_train=1, num_val=0, num_test=1, seed=11, shape=SMALL_SHAPE)
    b = sd.generate_dataset(tmp_path / "b", num_train=1, num_val=0, num_test=1, seed=11, shape=SMALL_SHAPE)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.nii.gz"))
    assert len(files) == 4
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert a.read_text() == b.read_text()
    img1, lab1, aff1, _ = sd.generate_case(np.random.default_rng([11, 0]), SMALL_SHAPE)
    img2, lab2, aff2, _ = sd.generate_case(np.random.default_rng([12, 0]), SMALL_SHAPE)
    assert not np.array_equal(img1, img2) and not np.array_equal(lab1, lab2) and not np.allclose(aff1, aff2)


def test_parallel_workers_write_the_same_bytes(tmp_path):
    kw = dict(num_train=2, num_val=1, num_test=1, seed=3, shape=SMALL_SHAPE)
    one = sd.generate_dataset(tmp_path / "one", workers=1, **kw).parent
    two = sd.generate_dataset(tmp_path / "two", workers=2, **kw).parent
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(files) == 9 and files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)  # dataset.json included


def test_idempotent_and_regenerates_incomplete(tmp_path):
    kw = dict(num_train=1, num_val=0, num_test=0, seed=1, shape=SMALL_SHAPE)
    path = sd.generate_dataset(tmp_path, **kw)
    image = tmp_path / json.loads(path.read_text())["training"][0]["image"]
    stamp = image.stat().st_mtime_ns
    sd.generate_dataset(tmp_path, **kw)
    assert image.stat().st_mtime_ns == stamp  # complete + same parameters: untouched
    image.unlink()  # as after an interrupted run
    assert sd.ensure_dataset(tmp_path, **kw) == str(tmp_path)
    assert image.exists()
    sd.generate_dataset(tmp_path, **{**kw, "num_train": 2})  # new parameters: regenerated
    assert len(json.loads(path.read_text())["training"]) == 2
    meta = json.loads(path.read_text())
    meta["synthetic"]["params"]["version"] = sd.GENERATOR_VERSION - 1  # written by an older generator
    path.write_text(json.dumps(meta))
    sd.ensure_dataset(tmp_path)
    meta = json.loads(path.read_text())
    assert meta["synthetic"]["params"] == {
        **kw,
        "num_train": 2,
        "shape": list(SMALL_SHAPE),
        "version": sd.GENERATOR_VERSION,
    }


def test_foreign_dataset_is_protected(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(FileExistsError):
        sd.generate_dataset(tmp_path, num_train=1, num_val=0, num_test=0, shape=SMALL_SHAPE)
    assert sd.ensure_dataset(tmp_path) == str(tmp_path)  # complete foreign dataset: used as is
    assert not (tmp_path / "imagesTr").exists()


def test_cli(tmp_path):
    sd.main(
        ["--output_dir", str(tmp_path), "--num_train", "1", "--num_val", "1", "--num_test", "0"]
        + ["--shape", *map(str, SMALL_SHAPE)]
    )
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert len(meta["training"]) == 1 and len(meta["validation"]) == 1 and meta["test"] == []


def test_lesion_count_separation_and_size_range(cases):
    diameters = []
    for image, label, affine, info in cases:
        _, n = ndimage.label(label, structure=FULL)
        assert 2 <= n <= 5
        assert n == len(info["lesions"])  # lesions never touch: one component each
        # after 1.5 mm resampling the grid is what the CPU/GPU crops expect
        assert np.all(
            (np.asarray(label.shape) * _spacing(affine) / 1.5 >= 64)
            & (np.asarray(label.shape) * _spacing(affine) / 1.5 <= 110)
        )
        diameters += list(_equivalent_diameters(label, affine))
    diameters = np.asarray(diameters)
    assert diameters.min() < 5 and diameters.max() > 30
    assert (diameters < 10).mean() >= 0.3  # small lesions are common
    assert (diameters > 25).sum() >= 2


def test_lesions_are_irregular(cases):
    dices = []
    for _, label, affine, _ in cases:
        comps, n = ndimage.label(label, structure=FULL)
        dices += [_sphere_dice(comps == k, _spacing(affine)) for k in range(1, n + 1) if (comps == k).sum() >= 100]
    spacing = _spacing(cases[0][2])
    grid = np.stack(np.meshgrid(*[np.arange(40)] * 2, np.arange(16), indexing="ij"), -1) * spacing
    control = _sphere_dice(np.linalg.norm(grid - np.array([20, 20, 8]) * spacing, axis=-1) <= 9.0, spacing)
    assert control > 0.9  # the metric does recognise a (rasterised, anisotropic) sphere
    assert len(dices) >= 8
    assert np.mean(np.asarray(dices) < 0.85) >= 0.3


def test_hypo_and_hyper_intense_lesions(cases):
    ratios, agree = [], []
    for image, label, _, info in cases:
        comps, n = ndimage.label(label, structure=FULL)
        for k in range(1, n + 1):
            m = comps == k
            if m.sum() < 20:
                continue
            shell = ndimage.binary_dilation(m, iterations=3) & ~ndimage.binary_dilation(m) & (label == 0)
            ratio = image[m].mean() / np.median(image[shell])
            centre = np.argwhere(m).mean(0)
            les = min(info["lesions"], key=lambda l: np.linalg.norm(np.asarray(l["centre_voxel"]) - centre))
            ratios.append(ratio)
            agree.append((ratio < 1) == (les["contrast"] == "hypo"))
    ratios = np.asarray(ratios)
    assert (ratios < 0.8).sum() >= 2 and (ratios > 1.25).sum() >= 2
    assert np.mean(agree) >= 0.9


def test_intensity_range(cases):
    for image, label, _, _ in cases:
        assert image.dtype == np.int16 and image.min() >= 0
        organ_level = np.median(image[label == 0][image[label == 0] > np.percentile(image, 60)])
        corner = image[:6, :6, :].astype(float)  # air outside the body
        assert corner.mean() < 0.1 * organ_level
        assert 300 < organ_level < 3000
