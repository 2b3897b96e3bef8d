"""``python -m monai.bundle run training`` as users run it (subprocess, tiny preset): checkpoints, ``--resume``,
``--pretrained_ckpt`` with a SAM-Med3D-format file (strict loading), and the random-initialisation control for the
README command 1 result."""

import json
from pathlib import Path

import pytest
import torch
from test_checkpoint import sam_med3d_style_file

from conftest import run_bundle_cli

TINY = "['bundle/configs/train.json','configs/cpu_tiny.json']"
EVAL = "['bundle/configs/train.json','bundle/configs/evaluate.json','configs/cpu_tiny.json']"


def _train(tmp_path, dataset, *extra, epochs=1):
    return run_bundle_cli(
        "run", "training", "--config_file", TINY,
        "--max_epochs", str(epochs), "--iterations_per_epoch", "2", "--val_interval", "1",
        "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "runs"), "--dataset_dir", str(dataset),
        *extra,
    )  # fmt: skip


def _trainer_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["trainer"]


def test_checkpoints_then_resume_continues(tmp_path, tiny_dataset):
    code, log = _train(tmp_path, tiny_dataset)
    assert code == 0, log[-4000:]
    first = tmp_path / "models" / "checkpoint_epoch=1.pt"
    assert first.is_file() and (tmp_path / "models" / "model.pt").is_file()
    # both files carry the network and preprocessing of configs/cpu_tiny.json (scripts.model_file)
    from scripts.model_file import read_model_file

    model = read_model_file(tmp_path / "models" / "model.pt")
    assert model.kind == "sgp-sam" and model.preprocessing.roi_size == model.network.img_size == 64
    assert model.network.click_map is not None and model.network.refiner is not None and model.network.multi_click
    assert read_model_file(first).description == model.description
    assert _trainer_state(first)["iteration"] == 2  # ignite stores the iteration; epoch = iteration // length
    saved = torch.load(first, map_location="cpu", weights_only=True)
    saved_after_1 = saved["model"]
    assert saved.pop("ema") == {}  # --ema_decay is off; a checkpoint from before that option has no entry at all
    torch.save(saved, first)

    code, log = _train(tmp_path, tiny_dataset, "--resume", "True", epochs=2)
    assert code == 0, log[-4000:]
    assert f"Restored all variables from {first}" in log, log[-4000:]
    assert "Epoch[2] Complete" in log and "Epoch[1] Complete" not in log  # continued, did not start over
    second = tmp_path / "models" / "checkpoint_epoch=2.pt"
    assert second.is_file()
    assert _trainer_state(second)["iteration"] == 4 and _trainer_state(second)["max_epochs"] == 2
    saved_after_2 = torch.load(second, map_location="cpu", weights_only=True)["model"]
    assert any(not torch.equal(saved_after_1[k], saved_after_2[k]) for k in saved_after_1)  # it trained on


def test_weight_average_is_validated_shipped_and_resumed(tmp_path, tiny_dataset):
    code, log = _train(tmp_path, tiny_dataset, "--ema_decay", "0.5")
    assert code == 0, log[-4000:]
    first = torch.load(tmp_path / "models" / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=True)
    assert int(first["ema"]["n_averaged"]) == 2  # one update per iteration
    average = {k[len("module.") :]: v for k, v in first["ema"].items() if k.startswith("module.")}
    best = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    best = best.get("model", best)
    moved = [k for k in average if not torch.equal(average[k], first["model"][k])]
    assert moved  # the average differs from the live weights...
    assert all(torch.equal(best[k], average[k]) for k in average)  # ...and it is what validation chose and saved

    code, log = _train(tmp_path, tiny_dataset, "--ema_decay", "0.5", "--resume", "True", epochs=2)
    assert code == 0, log[-4000:]
    second = torch.load(tmp_path / "models" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    assert int(second["ema"]["n_averaged"]) == 4  # the average carried on from the checkpoint


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tiny_dataset):
    code, log = _train(tmp_path, tiny_dataset, "--resume", "True")
    assert code != 0
    assert "--resume: no 'checkpoint_epoch=*.pt' checkpoint in" in log


def test_pretrained_sam_med3d_checkpoint_loads_strictly(tmp_path, tiny_dataset):
    from scripts.modeling import build_sgp_sam

    torch.manual_seed(123)
    source = build_sgp_sam("tiny", sgpm=False, img_size=64).state_dict()
    ckpt = tmp_path / "sam_med3d_turbo.pth"
    sam_med3d_style_file(ckpt, source)
    # frozen encoder (the default policy): the trained model must still carry the pretrained encoder exactly
    frozen_encoder = "['prompt_encoder','mask_decoder','sgpm']"
    code, log = _train(tmp_path, tiny_dataset, "--pretrained_ckpt", str(ckpt), "--trainable", frozen_encoder)
    assert code == 0, log[-4000:]
    assert f"loaded {len(source)} tensors from {ckpt}" in log
    trained = torch.load(tmp_path / "models" / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=True)["model"]
    encoder_keys = [k for k in source if k.startswith("image_encoder.")]
    assert encoder_keys and all(torch.equal(trained[k], source[k]) for k in encoder_keys)
    decoder_keys = [k for k in source if k.startswith("mask_decoder.")]
    assert any(not torch.equal(trained[k], source[k]) for k in decoder_keys)  # the trainable part did train


@pytest.mark.parametrize("corruption", ["shape", "missing"])
def test_pretrained_checkpoint_mismatch_names_the_key(tmp_path, tiny_dataset, corruption):
    from scripts.modeling import build_sgp_sam

    state = build_sgp_sam("tiny", sgpm=False, img_size=64).state_dict()
    key = "mask_decoder.iou_token.weight"
    if corruption == "shape":
        state[key] = torch.zeros(2, 7)
    else:
        del state[key]
    ckpt = tmp_path / "bad.pth"
    sam_med3d_style_file(ckpt, state)
    code, log = _train(tmp_path, tiny_dataset, "--pretrained_ckpt", str(ckpt))
    assert code != 0
    assert key in log
    assert not (tmp_path / "models" / "checkpoint_epoch=1.pt").exists()


def test_random_initialisation_scores_far_below_the_quickstart_target(tmp_path):
    """The control for README command 1's "Dice@5 >= 0.70": untrained weights on the same held-out synthetic test
    split (the default dataset) must score far lower, so the target measures learning, not the click protocol."""
    from scripts.data.synthetic_data import ensure_dataset

    from conftest import BUNDLE_ROOT

    dataset = ensure_dataset(BUNDLE_ROOT / "data" / "synthetic_lesions")
    code, log = run_bundle_cli(
        "run", "evaluating", "--config_file", EVAL, "--ckpt_path", "null", "--dataset_dir", str(dataset),
        "--eval_output_dir", str(tmp_path / "eval"), "--max_clicks", "5",
    )  # fmt: skip
    assert code == 0, log[-4000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["num_lesions"] >= 10
    assert 0.0 <= summary["mean_dice@5"] < 0.35, summary["mean_dice@5"]


FINETUNE = (
    "['bundle/configs/train.json','bundle/configs/evaluate.json',"
    "'configs/cpu_tiny.json','configs/cpu_tiny_finetune.json']"
)


def test_shipped_pretrained_checkpoint_is_a_learned_model(tmp_path):
    """README command 1 fine-tunes bundle/models/pretrained/sgp_sam_default.pt: it must load completely
    (backbone, SGPM, click map, refiner) into the fine-tune preset's network through the weights-only loader, and
    score far above the random-initialisation control on held-out test lesions without any fine-tuning."""
    from monai.bundle import ConfigParser
    from scripts.checkpoint import load_weights
    from scripts.data.synthetic_data import ensure_dataset

    from conftest import BUNDLE_ROOT, REPO_ROOT

    parser = ConfigParser()
    training_configs = [p for p in json.loads(FINETUNE.replace("'", '"')) if not p.endswith("evaluate.json")]
    parser.read_config([str(REPO_ROOT / p) for p in training_configs])
    ckpt = parser.get_parsed_content("pretrained_ckpt")
    assert ckpt.endswith("sgp_sam_default.pt")
    report = load_weights(parser.get_parsed_content("network_def"), ckpt)
    assert report["initialised"] == []  # every tensor of the network comes from the file

    dataset = Path(ensure_dataset(BUNDLE_ROOT / "data" / "synthetic_lesions"))
    items = json.loads((dataset / "dataset.json").read_text())["test"][:3]
    datalist = tmp_path / "three_test_cases.json"
    datalist.write_text(json.dumps({"test": [{k: str(dataset / v) for k, v in item.items()} for item in items]}))
    code, log = run_bundle_cli(
        "run", "evaluating", "--config_file", FINETUNE, "--ckpt_path", ckpt, "--dataset_dir", str(dataset),
        "--eval_datalist", str(datalist), "--eval_output_dir", str(tmp_path / "eval"), "--max_clicks", "5",
    )  # fmt: skip
    assert code == 0, log[-4000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["num_lesions"] >= 6
    assert summary["mean_dice@5"] > 0.25, summary["mean_dice@5"]  # the random-initialisation control scores < 0.01
