"""Safe checkpoint loading: SAM-Med3D's wrapped format, plain state dicts, clear errors, refused pickles."""

import argparse
import os

import numpy as np
import pytest
import torch

from scripts.checkpoint import CheckpointError, load_weights, read_checkpoint, save_sgp_sam_checkpoint
from scripts.modeling import build_sgp_sam


def sam_med3d_style_file(path, state_dict, prefix=""):
    """A file laid out like SAM-Med3D's training script saves it (args Namespace, optimiser state, numpy scalars)."""
    args = argparse.Namespace(task_name="turbo", model_type="vit_b_ori", lr=8e-4, img_size=128, multi_gpu=False)
    torch.save(
        {
            "epoch": 199,
            "model_state_dict": {prefix + k: v for k, v in state_dict.items()},
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 8e-4, "params": [0, 1]}]},
            "lr_scheduler_state_dict": {"last_epoch": 199},
            "losses": [np.float64(0.5), np.float64(0.4)],
            "dices": [np.float32(0.8)],
            "best_loss": np.float64(0.4),
            "best_dice": 0.81,
            "args": args,
            "used_datas": ["a", "b"],
        },
        path,
    )


def test_wrapped_sam_med3d_file_loads_strictly_into_sgp_sam(tmp_path):
    torch.manual_seed(0)
    source = build_sgp_sam("tiny", sgpm=False)
    path = tmp_path / "sam_med3d_turbo.pth"
    sam_med3d_style_file(path, source.state_dict())
    model = build_sgp_sam("tiny", sgpm=True)
    report = load_weights(model, path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert report["initialised"] and all(k.startswith("sgpm.") for k in report["initialised"])


def test_module_prefix_is_stripped_and_plain_state_dict_accepted(tmp_path):
    source = build_sgp_sam("tiny", sgpm=False)
    path = tmp_path / "ddp.pth"
    sam_med3d_style_file(path, source.state_dict(), prefix="module.")
    model = build_sgp_sam("tiny", sgpm=False)
    load_weights(model, path)
    assert torch.equal(model.prompt_encoder.no_mask_embed.weight, source.prompt_encoder.no_mask_embed.weight)
    plain = tmp_path / "plain.pt"
    torch.save(source.state_dict(), plain)
    load_weights(build_sgp_sam("tiny", sgpm=False), plain)


def test_wrong_shape_and_missing_key_are_named(tmp_path):
    state = build_sgp_sam("tiny", sgpm=False).state_dict()
    bad_shape = dict(state)
    bad_shape["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    torch.save(bad_shape, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"mask_decoder\.iou_token\.weight: checkpoint \(1, 7\)"):
        load_weights(build_sgp_sam("tiny", sgpm=False), tmp_path / "shape.pt")
    missing = dict(state)
    del missing["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: prompt_encoder\.pe_layer\.positional_encoding"):
        load_weights(build_sgp_sam("tiny", sgpm=False), tmp_path / "missing.pt")
    # The full-size model refuses a tiny checkpoint, listing mis-shaped keys.
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_weights(build_sgp_sam("tiny", sgpm=False, embed_dim=48, num_heads=2), plain_file(tmp_path, state))


def plain_file(tmp_path, state):
    path = tmp_path / "plain_tiny.pt"
    torch.save(state, path)
    return path


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_callable_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {}, "args": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_checkpoint(path)
    assert not marker.exists()


def test_corrupt_and_absent_files_give_clear_errors(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint|refused"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pth")


def test_own_sgp_sam_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    model = build_sgp_sam("tiny", sgpm=True)
    for stage in model.sgpm.stages.values():
        torch.nn.init.normal_(stage.fusion.out_proj.weight)
    path = tmp_path / "sgp_sam.pt"
    save_sgp_sam_checkpoint(model, path, epoch=3)
    fresh = build_sgp_sam("tiny", sgpm=True)
    report = load_weights(fresh, path)
    assert report["initialised"] == []
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    # An SGP-SAM checkpoint does not silently load into a model without SGPM.
    with pytest.raises(CheckpointError, match=r"unexpected keys: sgpm\."):
        load_weights(build_sgp_sam("tiny", sgpm=False), path)
