"""bundle/configs/multi_gpu_train.json: 2-process DistributedDataParallel on CPU (gloo) through torchrun.

Checks that both ranks trained (each prints a '[ddp] rank r/w finished' line with its iteration count, its share of
the DistributedSampler and a checksum of its parameters: equal checksums mean DDP kept the replicas in sync),
that logging and checkpoints come from rank 0 only, and that the checkpoint has no ``module.`` prefix and loads
into the model.
"""

import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, bundle_env

CONFIGS = "['bundle/configs/train.json','configs/cpu_tiny.json','bundle/configs/multi_gpu_train.json']"
MARKER = re.compile(r"\[ddp\] rank (\d+)/(\d+) finished: iterations=(\d+) samples_per_epoch=(\d+) param_sum=(\S+)")




def _param_sum(model: torch.nn.Module) -> float:
    return sum(p.detach().double().sum().item() for p in model.parameters())


def test_ddp_two_processes_gloo(tmp_path, tiny_dataset):
    from scripts.checkpoint import load_weights, read_checkpoint
    from scripts.modeling import build_sgp_sam

    ckpt_dir, output_dir = tmp_path / "models", tmp_path / "runs"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training", "--config_file", CONFIGS,
        "--max_epochs", "1", "--iterations_per_epoch", "2", "--val_interval", "1",
        "--ckpt_dir", str(ckpt_dir), "--output_dir", str(output_dir), "--dataset_dir", str(tiny_dataset),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=bundle_env(), capture_output=True, text=True, timeout=540)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    # both ranks ran the whole training, each on its half of the 4 training cases
    markers = {int(m[0]): m for m in MARKER.findall(log)}
    assert sorted(markers) == [0, 1], log[-6000:]
    for _, world, iterations, samples, _ in markers.values():
        assert (int(world), int(iterations), int(samples)) == (2, 2, 2)
    # gradients were all-reduced: after two optimiser steps on different data the replicas are still identical
    assert float(markers[0][4]) == pytest.approx(float(markers[1][4]), rel=1e-12, abs=0)

    # logging from rank 0 only: one loss line per iteration, one validation summary (metric all-gathered)
    assert len(re.findall(r"Epoch: 1/1, Iter: 1/2 -- train_loss", log)) == 1
    assert len(re.findall(r"Epoch: 1/1, Iter: 2/2 -- train_loss", log)) == 1
    val_lines = re.findall(r"Key metric: val_dice_5clicks best value: (\S+)", log)
    assert len(val_lines) == 1 and 0.0 <= float(val_lines[0]) <= 1.0
    events = [p.name for p in output_dir.iterdir() if p.name.startswith("events.out.tfevents")]
    assert events and len({name.split(".")[-2] for name in events}) == 1  # one writer process (pid)

    # exactly one checkpoint set, written once
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint_epoch=1.pt", "model.pt"]
    for name in ("checkpoint_epoch=1.pt", "model.pt"):
        raw = read_checkpoint(ckpt_dir / name)
        state = raw["model"] if "optimizer" in raw else raw
        assert state and not any(k.startswith("module.") for k in state), name
        model = build_sgp_sam("tiny", img_size=64, click_map=True, refiner=True)  # as configs/cpu_tiny.json
        report = load_weights(model, ckpt_dir / name)
        assert report["initialised"] == []
        # the saved weights are the DDP-trained ones
        assert _param_sum(model) == pytest.approx(float(markers[0][4]), rel=1e-12, abs=0)
