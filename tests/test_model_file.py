"""The model file (scripts/model_file.py): weights + the network and preprocessing they were trained with, read back
weights-only; SAM-Med3D release files recognised by their keys; anything else refused with a reason."""

import argparse

import numpy as np
import pytest
import torch
from scripts.baselines.ma_sam import MASAMConfig
from scripts.model_file import (
    UPSTREAM_PREPROCESSING,
    ModelDescription,
    ModelFileError,
    Preprocessing,
    default_model_path,
    read_description,
    read_model_file,
    same_model,
    save_model_file,
)
from scripts.modeling import build_sgp_sam

from conftest import BUNDLE_ROOT, SAM_MED3D_KEYS

ROBUST_64 = {"spacing": 1.25, "roi_size": 64, "image_channel": 2, "ct_clamp": True, "normalisation": "robust"}


def _tiny(**options):
    torch.manual_seed(0)
    return build_sgp_sam("tiny", click_map=True, refiner=True, multi_click=True, **options).eval()


def test_round_trip_rebuilds_exactly_the_saved_network(tmp_path):
    network = _tiny(extensions=[MASAMConfig(adapter_dim=8, fact_rank=4)], gate_threshold=0.4)
    path = save_model_file(network, ROBUST_64, tmp_path / "model.pt")

    # plain content only: torch's weights-only reader needs no allow-list
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"model", "sgpsam_model"}
    network_entry = raw["sgpsam_model"]["network"]
    assert network_entry["preset"] == "tiny" and network_entry["sgpm"]["gate_threshold"] == 0.4
    assert network_entry["clicks"] == {
        "click_map": True,
        "refiner": True,
        "refiner_context": "local",
        "refiner_geodesic": False,
        "click_consistent": True,
        "multi_click": True,
    }
    assert network_entry["extensions"] == [
        {
            "_target_": "scripts.baselines.ma_sam.MASAMConfig",
            "adapter_dim": 8,
            "adapter_kernel": "depth",
            "fact_rank": 4,
        }
    ]

    model = read_model_file(path)
    assert model.kind == "sgp-sam" and model.preprocessing == Preprocessing(**ROBUST_64)
    rebuilt = model.network
    assert rebuilt.multi_click and rebuilt.refiner is not None and "ma_sam" in rebuilt.extensions
    assert rebuilt.sgpm.threshold == 0.4
    image = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode(image), network.encode(image), rtol=0, atol=0)
    assert same_model(read_description(path), model.description)


def test_half_precision_file_loads_into_float32(tmp_path):
    network = _tiny()
    path = save_model_file(network, {**ROBUST_64, "image_channel": None}, tmp_path / "half.pt", half=True)
    raw = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert all(v.dtype == torch.float16 for v in raw.values() if v.is_floating_point())
    loaded = read_model_file(path).network
    weight = "mask_decoder.iou_token.weight"
    assert loaded.state_dict()[weight].dtype == torch.float32
    torch.testing.assert_close(loaded.state_dict()[weight], network.state_dict()[weight].half().float())


def _sam_med3d_release(path):
    """A file laid out as SAM-Med3D saves it, with exactly its keys and shapes; each tensor is one value broadcast
    to its shape (stride 0), so the file stays a few kB while the shapes are the real ones."""
    shapes = {}
    for line in SAM_MED3D_KEYS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            shapes[key] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    state = {k: torch.full((1,), 0.01).expand(s) for k, s in shapes.items()}
    args = argparse.Namespace(model_type="vit_b_ori", img_size=128)
    torch.save({"model_state_dict": state, "args": args, "best_dice": np.float64(0.8)}, path)
    return shapes


def test_sam_med3d_release_gets_the_upstream_preset_and_preprocessing(tmp_path):
    path = tmp_path / "sam_med3d_turbo.pth"
    shapes = _sam_med3d_release(path)
    description = read_description(path)
    assert description["network"]["preset"] == "sam_med3d" and description["network"]["sgpm"] is None
    assert description["preprocessing"] == UPSTREAM_PREPROCESSING.as_dict()
    assert UPSTREAM_PREPROCESSING.as_dict() == {
        "spacing": 1.5, "roi_size": 128, "image_channel": None, "ct_clamp": False, "normalisation": "upstream"
    }  # fmt: skip

    model = read_model_file(path)
    assert model.kind == "sam_med3d" and model.preprocessing == UPSTREAM_PREPROCESSING
    assert model.network.sgpm is None and model.network.img_size == 128 and not model.network.multi_click
    assert {k: tuple(v.shape) for k, v in model.network.state_dict().items()} == shapes

    # one key missing: not SAM-Med3D's set any more, and no description either
    state = torch.load(path, weights_only=False)["model_state_dict"]
    state.pop("mask_decoder.iou_token.weight")
    torch.save({"model_state_dict": state}, tmp_path / "cut.pth")
    with pytest.raises(ModelFileError, match="neither an SGP-SAM model file .* nor a SAM-Med3D release file"):
        read_model_file(tmp_path / "cut.pth")


def test_files_without_description_are_refused_with_a_reason(tmp_path):
    torch.save(_tiny().state_dict(), tmp_path / "weights_only.pt")
    for reader in (read_model_file, read_description):
        with pytest.raises(ModelFileError, match="describe_model_file.py"):
            reader(tmp_path / "weights_only.pt")
    path = save_model_file(_tiny(), ROBUST_64, tmp_path / "model.pt")
    content = torch.load(path, weights_only=True)
    content["model"].pop(sorted(content["model"])[0])
    torch.save(content, tmp_path / "short.pt")
    with pytest.raises(ModelFileError, match="do not fit the network it describes: missing keys"):
        read_model_file(tmp_path / "short.pt")
    content["sgpsam_model"]["format_version"] = 99
    torch.save(content, tmp_path / "future.pt")
    with pytest.raises(ModelFileError, match="unknown model file format"):
        read_model_file(tmp_path / "future.pt")


def test_description_is_checked_when_built():
    network = _tiny()
    with pytest.raises(ModelFileError, match="roi_size 128 differs from the network's crop size 64"):
        ModelDescription(network, {**ROBUST_64, "roi_size": 128})
    with pytest.raises(ModelFileError, match="normalisation must be one of"):
        ModelDescription(network, {**ROBUST_64, "normalisation": "zscore"})
    with pytest.raises(ModelFileError, match="unknown preprocessing keys"):
        ModelDescription(network, {**ROBUST_64, "window": [0, 80]})
    network.extension_configs = (lambda model: None,)
    with pytest.raises(ModelFileError, match="cannot be recorded in a model file"):
        ModelDescription(network, ROBUST_64)
    with pytest.raises(ModelFileError, match="not built by scripts.modeling.build_network"):
        ModelDescription(torch.nn.Linear(2, 2), ROBUST_64)


def test_shipped_default_model_is_a_model_file():
    """What the app serves without --conf and inference.json uses by default."""
    from monai.bundle import ConfigParser

    path = default_model_path(BUNDLE_ROOT)
    assert path.endswith("sgp_sam_default.pt")
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    assert parser.get_parsed_content("ckpt_path") == path
    description = read_description(path)
    assert description["preprocessing"]["roi_size"] == description["network"]["sizes"]["img_size"]
    assert read_model_file(path).network.img_size == description["preprocessing"]["roi_size"]


def test_a_file_from_before_a_click_switch_is_the_same_model_as_one_with_its_default(tmp_path):
    """The shipped file predates ``refiner_context`` and ``refiner_geodesic``: the app must still accept a model it
    trains from it."""
    path = save_model_file(_tiny(), ROBUST_64, tmp_path / "model.pt")
    now = read_description(path)
    older = {**now, "network": {**now["network"], "clicks": dict(now["network"]["clicks"])}}
    del older["network"]["clicks"]["refiner_context"]
    del older["network"]["clicks"]["refiner_geodesic"]
    assert same_model(older, now)
    wider = {**now, "network": {**now["network"], "clicks": {**now["network"]["clicks"], "refiner_context": "crop"}}}
    assert not same_model(wider, now)
    geodesic = {**now, "network": {**now["network"], "clicks": {**now["network"]["clicks"], "refiner_geodesic": True}}}
    assert not same_model(geodesic, now)
