"""How much of a refiner model's mask comes from the ViT path (encoder, SGPM, prompt encoder, mask decoder)?

The refiner reads the image itself and adds a residual to the decoder's upsampled logits. This script measures,
per lesion size, (1) the decoder's first-click logits: their median over the crop, their spread (the 90th minus
the 10th percentile) and how far the lesion stands out (median inside the lesion minus median outside), and the
size of the served first mask (equivalent diameter in voxels of its part that holds the click), and
(2) Dice after clicks 1, 3 and 5 of the evaluation protocol when the refiner gets the decoder's logits as they are,
with the spatial pattern removed (every round's logits replaced by their crop mean), or with the deviation from
that mean scaled by ``--gains``. A model whose mask does not depend on the decoder's pattern has a ViT path that
adds nothing.

    python experiments/decoder_signal.py --dataset_json VALIDATION_AS_TEST.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "bundle")]

from experiments.first_click_logits import click_component, first_click_logits  # noqa: E402
from experiments.lesion_source import add_source_arguments, lesions, load_model  # noqa: E402
from experiments.zoom_out_click import play  # noqa: E402
from scripts.clicks import SIZE_BINS  # noqa: E402


def decoder_variants(upscale, gains):
    """name -> replacement of ``network.upscale_logits``: as served, crop mean only, mean + g x deviation."""

    def scaled(gain):
        def upscale_scaled(low_res, size=None):
            logits = upscale(low_res, size)
            mean = logits.mean(dim=(2, 3, 4), keepdim=True)
            return mean + gain * (logits - mean)

        return upscale_scaled

    return {"as served": upscale, "crop mean only": scaled(0.0), **{f"deviation x {g:g}": scaled(g) for g in gains}}


def logit_stats(network, crop, target) -> list[float]:
    """[median, 90th - 10th percentile, lesion median - background median] of the decoder's first-click logits, and
    the equivalent diameter in voxels of the served first mask's part that holds the click."""
    logits, _ = first_click_logits(network, crop, target, before_refiner=True)
    low, high = np.percentile(logits, [10, 90])
    refined, point = first_click_logits(network, crop, target)
    voxels = click_component(refined, 0.0, point).sum()
    lesion_gap = float(np.median(logits[target]) - np.median(logits[~target]))
    return [float(np.median(logits)), float(high - low), lesion_gap, float((6.0 * voxels / np.pi) ** (1 / 3))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_source_arguments(parser)
    parser.add_argument("--gains", type=float, nargs="*", default=[2.0])
    args = parser.parse_args(argv)
    network, pre = load_model(args)
    if getattr(network, "refiner", None) is None:
        parser.error("this model has no refiner: its mask is the decoder's")
    variants = decoder_variants(network.upscale_logits, args.gains)
    sizes, stats, curves = [], [], {name: [] for name in variants}
    for lesion in lesions(args, pre):
        sizes.append(lesion.size)
        network.upscale_logits = variants["as served"]
        stats.append(logit_stats(network, lesion.crop, lesion.target))
        for name, upscale in variants.items():
            network.upscale_logits = upscale
            curves[name].append(play(network, lesion.crop, lesion.target, 5, "fine"))
    network.upscale_logits = variants["as served"]
    report(np.asarray(sizes), np.asarray(stats), {k: np.asarray(v) for k, v in curves.items()})


def report(sizes: np.ndarray, stats: np.ndarray, curves: dict[str, np.ndarray]) -> None:
    bins = [b for b in SIZE_BINS if (sizes == b).any()]
    print("| size | lesions | decoder median | spread (p90 - p10) | lesion - background | first mask (voxels) |")
    print("|---|---|---|---|---|---|")
    for b in bins:
        cells = np.median(stats[sizes == b], axis=0)
        print(f"| {b} | {(sizes == b).sum()} | " + " | ".join(f"{c:+.2f}" for c in cells[:3]) + f" | {cells[3]:.1f} |")
    print("\n| decoder logits | Dice@1 | Dice@3 | Dice@5 | " + " | ".join(f"Dice@5 {b}" for b in bins) + " |")
    print("|---" * (4 + len(bins)) + "|")
    for name, c in curves.items():
        cells = [c[:, k].mean() for k in (0, 2, 4)] + [c[sizes == b, 4].mean() for b in bins]
        print(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in cells) + " |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
