"""Benchmark the core network: encoder pass naive vs fast padded-window attention (side by side, one run),
decoder time per click with a cached embedding, SGPM cost (gate closed vs open), tiny-preset train step, peak memory,
and the refiner round of the default model's 64^3 crop with and without the oneDNN route for batch-1 convolutions.

    python benchmarks/bench_model.py                      # CPU, sam_med3d preset
    python benchmarks/bench_model.py --device cuda --amp  # GPU (fp16/bf16 autocast)

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident-set increase over the
baseline, sampled every 5 ms by a thread (an upper bound of the tensors' footprint, allocator caches included).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from contextlib import nullcontext

import psutil
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle"))

from scripts.clicks import click_consistent_logits  # noqa: E402
from scripts.modeling import build_sgp_sam  # noqa: E402
from scripts.modeling.common import Conv3d  # noqa: E402


class PeakMemory:
    """Peak memory increase during a block, in MiB."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.proc = psutil.Process()
            self.base = self.proc.memory_info().rss
            self.max_rss = self.base
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.max_rss = max(self.max_rss, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.peak_mib = (self.max_rss - self.base) / 2**20


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def encoder_rows(model, image, device, autocast, args) -> list[tuple[str, str]]:
    """Encoder pass fast vs naive (side by side), peak memory, SGPM gates closed vs open."""
    rows = []

    def encode():
        with torch.inference_mode(), autocast:
            return model.encode(image)

    def set_gate(open_: bool):
        for stage in model.sgpm.stages.values():
            stage.gate.decision_head.bias.data.fill_(10.0 if open_ else -10.0)

    model.image_encoder.set_attention_impl("fast")
    set_gate(False)
    with PeakMemory(device) as mem_fast:
        fast = timed(encode, device, args.repeats)
    rows.append(("encoder pass, fast exact attention (s, median)", f"{statistics.median(fast):.3f}"))
    rows.append(("encoder peak memory, fast (MiB)", f"{mem_fast.peak_mib:.0f}"))
    if not args.skip_naive:
        model.image_encoder.set_attention_impl("naive")
        with PeakMemory(device) as mem_naive:
            naive = timed(encode, device, max(1, args.repeats - 1))
        model.image_encoder.set_attention_impl("fast")
        rows.append(("encoder pass, naive padded 14^3 window (s, median)", f"{statistics.median(naive):.3f}"))
        rows.append(("encoder peak memory, naive (MiB)", f"{mem_naive.peak_mib:.0f}"))
        rows.append(("speed-up naive / fast", f"{statistics.median(naive) / statistics.median(fast):.1f}x"))

    set_gate(True)
    opened = timed(encode, device, args.repeats)
    rows.append(("encoder pass, fast, SGPM gates open (s, median)", f"{statistics.median(opened):.3f}"))
    sgpm_params = sum(p.numel() for p in model.sgpm.parameters())
    encoder_params = sum(p.numel() for p in model.image_encoder.parameters())
    rows.append(("SGPM parameters (% of encoder)", f"{sgpm_params:,} ({100 * sgpm_params / encoder_params:.1f}%)"))
    return rows


def decoder_rows(model, embedding, device, autocast, args) -> tuple[list, list[torch.Tensor]]:
    """Decoder per click on a cached embedding (incl. upsampling) and its peak memory; also returns the clicks."""
    size = model.img_size
    gen = torch.Generator().manual_seed(1)
    clicks = [torch.randint(0, size, (1, 1, 3), generator=gen).float().to(device) for _ in range(args.clicks)]
    labels = torch.ones(1, 1, dtype=torch.long, device=device)
    state = {"i": 0, "prev": torch.zeros(1, 1, *model.low_res_size, device=device)}

    def decode_click():
        with torch.inference_mode(), autocast:
            logits, _ = model.decode(embedding, clicks[state["i"] % len(clicks)], labels, state["prev"])
            state["prev"] = logits.float()
            state["i"] += 1
            return model.upscale_logits(logits.float()) > 0

    with PeakMemory(device) as mem_dec:
        per_click = timed(decode_click, device, args.clicks, warmup=2)
    name = "decoder per click, cached embedding, incl. upsample (ms, median)"
    rows = [(name, f"{1e3 * statistics.median(per_click):.1f}")]
    rows.append(("decoder peak memory (MiB)", f"{mem_dec.peak_mib:.0f}"))
    return rows, clicks


def consistency_row(size: int, clicks: list[torch.Tensor], device, repeats: int) -> tuple[str, str]:
    """Click consistency (default on) per round on a lesion-like mask (a ball of radius 10 voxels plus a second
    blob) with every click so far."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    ball = lambda centre, r: r - ((grid - centre) ** 2).sum(0).sqrt()  # noqa: E731
    lesion_logits = torch.maximum(ball(size / 2, 10.0), ball(size / 5, 4.0))[None, None].to(device)
    all_clicks = torch.cat([torch.full((1, 1, 3), size / 2.0, device=device), *clicks], 1)
    all_labels = torch.zeros(1, all_clicks.shape[1], dtype=torch.long, device=device)
    all_labels[0, 0] = 1
    per_round = timed(lambda: click_consistent_logits(lesion_logits, all_clicks, all_labels), device, repeats)
    name = f"click consistency per round, {all_clicks.shape[1]} clicks (ms, median)"
    return name, f"{1e3 * statistics.median(per_round):.1f}"


def refiner_rows(size: int, device, repeats: int) -> list[tuple[str, str]]:
    """One refiner round (batch 1, the interactive call) with the oneDNN route for single-image CPU convolutions
    and with PyTorch's default route, side by side."""
    torch.manual_seed(2)
    model = build_sgp_sam("tiny", sgpm=False, img_size=size, click_map=True, refiner=True).to(device).eval()
    image = torch.randn(1, 1, size, size, size, device=device)
    points = torch.randint(0, size, (1, 3, 3), device=device).float()
    labels = torch.tensor([[1, 0, 1]], device=device)
    with torch.inference_mode():
        features = model.refine_features(image)
        low, _ = model.decode(model.encode(image), points, labels)
    prev = torch.randn(1, 1, size, size, size, device=device)

    def refine():
        with torch.inference_mode():
            return model.full_res_logits(low, None, features, prev, points, labels)

    rows = []
    for onednn in (True, False):
        Conv3d.single_image_onednn = onednn
        try:
            median = statistics.median(timed(refine, device, max(repeats, 5)))
        finally:
            Conv3d.single_image_onednn = True
        route = "oneDNN route" if onednn else "PyTorch default route"
        rows.append((f"refiner round, {size}^3 crop, batch 1, {route} (ms, median)", f"{1e3 * median:.1f}"))
    return rows


def tiny_step_row(device) -> tuple[str, str]:
    tiny = build_sgp_sam("tiny", sgpm=True).to(device).train()
    x = torch.randn(2, 1, 64, 64, 64, device=device)
    pts = torch.randint(0, 64, (2, 1, 3), device=device).float()
    lab = torch.ones(2, 1, dtype=torch.long, device=device)

    def tiny_step():
        tiny.zero_grad(set_to_none=True)
        tiny(x, pts, lab).float().square().mean().backward()

    median = statistics.median(timed(tiny_step, device, 5))
    return "tiny preset forward+backward, batch 2, 64^3 (s, median)", f"{median:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sam_med3d")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--amp", action="store_true", help="autocast (bf16 on CUDA)")
    parser.add_argument("--skip_naive", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_sgp_sam(args.preset, sgpm=True).to(device).eval()
    image = torch.randn(1, 1, model.img_size, model.img_size, model.img_size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()
    rows = encoder_rows(model, image, device, autocast, args)
    with torch.inference_mode(), autocast:
        embedding = model.encode(image)
    decoder, clicks = decoder_rows(model, embedding, device, autocast, args)
    rows += decoder + [consistency_row(model.img_size, clicks, device, args.clicks), tiny_step_row(device)]
    rows += refiner_rows(64, device, args.repeats)  # the default model's crop

    print(f"# SGP-SAM network benchmark: preset {args.preset}, device {device}, amp {args.amp}")
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    cpu = platform.processor() or platform.machine()
    print(f"# machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}{gpu}")
    print("| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
