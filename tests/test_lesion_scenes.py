"""Domain-randomised lesion scenes (``scripts.data.lesion_scenes``): determinism, sizes, contrasts, HU ranges,
geometry written to the NIfTI header, one component per lesion, and loading through the bundle's transforms."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scripts.data.lesion_scenes import generate_scene, generate_scenes_dataset, main, parse_weights
from scripts.data.scene_lesions import random_look
from scripts.data.transforms import get_preprocess_transforms, get_train_transforms, lesion_components, load_datalist

SCENES = {  # name: (rng key, kind, modality, diameters or None)
    "lung_ct": ((11, 0), "lung", "CT", None),
    "liver_ct": ((11, 7), "liver", "CT", [2.5, 14.0, 35.0]),
    "brain_mr": ((11, 2), "brain", "MR", None),
    "breast_mr": ((11, 3), "breast", "MR", None),
}


@pytest.fixture(scope="module")
def scenes():
    return {
        name: generate_scene(np.random.default_rng(key), kind, modality, diam)
        for name, (key, kind, modality, diam) in SCENES.items()
    }


def _resampled_label(label: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The label as the bundle sees it: RAS, 1.5 mm, nearest neighbour."""
    pre = get_preprocess_transforms(1, image_key=None, load=False)
    from monai.data import MetaTensor

    return pre({"label": MetaTensor(label[None].astype(np.float32), affine=affine)})["label"][0].numpy()


def test_same_key_same_scene_other_key_other_scene(scenes):
    image, label, affine, info = generate_scene(np.random.default_rng((11, 0)), "lung", "CT")
    ref_image, ref_label, ref_affine, ref_info = scenes["lung_ct"]
    assert np.array_equal(image, ref_image) and np.array_equal(label, ref_label)
    assert np.array_equal(affine, ref_affine) and info == ref_info
    other = generate_scene(np.random.default_rng((12, 0)), "lung", "CT")[0]
    assert other.shape != image.shape or not np.array_equal(other, image)


def test_each_lesion_is_one_component_also_at_the_bundle_spacing(scenes):
    for name, (image, label, affine, info) in scenes.items():
        n = len(info["lesions"])
        assert n >= 1, name
        _, count = ndimage.label(label, np.ones((3, 3, 3)))
        assert count == n, name
        assert sum(les["voxels"] for les in info["lesions"]) == int(label.sum()), name
        sizes = lesion_components(_resampled_label(label, affine)[None])[1]
        assert len(sizes) == n, f"{name}: {len(sizes)} components at 1.5 mm for {n} lesions"


def test_lesion_sizes_reach_a_few_voxels_and_beyond_a_64_crop(scenes):
    _, label, affine, info = scenes["liver_ct"]
    assert min(les["voxels"] for les in info["lesions"]) <= 10, "a lesion of a few voxels as written"
    resampled = lesion_components(_resampled_label(label, affine)[None])[1]
    assert resampled.min() <= 30, f"smallest lesion {resampled.min()} voxels at 1.5 mm (real: from 22)"
    image, label, affine, info = generate_scene(np.random.default_rng((11, 5)), "liver", "CT", [130.0])
    assert len(info["lesions"]) == 1
    extent_mm = (np.ptp(np.argwhere(label), axis=0) + 1) * np.abs(np.diag(affine)[:3])
    assert extent_mm.max() > 96.0, f"largest extent {extent_mm} mm does not exceed a 64^3 crop at 1.5 mm"


def test_random_contrast_lesions_have_both_polarities_and_stay_visible():
    rng = np.random.default_rng(0)
    signs = []
    for host in rng.uniform(0.0, 1.0, 300):
        look = random_look(rng, "brain", float(host), 0.0, 1.0)
        assert 0.0 <= look.solid <= 1.0
        assert abs(look.solid - host) >= 0.12 - 1e-9
        signs.append(np.sign(look.solid - host))
    assert 0.3 < np.mean(np.array(signs) > 0) < 0.7


def test_mr_scenes_show_bright_and_dark_lesions(scenes):
    polarities = {les["polarity"] for name in ("brain_mr", "breast_mr") for les in scenes[name][3]["lesions"]}
    polarities |= {
        les["polarity"]
        for seed in range(1)
        for les in generate_scene(np.random.default_rng((13, seed)), "random", "MR")[3]["lesions"]
    }
    assert polarities == {"bright", "dark"}
    for name in ("brain_mr", "breast_mr"):
        image = scenes[name][0]
        assert image.dtype == np.int16 and image.min() >= 0


def _mode(values: np.ndarray, lo: float, hi: float, width: float = 10.0) -> float:
    hist, edges = np.histogram(values[(values > lo) & (values < hi)], np.arange(lo, hi + width, width))
    return float(edges[np.argmax(hist)] + width / 2)


def test_ct_scenes_are_in_plausible_hounsfield_units(scenes):
    lung, _, _, lung_info = scenes["lung_ct"]
    liver, liver_label, _, liver_info = scenes["liver_ct"]
    assert lung.dtype == np.int16 and lung.min() >= -1024 and lung.max() <= 3071
    assert -960 <= _mode(lung, -990, -600) <= -760, "lung parenchyma"
    assert 35 <= _mode(liver[liver_label == 0], -50, 200) <= 140, "liver or muscle (the largest soft tissue)"
    assert -130 <= _mode(liver, -200, -40) <= -70, "fat"
    for info in (lung_info, liver_info):
        assert info["modality"] == "CT" and info["phase"] in ("unenhanced", "arterial", "portal")
        assert 5.0 <= info["noise_hu"] <= 30.0


def test_realistic_anisotropic_spacing(scenes):
    ratios = []
    for name, (image, label, affine, info) in scenes.items():
        spacing = np.abs(np.diag(affine)[:3])
        assert np.allclose(spacing, info["spacing"], atol=1e-3)
        thick = int(np.argmax(spacing))
        inplane = np.delete(spacing, thick)
        assert np.all((inplane >= 0.45) & (inplane <= 1.0 + 1e-6)), name
        assert 0.6 <= spacing[thick] <= 6.5, name
        ratios.append(spacing[thick] / inplane.max())
    assert max(ratios) >= 2.0, f"no anisotropic scene among the fixtures: {ratios}"


@pytest.fixture(scope="module")
def cli_dataset(tmp_path_factory):
    """1 training, 1 validation and 1 test case written through the command line's entry point."""
    out = tmp_path_factory.mktemp("scenes") / "cli"
    main(f"--output_dir {out} --num_train 1 --num_val 1 --num_test 1 --seed 3 --kinds lung,liver,soft".split())
    return out


def test_cli_writes_the_layout_and_each_case_depends_only_on_seed_and_index(cli_dataset, tmp_path):
    meta = json.loads((cli_dataset / "dataset.json").read_text())
    assert [len(meta[s]) for s in ("training", "validation", "test")] == [1, 1, 1]
    assert meta["validation"][0]["label"].startswith("labelsTr/") and meta["test"][0]["image"].startswith("imagesTs/")
    assert {c["kind"] for c in meta["lesion_scenes"]["cases"].values()} <= {"lung", "liver", "soft"}
    other = generate_scenes_dataset(tmp_path / "other", 1, 0, 1, seed=3, kinds="lung,liver,soft")
    other_meta = json.loads(other.read_text())
    for mine, theirs in (
        (meta["training"][0], other_meta["training"][0]),
        (meta["validation"][0], other_meta["test"][0]),
    ):
        for key in ("image", "label"):  # case 1 is validation here and test there: same bytes
            assert (cli_dataset / mine[key]).read_bytes() == (tmp_path / "other" / theirs[key]).read_bytes()
    mtime = other.stat().st_mtime_ns
    assert generate_scenes_dataset(tmp_path / "other", 1, 0, 1, seed=3, kinds="lung,liver,soft") == other
    assert other.stat().st_mtime_ns == mtime, "an up-to-date dataset is not rewritten"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(FileExistsError):
        generate_scenes_dataset(tmp_path / "foreign", 1, 0, 0)
    with pytest.raises(ValueError, match="unknown scene kind"):
        parse_weights("lung,kidney")


def test_written_dataset_loads_with_the_bundle_transforms(cli_dataset):
    train = get_train_transforms(roi_size=64, augment=True)
    for split in ("training", "validation", "test"):
        for item in load_datalist(cli_dataset / "dataset.json", split):
            out = train(dict(item))
            assert tuple(out["image"].shape) == (1, 64, 64, 64) and out["label"].sum() > 0
            assert np.isfinite(out["image"].numpy()).all()
            name = item["image"].split("/")[-1][: -len(".nii.gz")]
            spacing = json.loads((cli_dataset / "dataset.json").read_text())["lesion_scenes"]["cases"][name]["spacing"]
            assert np.allclose(nib.load(item["image"]).header.get_zooms(), spacing, atol=1e-3)
