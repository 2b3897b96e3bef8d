"""Experiment presets in configs/: each merges with bundle/configs/train.json and resolves; the MSD presets split
MSD's labelled cases and select the right label / channel on a fake MSD-layout dataset."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_JSON = REPO_ROOT / "bundle" / "configs" / "train.json"
PRESETS = sorted((REPO_ROOT / "configs").glob("*.json"))
ROI_32 = {"preprocessing#roi_size": 32}
MSD_PRESETS = {"msd_liver_tumour.json": (2, None, True), "msd_brain_enhancing_tumour.json": (3, 2, False)}


def parse(*overlays, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(TRAIN_JSON), *[str(REPO_ROOT / "configs" / o) for o in overlays]])
    for key, value in overrides.items():
        parser[key] = value
    return parser


@pytest.mark.parametrize("preset", [p.name for p in PRESETS])
def test_preset_merges_and_resolves(preset):
    """Every preset's own keys and the core hyper-parameters resolve once layered over train.json."""
    own = json.loads((REPO_ROOT / "configs" / preset).read_text())
    parser = parse(preset)
    # plain values of the preset (scalars and lists of them) land unchanged in the merged config
    for key, value in own.items():
        items = value if isinstance(value, list) else [value]
        if not any(isinstance(v, dict) or (isinstance(v, str) and v[:1] in "$@%") for v in items):
            assert parser.get_parsed_content(key) == value, key
    for key in ("preset", "preprocessing", "target_label", "sgpm", "loss", "amp"):
        parser.get_parsed_content(key)
    assert parser.get_parsed_content("preset") in ("tiny", "small", "sam_med3d")
    assert parser["network_def"]["_target_"]


@pytest.mark.parametrize("preset, expected", MSD_PRESETS.items())
def test_msd_preset_values(preset, expected):
    target_label, image_channel, ct_clamp = expected
    parser = parse(preset)
    assert parser.get_parsed_content("target_label") == target_label
    assert parser.get_parsed_content("preprocessing#image_channel") == image_channel
    assert parser.get_parsed_content("preprocessing#ct_clamp") is ct_clamp
    assert parser.get_parsed_content("preset") == "sam_med3d"
    assert parser.get_parsed_content("preprocessing#roi_size") == 128
    assert parser.get_parsed_content("preprocessing#normalisation") == "upstream"
    assert parser.get_parsed_content("amp") is True
    assert parser.get_parsed_content("num_val_cases") == 10
    assert parser.get_parsed_content("dataset_dir").startswith("/data/Task0")
    # the preprocessing components take the preset's label / channel / clamp
    for pipeline in ("train", "validate"):
        pre = parser[f"{pipeline}#preprocessing"]
        assert (pre["target_label"], pre["image_channel"], pre["ct_clamp"], pre["normalisation"]) == (
            "@target_label",
            "@preprocessing::image_channel",  # MONAI writes the "#" of a reference as "::"
            "@preprocessing::ct_clamp",
            "@preprocessing::normalisation",
        )


def test_sam_med3d_networks_instantiate():
    """The MSD presets build the released SAM-Med3D size with SGPM; the baseline drops SGPM and uses Dice+CE."""
    from scripts.training.losses import ZoomLoss
    from scripts.modeling import SGPSAM

    sgp = parse("msd_liver_tumour.json")
    net = sgp.get_parsed_content("network_def")
    assert isinstance(net, SGPSAM) and net.img_size == 128 and net.sgpm is not None
    assert net.low_res_size == (32, 32, 32)
    assert isinstance(sgp.get_parsed_content("loss"), ZoomLoss)
    del net

    base = parse("msd_liver_tumour.json", "baseline_finetune.json")
    assert base.get_parsed_content("target_label") == 2  # the MSD preset's choices survive the baseline overlay
    net = base.get_parsed_content("network_def")
    assert net.sgpm is None and net.img_size == 128
    loss = base.get_parsed_content("loss")
    assert type(loss).__name__ == "_DiceCEBinary" and not isinstance(loss, ZoomLoss)
    logits, target = torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4)
    target[0, 0, 1, 1, 1] = 1
    assert torch.isfinite(loss(logits, target))


# ------------------------------------------------------------------------------------------------------------
# A fake MSD-layout dataset: labels in 'training' only, 'test' is a list of image paths
# ------------------------------------------------------------------------------------------------------------
SHAPE = (24, 24, 20)
AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])  # RAS at 1.5 mm: the preprocessing keeps the voxel grid as is


def _write(array, path):
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))


def _make_case(rng, channels: int | None):
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[4:18, 4:18, 3:15] = 1  # "liver" / "edema"
    label[6:9, 6:9, 5:8] = 2  # 27 voxels: liver tumour / non-enhancing
    label[12:16, 12:16, 9:13] = 3 if channels else 2  # 64 voxels: enhancing tumour / second liver tumour
    if channels:
        # channel c holds values around 100 * (c + 1): the selected channel is recognisable after loading
        image = np.stack([100.0 * (c + 1) + rng.random(SHAPE) for c in range(channels)], axis=-1)
    else:
        image = rng.uniform(-3000, 3000, SHAPE)  # CT outside [-1000, 1000] HU exercises the clamp
    return image.astype(np.float32), label


def make_fake_msd(root: Path, name: str, num_cases: int, channels: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(num_cases):
        image, label = _make_case(rng, channels)
        _write(image, root / "imagesTr" / f"{name}_{i}.nii.gz")
        _write(label, root / "labelsTr" / f"{name}_{i}.nii.gz")
        training.append({"image": f"./imagesTr/{name}_{i}.nii.gz", "label": f"./labelsTr/{name}_{i}.nii.gz"})
    image, _ = _make_case(rng, channels)
    _write(image, root / "imagesTs" / f"{name}_100.nii.gz")
    meta = {
        "name": name,
        "numTraining": num_cases,
        "numTest": 1,
        "training": training,
        "test": [f"./imagesTs/{name}_100.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _case(item) -> str:
    return Path(item["image"]).name.split(".")[0]


def test_liver_preset_split_and_tumour_label(tmp_path):
    root = make_fake_msd(tmp_path / "Task03_Liver", "liver", num_cases=4)
    parser = parse(
        "msd_liver_tumour.json", dataset_dir=str(root), num_val_cases=1, num_test_cases=1, preset="tiny", **ROI_32
    )
    train = parser.get_parsed_content("train_datalist")
    val = parser.get_parsed_content("val_datalist")
    test = parser.get_parsed_content("test_datalist")
    assert [_case(i) for i in train] == ["liver_0", "liver_1"]
    assert [_case(i) for i in val] == ["liver_2"]
    assert [_case(i) for i in test] == ["liver_3"]  # labelled, not MSD's image-only 'test' list
    assert all(Path(i["label"]).is_file() for i in train + val + test)
    # the synthetic-dataset generator is never invoked on user data
    assert sorted(p.name for p in root.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr"]

    # validation pipeline from the config: crop on the largest tumour (64 voxels); "label" is that lesion, "label_all"
    # every tumour voxel in the crop; liver (label 1) is background in both
    sample = parser.get_parsed_content("validate#preprocessing")(dict(val[0], lesion_index=0))
    label = sample["label"]
    assert tuple(label.shape) == (1, 32, 32, 32)
    assert set(torch.unique(label).tolist()) <= {0.0, 1.0}
    source = nib.load(val[0]["label"]).get_fdata()
    assert label.sum().item() == 64
    assert sample["label_all"].sum().item() == (source == 2).sum() == 27 + 64  # both tumours fit in the 32^3 crop

    # deterministic preprocessing with the preset's values: CT clamped to [-1000, 1000]
    from scripts.data.transforms import get_preprocess_transforms

    pre = get_preprocess_transforms(
        target_label=parser.get_parsed_content("target_label"),
        image_channel=parser.get_parsed_content("preprocessing#image_channel"),
        ct_clamp=parser.get_parsed_content("preprocessing#ct_clamp"),
        spacing=parser.get_parsed_content("preprocessing#spacing"),
    )(dict(val[0]))
    assert pre["image"].min().item() == -1000.0 and pre["image"].max().item() == 1000.0
    assert pre["label"].sum().item() == 27 + 64


def test_brain_preset_selects_t1gd_and_enhancing_tumour(tmp_path):
    root = make_fake_msd(tmp_path / "Task01_BrainTumour", "BRATS", num_cases=3, channels=4)
    parser = parse(
        "msd_brain_enhancing_tumour.json",
        dataset_dir=str(root),
        num_val_cases=1,
        num_test_cases=1,
        preset="tiny",
        **ROI_32,
    )
    val = parser.get_parsed_content("val_datalist")
    assert [_case(i) for i in parser.get_parsed_content("train_datalist")] == ["BRATS_0"]
    assert [_case(i) for i in val] == ["BRATS_1"]

    sample = parser.get_parsed_content("validate#preprocessing")(dict(val[0], lesion_index=0))
    assert sample["image"].shape[0] == 1
    assert sample["label"].sum().item() == 64  # enhancing tumour (3) only: not edema (1) nor non-enhancing (2)
    assert sample["label_all"].sum().item() == 64

    from scripts.data.transforms import get_preprocess_transforms

    pre = get_preprocess_transforms(
        target_label=parser.get_parsed_content("target_label"),
        image_channel=parser.get_parsed_content("preprocessing#image_channel"),
        ct_clamp=parser.get_parsed_content("preprocessing#ct_clamp"),
    )(dict(val[0]))
    image = pre["image"]
    assert image.shape[0] == 1
    assert 300.0 <= image.min().item() and image.max().item() <= 301.0  # channel 2 = T1gd, no clamp applied
