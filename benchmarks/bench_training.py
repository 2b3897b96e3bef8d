"""Training throughput and peak memory of the bundle's real trainer (train.json + a preset), e.g. the issue's
reference setting: ``sam_med3d`` preset, 128^3 crops, batch 2, AMP, frozen image encoder.

The trainer, loss, optimiser and data pipeline are the bundle's own (parsed from the configs as
``python -m monai.bundle run training`` does); only the number of iterations is capped. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` over the timed iterations; on CPU the peak resident-set size of the process.

    python benchmarks/bench_training.py --device cuda:0                              # GPU reference setting
    python benchmarks/bench_training.py --device cpu --iterations 3 --num_rounds 2    # CPU (slow: ~100 GFLOP/pass)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bundle"))

from ignite.engine import Events  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sam_med3d")
    parser.add_argument("--roi_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=11, help="click rounds per sample (SAM-Med3D: 11)")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no_amp", action="store_true")
    parser.add_argument("--train_image_encoder", action="store_true", help="default: frozen encoder")
    parser.add_argument("--raw_masks", action="store_true", help="click_consistent off (default on, as train.json)")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations (after 2 warm-up ones)")
    parser.add_argument("--dataset_dir", default=None, help="default: a small generated synthetic dataset")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sgpsam_bench_train_"))
    config = ConfigParser()
    config.read_config(str(REPO_ROOT / "bundle" / "configs" / "train.json"))
    overrides = {
        "preset": args.preset,
        "preprocessing#roi_size": args.roi_size,
        "batch_size": args.batch_size,
        "num_rounds": args.num_rounds,
        "amp": not args.no_amp,
        "device": f"$torch.device('{args.device}')",
        "trainable": ["image_encoder"] * args.train_image_encoder + ["prompt_encoder", "mask_decoder", "sgpm"],
        "network_def#click_consistent": not args.raw_masks,
        "num_workers": 2,
        "max_epochs": 1,
        "iterations_per_epoch": args.iterations + 2,
        "ckpt_dir": str(work / "models"),
        "output_dir": str(work / "runs"),
        "dataset_dir": args.dataset_dir or str(work / "data"),
        "train#handlers": [],  # no validation, logging or LR handlers in the timed loop
    }
    for key, value in overrides.items():
        config[key] = value
    if args.dataset_dir is None:
        from scripts.data.synthetic_data import generate_dataset

        generate_dataset(work / "data", num_train=4, num_val=1, num_test=1)

    trainer = config.get_parsed_content("train#trainer")
    device = torch.device(args.device)
    stamps: list[float] = []
    peak_rss = [psutil.Process().memory_info().rss]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stamp(engine) -> None:
        sync()
        stamps.append(time.perf_counter())
        peak_rss[0] = max(peak_rss[0], psutil.Process().memory_info().rss)
        if engine.state.iteration == 2 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    trainer.run()
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # iterations 3.. (two warm-up iterations)
    per_iter = statistics.median(steps)
    trainable = sum(p.numel() for p in trainer.network.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.network.parameters())

    print(f"# SGP-SAM training benchmark: preset {args.preset}, {args.roi_size}^3, batch {args.batch_size}, "
          f"{args.num_rounds} click rounds, amp {not args.no_amp}, click_consistent {not args.raw_masks}, "
          f"device {device}")  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# machine: {name}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print("| measurement | value |\n|---|---|")
    print(f"| trainable / total parameters | {trainable:,} / {total:,} |")
    print(f"| time per iteration (median of {len(steps)}) | {per_iter:.3f} s |")
    print(f"| throughput | {args.batch_size / per_iter:.2f} samples/s |")
    if device.type == "cuda":
        print(f"| peak GPU memory allocated | {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB |")
        print(f"| peak GPU memory reserved | {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB |")
    print(f"| peak process RSS | {peak_rss[0] / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
