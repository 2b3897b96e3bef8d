"""Transfer-method presets (configs/method_*.json) through the bundle workflows, the TAGS anatomy mask and alignment
loss in training and evaluation, the synthetic organ masks, and the transfer study's aggregation over seeds. The
study's smoke run is a plumbing check outside the suite: experiments/test_transfer_study_smoke.py."""

import concurrent.futures
import json
import os
import random
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import run_bundle_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundle"
TRAIN_JSON = BUNDLE / "configs" / "train.json"
EVALUATE_JSON = BUNDLE / "configs" / "evaluate.json"
CPU_TINY = REPO_ROOT / "configs" / "cpu_tiny.json"
METHOD_PRESETS = sorted(p.name for p in (REPO_ROOT / "configs").glob("method_*.json"))
# Run end to end through the CLI: one preset per code path (plain fine-tuning, SGPM + Zoom Loss, adapters, anatomy
# prompt). Decoder-only, the ungated SGPM and SGP-SAM with Dice + CE differ from these only in config keys, which the
# parser tests below check for every preset.
CLI_PRESETS = ["method_full_finetune.json", "method_ma_sam.json", "method_sgp_sam.json", "method_tags.json"]
SMALL_SHAPE = (64, 64, 20)


def _config_list(*files) -> str:
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def _parser(*files, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update(overrides)
    return parser


def _method(name: str) -> Path:
    return REPO_ROOT / "configs" / name


@pytest.fixture(scope="module")
def organ_dataset(tmp_path_factory):
    """Two training, one validation and one test case on a small grid, with organ masks."""
    from scripts.data.synthetic_data import generate_dataset

    root = tmp_path_factory.mktemp("lesions_with_organs")
    generate_dataset(root, num_train=2, num_val=1, num_test=1, shape=SMALL_SHAPE, organ_masks=True)
    return root


# ------------------------------------------------------------------------------------------------------------
# Every preset trains and evaluates through `python -m monai.bundle run`
# ------------------------------------------------------------------------------------------------------------
def _train_and_evaluate(preset: str, dataset: Path, out: Path) -> dict:
    configs = [TRAIN_JSON, CPU_TINY, _method(preset)]
    common = ["--dataset_dir", str(dataset), "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "runs")]
    train_rc, train_log = run_bundle_cli(
        "run", "training", "--config_file", _config_list(*configs), *common,
        "--max_epochs", "1", "--iterations_per_epoch", "2", "--num_rounds", "2", "--val_interval", "1",
    )  # fmt: skip
    result = {"train_rc": train_rc, "train_log": train_log, "out": out}
    if train_rc == 0:
        result["eval_rc"], result["eval_log"] = run_bundle_cli(
            "run", "evaluating", "--config_file", _config_list(*configs, EVALUATE_JSON), *common,
            "--max_clicks", "5", "--eval_output_dir", str(out / "evaluation"),
        )  # fmt: skip
    return result


@pytest.fixture(scope="module")
def preset_runs(organ_dataset, tmp_path_factory):
    """All presets' CLI runs, as many at a time as there are usable cores (each process uses one thread)."""
    root = tmp_path_factory.mktemp("preset_runs")
    workers = max(1, min(len(os.sched_getaffinity(0)), 4))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {p: pool.submit(_train_and_evaluate, p, organ_dataset, root / p[:-5]) for p in CLI_PRESETS}
        return {p: f.result() for p, f in futures.items()}


def test_all_methods_have_presets():
    expected = {"full_finetune", "decoder_only", "sgp_sam", "sgp_sam_no_gate", "sgp_sam_dice_ce", "ma_sam", "tags"}
    assert {p[len("method_") : -len(".json")] for p in METHOD_PRESETS} == expected
    assert set(CLI_PRESETS) <= set(METHOD_PRESETS)


def _referenced_ids(node) -> set[str]:
    """Top-level ids that a config's ``@id`` references (also inside ``$`` expressions) point at."""
    if isinstance(node, dict):
        return set().union(*map(_referenced_ids, node.values()))
    if isinstance(node, list):
        return set().union(*map(_referenced_ids, node))
    return set(re.findall(r"@(\w+)", node)) if isinstance(node, str) else set()


def _has_path(config, path: str) -> bool:
    """Whether ``config`` holds the item ``path`` (``a#b#0``: dict keys and list indices)."""
    node = config
    for part in path.split("#"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


@pytest.mark.parametrize("preset", METHOD_PRESETS)
def test_method_preset_sets_only_keys_the_bundle_reads(preset):
    """Config layering keeps a key that nothing reads without a word, so a misspelt or renamed option would leave
    the method at the bundle's default. Every top-level key a preset sets must override one of the configs it is
    layered on or be referenced by them or by the preset; a nested ``a#b`` key must land in an existing ``a``."""
    own = json.loads(_method(preset).read_text())
    base = [json.loads(f.read_text()) for f in (TRAIN_JSON, CPU_TINY, EVALUATE_JSON)]
    read = set().union(*map(_referenced_ids, [*base, own]))
    for key in set(own) - {"preset_notes"}:
        parent = key.rsplit("#", 1)[0] if "#" in key else None
        if parent is None:
            assert key in read or any(key in config for config in base), f"{preset}: nothing reads {key!r}"
        else:
            assert any(_has_path(config, parent) for config in [*base, own]), f"{preset}: no item {parent!r}"


@pytest.mark.parametrize("preset", CLI_PRESETS)
def test_method_preset_trains_and_evaluates(preset, preset_runs):
    run = preset_runs[preset]
    assert run["train_rc"] == 0, run["train_log"][-4000:]
    assert (run["out"] / "models" / "checkpoint_epoch=1.pt").is_file()
    assert (run["out"] / "models" / "model.pt").is_file()  # validation ran (with the organ mask for TAGS)
    assert run["eval_rc"] == 0, run["eval_log"][-4000:]
    summary = json.loads((run["out"] / "evaluation" / "summary.json").read_text())
    assert summary["num_lesions"] >= 1
    for k in (1, 3, 5, 10):
        assert 0.0 <= summary["metrics"]["overall"][f"dice@{k}"]["mean"] <= 1.0
    assert 1 <= summary["metrics"]["overall"]["noc@85"]["mean"] <= 5
    if preset == "method_tags.json":
        # every evaluated lesion crop was encoded with its organ-mask crop
        assert f"{summary['num_lesions']} lesions; {summary['num_lesions']} with the anatomy prompt" in run["eval_log"]


# ------------------------------------------------------------------------------------------------------------
# Trainable-parameter policy, network options and loss of each preset
# ------------------------------------------------------------------------------------------------------------
# preset -> (groups that train, groups frozen, groups absent)
POLICY = {
    "method_full_finetune.json": ({"image_encoder", "prompt_encoder", "mask_decoder"}, set(), {"sgpm", "extensions"}),
    "method_decoder_only.json": ({"prompt_encoder", "mask_decoder"}, {"image_encoder"}, {"sgpm", "extensions"}),
    "method_sgp_sam.json": ({"prompt_encoder", "mask_decoder", "sgpm"}, {"image_encoder"}, {"extensions"}),
    "method_sgp_sam_no_gate.json": ({"prompt_encoder", "mask_decoder", "sgpm"}, {"image_encoder"}, {"extensions"}),
    "method_sgp_sam_dice_ce.json": ({"prompt_encoder", "mask_decoder", "sgpm"}, {"image_encoder"}, {"extensions"}),
    "method_ma_sam.json": ({"prompt_encoder", "mask_decoder", "extensions"}, {"image_encoder"}, {"sgpm"}),
    "method_tags.json": ({"prompt_encoder", "mask_decoder", "extensions"}, {"image_encoder"}, {"sgpm"}),
}


@pytest.mark.parametrize("preset", METHOD_PRESETS)
def test_preset_training_policy_network_and_loss(preset):
    from scripts.training.losses import ZoomLoss
    from scripts.training.trainable import count_parameters

    parser = _parser(TRAIN_JSON, CPU_TINY, _method(preset), device="$torch.device('cpu')")
    network = parser.get_parsed_content("network")
    counts = count_parameters(network)
    trains, frozen, absent = POLICY[preset]
    for group in trains:
        assert counts[group]["trainable"] == counts[group]["total"] > 0, group
    for group in frozen:
        assert counts[group]["trainable"] == 0 < counts[group]["total"], group
    for group in absent:
        assert group not in counts, group
    extensions = set(network.extensions)
    assert extensions == {"ma_sam": {"ma_sam"}, "tags": {"ma_sam", "tags"}}.get(preset[7:-5], set())
    if network.sgpm is not None:
        expected_mode = "open" if preset == "method_sgp_sam_no_gate.json" else "learned"
        assert network.sgpm.gate_mode == expected_mode

    loss = parser.get_parsed_content("loss")
    assert isinstance(loss, ZoomLoss) == (preset in ("method_sgp_sam.json", "method_sgp_sam_no_gate.json"))
    if preset == "method_ma_sam.json":  # MA-SAM's 0.2 CE + 0.8 Dice
        assert (loss.lambda_ce, loss.lambda_dice) == (0.2, 0.8)
    trainer_args = parser["train#trainer"]
    assert trainer_args["anatomy_key"] == "@anatomy_key"
    assert parser.get_parsed_content("anatomy_key") == ("organ" if preset == "method_tags.json" else None)


def test_defaults_keep_the_plain_sgp_sam_network():
    """train.json's new extension keys default to off: the same modules, parameters and training policy as before."""
    from scripts.modeling import build_sgp_sam

    parser = _parser(TRAIN_JSON, CPU_TINY)
    network = parser.get_parsed_content("network_def")
    reference = build_sgp_sam("tiny", img_size=64, click_map=True, refiner=True)  # cpu_tiny turns both on
    assert len(network.extensions) == 0 and network.sgpm is not None
    assert list(network.state_dict()) == list(reference.state_dict())
    assert parser.get_parsed_content("anatomy_key") is None
    assert parser.get_parsed_content("train#preprocessing").transforms[0].keys == ("image", "label")


# ------------------------------------------------------------------------------------------------------------
# TAGS: anatomy mask and alignment loss in training, the fresh anatomy branch, the anatomy mask in evaluation
# ------------------------------------------------------------------------------------------------------------
def _tags_parser(dataset: Path, tmp_path: Path, **overrides) -> ConfigParser:
    return _parser(
        TRAIN_JSON, CPU_TINY, _method("method_tags.json"),
        dataset_dir=str(dataset), ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"),
        max_epochs=1, iterations_per_epoch=1, num_rounds=2, val_interval=5, device="$torch.device('cpu')",
        **overrides,
    )  # fmt: skip


def test_training_batch_carries_the_organ_mask_around_the_lesions(organ_dataset, tmp_path):
    parser = _tags_parser(organ_dataset, tmp_path)
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    organ, label_all = batch["organ"], batch["label_all"]
    assert organ.shape == batch["image"].shape == (2, 1, 64, 64, 64)
    assert set(torch.unique(organ).tolist()) == {0.0, 1.0}
    assert label_all.sum() > 0 and bool(((organ > 0.5) | (label_all < 0.5)).all())  # lesions lie in the organ
    assert 0.05 < organ.mean() < 0.95  # an organ, not the whole crop


def test_alignment_loss_and_anatomy_enter_the_training_step(organ_dataset, tmp_path):
    parser = _tags_parser(organ_dataset, tmp_path)
    trainer = parser.get_parsed_content("train#trainer")
    network = parser.get_parsed_content("network")
    tags = network.extensions["tags"]
    step = trainer.training_step
    assert tags.align_weight == 1.0 and trainer.anatomy_key == "organ"

    # One trainer iteration: gradient reaches the parameters that only the alignment loss uses (projections into
    # the text space) and those that only the organ mask feeds (anatomy patch embedding, zero at init).
    trainer.run()
    from monai.handlers import from_engine

    assert from_engine(["alignment_loss"], first=True)(trainer.state.output) > 0  # the trainer's output reports it
    assert tags.text_proj.weight.grad is not None and tags.text_proj.weight.grad.abs().max() > 0
    assert tags.anatomy_embed.weight.grad is not None and tags.anatomy_embed.weight.grad.abs().max() > 0

    # The step's loss is the click-round loss plus align_weight x the alignment loss, exactly.
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    images, targets = batch["image"].as_tensor(), batch["label"].as_tensor()
    inputs = {"anatomy": batch["organ"].as_tensor()}
    losses = {}
    for weight in (0.0, 2.5):
        tags.align_weight, step.rng = weight, random.Random(0)
        torch.manual_seed(0)
        losses[weight] = step(images, targets, inputs, {"label_all": batch["label_all"].as_tensor()})[0].item()
        alignment = step.last_extra_losses["alignment_loss"]
    assert alignment > 0
    assert losses[2.5] - losses[0.0] == pytest.approx(2.5 * alignment, rel=1e-4)


def test_fresh_tags_network_from_the_config_equals_the_backbone():
    """TAGS preset (anatomy branch, semantic prompts and cube adapters) freshly built: with an organ mask given,
    the embeddings, masks and IoU predictions equal the plain backbone's with the same backbone weights."""
    from scripts.checkpoint import load_weights

    torch.manual_seed(0)
    tags_net = _parser(TRAIN_JSON, CPU_TINY, _method("method_tags.json")).get_parsed_content("network_def").eval()
    plain = _parser(TRAIN_JSON, CPU_TINY, _method("method_decoder_only.json")).get_parsed_content("network_def").eval()
    with torch.no_grad():
        for name, param in tags_net.named_parameters():  # non-trivial backbone: equality has teeth
            if name.startswith("image_encoder.") and ("rel_pos" in name or name.endswith("qkv.bias")):
                param.normal_(0.0, 0.3)
    load_weights(plain, {k: v for k, v in tags_net.state_dict().items() if not k.startswith("extensions.")})
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 1, 64, 64, 64, generator=g)
    organ = (torch.rand(2, 1, 64, 64, 64, generator=g) > 0.5).float()
    points, labels = torch.randint(0, 64, (2, 2, 3), generator=g).float(), torch.tensor([[1, 0], [1, 0]])
    with torch.no_grad():
        ours = tags_net.encode(images, anatomy=organ)
        theirs = plain.encode(images)
        assert (ours - theirs).abs().max() <= 1e-6
        for a, b in zip(tags_net.decode(ours, points, labels), plain.decode(theirs, points, labels)):
            assert (a - b).abs().max() <= 1e-6
        with torch.no_grad():
            tags_net.extensions["tags"].anatomy_embed.weight.normal_(0.0, 0.5)
        assert (tags_net.encode(images, anatomy=organ) - theirs).abs().max() > 1e-3  # the mask now matters


class RecordingNetwork(torch.nn.Module):
    """Delegates to ``network`` and records what ``encode`` received."""

    def __init__(self, network):
        super().__init__()
        self.network = network
        self.calls = []

    img_size = property(lambda self: self.network.img_size)
    low_res_size = property(lambda self: self.network.low_res_size)

    def encode(self, images, **inputs):
        self.calls.append((images.detach().cpu().clone(), inputs.get("anatomy")))
        return self.network.encode(images, **inputs)

    def decode(self, *args, **kwargs):
        return self.network.decode(*args, **kwargs)

    def upscale_logits(self, *args, **kwargs):
        return self.network.upscale_logits(*args, **kwargs)

    def refine_features(self, *args, **kwargs):
        return self.network.refine_features(*args, **kwargs)

    def full_res_logits(self, *args, **kwargs):
        return self.network.full_res_logits(*args, **kwargs)


def test_evaluation_encodes_each_lesion_crop_with_its_organ_crop(organ_dataset, tmp_path):
    """Every crop the evaluation encodes gets the organ mask cropped at the same place."""
    from scripts.evaluate import evaluate_dataset
    from scripts.data.transforms import crop_at, get_preprocess_transforms, lesion_components, load_datalist, normalise_crop

    items = load_datalist(organ_dataset / "dataset.json", "training")[:2]
    network = _parser(TRAIN_JSON, CPU_TINY, _method("method_tags.json")).get_parsed_content("network_def")
    recorder = RecordingNetwork(network)
    summary = evaluate_dataset(
        recorder, items, tmp_path, max_clicks=2, print_table=False, plot=False, anatomy_key="organ"
    )

    expected = []  # independent crops: the evaluation's crop rule applied to image and organ
    preprocess = get_preprocess_transforms(anatomy_key="organ")
    for item in items:
        data = preprocess(dict(item))
        comps, sizes, boxes = lesion_components(data["label"])
        for k, (lo, hi) in enumerate(boxes):
            start = np.floor((lo + hi) / 2.0 + 0.5).astype(np.int64) - 32
            image = normalise_crop(crop_at(data["image"], start, 64)).as_tensor()[None]
            organ = crop_at(data["organ"], start, 64).as_tensor()[None]
            lesion = torch.as_tensor(crop_at(torch.as_tensor(comps == k + 1)[None].float(), start, 64))[None]
            expected.append((image, organ, lesion.as_tensor() if hasattr(lesion, "as_tensor") else lesion))
    assert len(recorder.calls) == len(expected) == summary["num_lesions"] == summary["anatomy_prompted_crops"] > 0
    for (image, anatomy), (want_image, want_organ, lesion) in zip(recorder.calls, expected):
        assert torch.equal(image, want_image)
        assert anatomy is not None and torch.equal(anatomy.cpu(), want_organ)
        assert bool((anatomy.cpu()[lesion > 0.5] > 0.5).all())  # the lesion is inside the organ mask it got


def test_cases_without_organ_mask_are_encoded_without_it(organ_dataset, tmp_path):
    from scripts.evaluate import evaluate_dataset
    from scripts.data.transforms import load_datalist

    items = [{k: v for k, v in i.items() if k != "organ"} for i in load_datalist(organ_dataset / "dataset.json")][:1]
    network = _parser(TRAIN_JSON, CPU_TINY, _method("method_tags.json")).get_parsed_content("network_def")
    recorder = RecordingNetwork(network)
    summary = evaluate_dataset(
        recorder, items, tmp_path, max_clicks=1, print_table=False, plot=False, anatomy_key="organ"
    )
    assert summary["num_lesions"] > 0 and summary["anatomy_prompted_crops"] == 0
    assert all(anatomy is None for _, anatomy in recorder.calls)


def test_msd_liver_organ_mask_is_liver_with_its_tumours(tmp_path):
    """MSD Task03 + TAGS: the anatomy prompt is labels 1 + 2 (no tumour-shaped hole), the target stays label 2."""
    from test_presets import make_fake_msd

    root = make_fake_msd(tmp_path / "Task03_Liver", "liver", num_cases=3)
    parser = _parser(
        TRAIN_JSON, REPO_ROOT / "configs" / "msd_liver_tumour.json", _method("method_tags.json"),
        dataset_dir=str(root), num_val_cases=1, num_test_cases=1, preset="tiny", **{"preprocessing#roi_size": 32},
    )  # fmt: skip
    assert parser.get_parsed_content("organ#name") == "liver"
    val = parser.get_parsed_content("val_datalist")
    sample = parser.get_parsed_content("validate#preprocessing")(dict(val[0], lesion_index=0))
    source = nib.load(val[0]["label"]).get_fdata()
    assert sample["label"].sum().item() == 64  # the largest tumour only
    assert sample["organ"].sum().item() == (source >= 1).sum()  # the whole liver (14 x 14 x 12) fits the crop
    assert bool((sample["organ"][sample["label_all"] > 0.5] == 1).all())


# ------------------------------------------------------------------------------------------------------------
# Synthetic organ masks
# ------------------------------------------------------------------------------------------------------------
def test_synthetic_organ_masks_are_optional_and_leave_images_unchanged(tmp_path):
    from scripts.data import synthetic_data as sd

    kw = dict(num_train=1, num_val=0, num_test=1, seed=3, shape=SMALL_SHAPE)
    plain_json = sd.generate_dataset(tmp_path / "plain", **kw)
    plain = json.loads(plain_json.read_text())
    assert all("organ" not in item for item in plain["training"] + plain["test"])
    assert not (tmp_path / "plain" / "organsTr").exists() and "organ_masks" not in plain["synthetic"]["params"]

    # Asking for organ masks upgrades the existing synthetic dataset in place; images and labels keep their bytes.
    def image_and_label_files():
        root = tmp_path / "plain"
        return {str(p.relative_to(root)): p.read_bytes() for p in root.glob("[il]*/*.nii.gz")}

    before = image_and_label_files()
    assert len(before) == 4
    sd.ensure_dataset(tmp_path / "plain", organ_masks=True)
    meta = json.loads(plain_json.read_text())
    for item in meta["training"] + meta["test"]:
        assert item["organ"].startswith(("organsTr/", "organsTs/"))
        label = np.asarray(nib.load(tmp_path / "plain" / item["label"]).dataobj)
        organ = np.asarray(nib.load(tmp_path / "plain" / item["organ"]).dataobj)
        assert set(np.unique(organ)) == {0, 1} and label.sum() > 0
        assert bool(organ[label > 0].all())  # organ includes its lesions
        assert 0.05 < organ.mean() < 0.6
    assert image_and_label_files() == before
    assert sd.ensure_dataset(tmp_path / "plain") == str(tmp_path / "plain")  # no organ request: used as is
    assert "organ" in json.loads(plain_json.read_text())["training"][0]


# ------------------------------------------------------------------------------------------------------------
# Transfer study
# ------------------------------------------------------------------------------------------------------------
def _fake_summary(dice5: float) -> dict:
    metric = {"mean": dice5, "std": 0.0, "n": 4}
    overall = {f"dice@{k}": metric for k in (1, 3, 5, 10)} | {"noc@85": metric, "noc@90": metric}
    return {"metrics": {"overall": overall}, "num_lesions": 4, "dice_curve": {"overall": [dice5, dice5]}}


def test_study_aggregates_seeds_and_flags_differences_beyond_noise():
    from experiments.transfer_study import aggregate, format_tables

    values = {"full_finetune": [0.50, 0.52, 0.54], "sgp_sam": [0.70, 0.71, 0.72], "ma_sam": [0.40, 0.60, 0.50]}
    results = [
        {"job": {"method_id": m}, "synthetic": _fake_summary(v)} for m, seeds in values.items() for v in seeds
    ]
    table = aggregate(results, "synthetic")
    mean, std, n = table["sgp_sam"]["dice@5"]
    assert (n, mean, std) == (3, pytest.approx(0.71), pytest.approx(0.01))
    assert table["ma_sam"]["curve_std"] == [pytest.approx(0.1)] * 2
    text = format_tables({"synthetic": table}, {}, list(values))
    assert "| SGP-SAM (SGPM + Zoom Loss) | 3 | – | 71.0 ± 1.0 |" in text
    # +19 points with 2 SE = 2 * sqrt(1^2/3 + 2^2/3) = 2.6: beyond noise; MA-SAM's -2 +- 11.8: not
    assert "| SGP-SAM (SGPM + Zoom Loss) | +19.0 | 2.6 | yes |" in text
    assert "| MA-SAM (3D adapters + FacT) | -2.0 | 11.8 | no |" in text
