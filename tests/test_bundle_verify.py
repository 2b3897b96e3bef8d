"""Bundle metadata and MONAI's bundle tools: verify_metadata (offline schema copy), versions and changelog,
verify_net_in_out, the logging config under MONAI 1.6's restricted rules, TorchScript refused, the torch.export
route."""

import copy
import json
import re

import pytest
import torch

from conftest import REPO_ROOT, run_bundle_cli

CONFIGS = REPO_ROOT / "bundle" / "configs"
META = CONFIGS / "metadata.json"
SCHEMA = REPO_ROOT / "bundle" / "docs" / "meta_schema.json"
LOGGING = CONFIGS / "logging.conf"
TINY = "['bundle/configs/train.json','configs/cpu_tiny.json']"


# ------------------------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------------------------
def test_verify_metadata_offline():
    code, log = run_bundle_cli("verify_metadata", "--meta_file", str(META), "--filepath", str(SCHEMA))
    assert code == 0, log[-3000:]
    assert "skipped downloading" in log  # the repository copy is used: no network access
    assert "metadata is verified with no error" in log


@pytest.mark.parametrize(
    "broken",
    [
        lambda m: m.pop("network_data_format"),
        lambda m: m.pop("required_packages_version"),
        lambda m: m["network_data_format"]["inputs"]["image"].pop("value_range"),
        lambda m: m["network_data_format"]["outputs"]["pred"].update(num_channels="one"),
    ],
)
def test_schema_copy_rejects_incomplete_metadata(tmp_path, broken):
    from monai.bundle import verify_metadata

    meta = json.loads(META.read_text())
    bad = copy.deepcopy(meta)
    broken(bad)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="Failed validating"):
        verify_metadata(meta_file=str(tmp_path / "bad.json"), filepath=str(SCHEMA))


def test_metadata_matches_the_bundle():
    meta = json.loads(META.read_text())
    train = json.loads((CONFIGS / "train.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    roi_size = train["preprocessing"]["roi_size"]
    assert image["spatial_shape"] == [roi_size] * 3 and image["num_channels"] == 1
    assert pred["spatial_shape"] == [roi_size // 4] * 3 and pred["num_channels"] == 1
    assert meta["schema"].startswith("https://") and meta["schema"].endswith(".json")


def _semver(version: str) -> tuple[int, int, int]:
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"not MAJOR.MINOR.PATCH: {version!r}"
    return tuple(int(part) for part in version.split("."))


def _requirements() -> dict:
    """requirements.txt as {lower-case name: packaging Requirement}."""
    from packaging.requirements import Requirement

    lines = (line.split("#")[0].strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines())
    return {req.name.lower(): req for req in map(Requirement, filter(None, lines))}


def _pin(requirement) -> str:
    (spec,) = requirement.specifier
    assert spec.operator == "==", requirement
    return spec.version


def test_metadata_version_is_the_newest_changelog_entry_and_pins_match_requirements():
    meta = json.loads(META.read_text())
    releases = list(meta["changelog"])
    assert releases[0] == meta["version"]  # the newest entry comes first and is the bundle's version
    assert [_semver(r) for r in releases] == sorted((_semver(r) for r in releases), reverse=True)
    assert all(meta["changelog"][r].strip() for r in releases)
    requirements = _requirements()
    assert meta["monai_version"] == _pin(requirements["monai"])
    assert meta["pytorch_version"] == _pin(requirements["torch"])
    assert meta["supported_apps"]["monai-label"] == _pin(requirements["monailabel"])
    assert requirements["numpy"].specifier.contains(meta["numpy_version"])


# ------------------------------------------------------------------------------------------------------------
# network input / output
# ------------------------------------------------------------------------------------------------------------
def test_verify_net_in_out_tiny_cli():
    code, log = run_bundle_cli(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        str(META),
        "--config_file",
        TINY,
        "--device",
        "cpu",
        "--_meta_#network_data_format#inputs#image#spatial_shape",
        "[64,64,64]",
    )
    assert code == 0, log[-3000:]
    assert "data shape of network is verified with no error" in log


@pytest.mark.parametrize("overlays, side", [(["configs/cpu_tiny.json"], 64), ([], 128)])
def test_network_output_shape_matches_metadata(overlays, side):
    """verify_net_in_out checks channels and dtype; this also checks the low-res output shape (S/4 for S=128)."""
    from monai.bundle import ConfigParser, verify_net_in_out

    configs = [str(CONFIGS / "train.json"), *[str(REPO_ROOT / o) for o in overlays]]
    shape = {"_meta_#network_data_format#inputs#image#spatial_shape": [side] * 3}
    verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=configs, device="cpu", **shape)
    parser = ConfigParser()
    parser.read_config(configs)
    parser.read_meta(str(META))
    net = parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        out = net(torch.rand(1, 1, side, side, side))
    assert list(out.shape[2:]) == parser["_meta_#network_data_format#outputs#pred#spatial_shape"] == [32, 32, 32]


# ------------------------------------------------------------------------------------------------------------
# logging.conf
# ------------------------------------------------------------------------------------------------------------
def test_logging_conf_passes_monai_restrictions():
    from monai.bundle.workflows import _reject_executable_logging_config

    assert "[handler_consoleHandler]" in _reject_executable_logging_config(str(LOGGING))


def test_training_run_with_logging_file(tmp_path, tiny_dataset):
    code, log = run_bundle_cli(
        "run", "training", "--config_file", TINY, "--logging_file", str(LOGGING),
        "--max_epochs", "1", "--iterations_per_epoch", "1",
        "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "runs"), "--dataset_dir", str(tiny_dataset),
    )  # fmt: skip
    assert code == 0, log[-4000:]
    assert f"Setting logging properties based on config: {LOGGING}" in log
    assert "train_loss" in log
    assert (tmp_path / "models" / "checkpoint_epoch=1.pt").is_file()


# ------------------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------------------
def _tiny_network(seed=0):
    from scripts.modeling import build_sgp_sam

    torch.manual_seed(seed)
    net = build_sgp_sam("tiny", img_size=64, click_map=True, refiner=True)  # as configs/cpu_tiny.json
    torch.nn.init.normal_(net.click_map.out_proj.weight, std=0.2)  # zero-initialised too: make it count
    torch.nn.init.normal_(net.refiner.out[1].weight, std=0.2)
    stages = list(net.sgpm.stages.values())
    for stage in stages:  # give the fusion blocks an effect (they are zero-initialised)
        torch.nn.init.normal_(stage.fusion.out_proj.weight, std=0.2)
    # one gate shut, one open: the hard gate must behave the same in the exported program
    torch.nn.init.constant_(stages[0].gate.decision_head.bias, -8.0)
    torch.nn.init.constant_(stages[1].gate.decision_head.bias, 8.0)
    return net.eval()


def test_torchscript_export_is_refused_without_writing_a_file(tmp_path):
    """``ckpt_export`` (``torch.jit.script``) cannot compile the encoder (tuple-typed helpers, block hooks, optional
    sub-modules), so it must fail loudly and leave no file a user could mistake for a model. The supported export
    route is ``scripts.export`` (torch.export), tested below. If TorchScript starts to work, this test fails: then
    check the exported module against eager and update the model card's Export section."""
    from monai.bundle import ckpt_export

    net = _tiny_network()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    target = tmp_path / "model.ts"
    with pytest.raises(RuntimeError):
        ckpt_export(
            net_id="network_def",
            filepath=str(target),
            ckpt_file=str(tmp_path / "model.pt"),
            meta_file=str(META),
            config_file=[str(CONFIGS / "train.json"), str(REPO_ROOT / "configs" / "cpu_tiny.json")],
        )
    assert not target.exists()


def test_torch_export_matches_eager(tmp_path):
    from scripts.export import compare_with_eager, export_encoder_decoder, load_exported

    net = _tiny_network()
    paths = export_encoder_decoder(net, tmp_path / "exported", max_points=8)
    assert all(p.is_file() for p in paths.values())
    info = json.loads(paths["info"].read_text())
    assert info["low_res_shape"] == [1, 1, 32, 32, 32] and info["img_size"] == 64

    # the eager model really has one gate shut and one open on this kind of input
    net.sgpm.reset_counters()
    with torch.no_grad():
        net.encode(torch.randn(1, 1, 64, 64, 64))
    assert [s.fusion_calls for s in net.sgpm.stages.values()] == [0, 1]

    diffs = compare_with_eager(net, tmp_path / "exported", num_points=(1, 3, 8))
    assert {"refined_1clicks", "refined_3clicks", "refined_8clicks"} <= set(diffs)
    assert max(diffs.values()) <= 1e-4, diffs
    assert info["refine"] == "refine.pt2" and paths["refine"].is_file()
    # the comparison catches a wrong export: the programs of this network against another network's weights
    wrong = compare_with_eager(_tiny_network(seed=1), tmp_path / "exported", num_points=(1,))
    assert wrong["embedding"] > 1e-2 and wrong["refined_1clicks"] > 1e-2, wrong

    encode, decode = load_exported(tmp_path / "exported")
    emb = encode(torch.randn(1, 1, 64, 64, 64))
    with pytest.raises(Exception):  # beyond the exported dynamic range of clicks
        decode(emb, torch.zeros(1, 9, 3), torch.ones(1, 9, dtype=torch.long), torch.zeros(1, 1, 32, 32, 32))


def test_export_cli(tmp_path):
    """The exported network and preprocessing are the model file's: no config is needed or consulted."""
    from scripts.export import main
    from scripts.model_file import save_model_file

    net = _tiny_network(seed=1)
    preprocessing = {"spacing": 1.0, "roi_size": 64, "image_channel": None, "ct_clamp": True, "normalisation": "robust"}
    save_model_file(net, preprocessing, tmp_path / "model.pt")
    result = main(
        ["--ckpt_file", str(tmp_path / "model.pt"), "--output_dir", str(tmp_path / "out"), "--max_points", "4"]
    )
    assert (tmp_path / "out" / "encode.pt2").is_file() and (tmp_path / "out" / "decode.pt2").is_file()
    assert max(result["diffs"].values()) <= 1e-4  # the file's weights and refiner, not a random config network
    assert json.loads((tmp_path / "out" / "export_info.json").read_text())["preprocessing"] == preprocessing
    assert max(result["diffs"].values()) <= 1e-5
