"""bundle/configs/multi_gpu_train.json: 2-process DistributedDataParallel on CPU (gloo) through torchrun.

Checks that both ranks trained the whole run on their half of the data with replicas kept in sync (a test-only
overlay makes each rank save its weights, iteration count and sampler share when the workflow finalises), that
logging and checkpoints come from rank 0 only, and that the checkpoint holds the DDP-trained weights without a
``module.`` prefix and loads into the model.
"""

import json
import re
import subprocess
import sys

import torch
from conftest import REPO_ROOT, bundle_env

CONFIGS = ["bundle/configs/train.json", "configs/cpu_tiny.json", "bundle/configs/multi_gpu_train.json"]


def _probe_overlay(tmp_path) -> str:
    """A config layered last: at ``finalize`` every rank saves what it trained (the shipped config prints nothing)."""
    weights = "{k: v.detach().cpu() for k, v in @network.state_dict().items()}"
    probe = {
        "finalize": [
            "$torch.save({'iteration': @train#trainer.state.iteration, 'samples': len(@train#sampler), "
            f"'world': int(os.environ['WORLD_SIZE']), 'model': {weights}}}, "
            f"os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'] + '.pt'))",
            "$torch.distributed.is_initialized() and torch.distributed.destroy_process_group()",
        ]
    }
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe))
    return str(path)


def test_ddp_two_processes_gloo(tmp_path, tiny_dataset):
    from scripts.checkpoint import load_weights, read_checkpoint
    from scripts.modeling import build_sgp_sam

    ckpt_dir, output_dir = tmp_path / "models", tmp_path / "runs"
    configs = str([*CONFIGS, _probe_overlay(tmp_path)])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training", "--config_file", configs,
        "--max_epochs", "1", "--iterations_per_epoch", "2", "--val_interval", "1",
        "--ckpt_dir", str(ckpt_dir), "--output_dir", str(output_dir), "--dataset_dir", str(tiny_dataset),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=bundle_env(), capture_output=True, text=True, timeout=540)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "param_sum" not in log  # the shipped config prints no test checksum

    # both ranks ran the whole training, each on its half of the 4 training cases
    ranks = [torch.load(tmp_path / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in (0, 1)]
    for probe in ranks:
        assert (probe["world"], probe["iteration"], probe["samples"]) == (2, 2, 2)
    # gradients were all-reduced: after two optimiser steps on different data the replicas are still identical
    assert all(torch.equal(ranks[0]["model"][k], ranks[1]["model"][k]) for k in ranks[0]["model"])

    # logging from rank 0 only: one loss line per iteration, one validation summary (metric all-gathered)
    assert len(re.findall(r"Epoch: 1/1, Iter: 1/2 -- train_loss", log)) == 1
    assert len(re.findall(r"Epoch: 1/1, Iter: 2/2 -- train_loss", log)) == 1
    val_lines = re.findall(r"Key metric: val_dice_5clicks best value: (\S+)", log)
    assert len(val_lines) == 1 and 0.0 <= float(val_lines[0]) <= 1.0
    events = [p.name for p in output_dir.iterdir() if p.name.startswith("events.out.tfevents")]
    assert events and len({name.split(".")[-2] for name in events}) == 1  # one writer process (pid)

    # exactly one checkpoint set, written once, holding the DDP-trained weights
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint_epoch=1.pt", "model.pt"]
    trained = ranks[0]["model"]
    for name in ("checkpoint_epoch=1.pt", "model.pt"):
        raw = read_checkpoint(ckpt_dir / name)
        state = raw["model"] if "optimizer" in raw else raw
        assert state and not any(k.startswith("module.") for k in state), name
        model = build_sgp_sam("tiny", img_size=64, click_map=True, refiner=True)  # as configs/cpu_tiny.json
        report = load_weights(model, ckpt_dir / name)
        assert report["initialised"] == []
        assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained), name
