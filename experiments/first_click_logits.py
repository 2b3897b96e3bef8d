"""How far below the decision threshold a model's first-click logits sit on each lesion, by lesion size.

For every lesion of ``--dataset_json``'s test split (or of a ``--dataset_dir`` of image/label pairs), the bundle's
evaluation crop gets one click at the lesion's deepest point; the script prints, per size bin, the Dice of the
connected component holding the click when the full-resolution logits are cut at each threshold of ``--ladder``.
A threshold that helps large lesions and hurts small ones shows a calibration problem no global shift can fix.
``--before_refiner`` cuts the mask decoder's upsampled logits instead, to tell which part holds the mask back.
``--geodesic`` cuts, instead of logits, the geodesic distance from the click that the refiner's
``network_def#refiner_geodesic`` maps are made of (``distance < threshold``, ladder in distance units): how much of
a lesion the image alone outlines from one click.

    python experiments/first_click_logits.py --dataset_json VALIDATION_AS_TEST.json [--before_refiner | --geodesic]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.clicks import SIZE_BINS, dice  # noqa: E402
from scripts.modeling.geodesic import edge_costs, geodesic_distance  # noqa: E402
from scripts.training.click_rounds import evaluation_clicks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesion_source import add_source_arguments, lesions, load_model  # noqa: E402


def click_component(logits: np.ndarray, threshold: float, point: tuple[int, int, int]) -> np.ndarray:
    components, _ = ndimage.label(logits > threshold, structure=np.ones((3, 3, 3)))
    value = components[point]
    return components == value if value else np.zeros(logits.shape, dtype=bool)


@torch.inference_mode()
def first_click_logits(
    network, image: torch.Tensor, target: np.ndarray, before_refiner: bool = False
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(S, S, S) full-resolution logits the model shows after one click at the lesion's deepest point (or, with
    ``before_refiner``, the mask decoder's logits upsampled to the crop), and that point: the first click of the
    evaluation protocol."""
    result = evaluation_clicks(network, image, target, 1)
    logits = network.upscale_logits(result["low_res_logits"], target.shape) if before_refiner else result["full_logits"]
    return logits[0, 0].float().cpu().numpy(), result["points"][0]


@torch.inference_mode()
def click_distance(network, image: torch.Tensor, point: tuple[int, int, int]) -> np.ndarray:
    """(S, S, S) geodesic distance from ``point`` over the crop ``image`` (1, 1, S, S, S), measured on the image
    the refiner's geodesic maps use (``MaskRefiner.geodesic_image``), repeated back to the crop's voxels."""
    half = network.refiner.geodesic_image(network.refine_features(image))
    seeds = torch.zeros_like(half, dtype=torch.bool)
    seeds[(0, 0, *(p // 2 for p in point))] = True
    distance = geodesic_distance(seeds, edge_costs(half))
    return distance[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2).numpy()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_source_arguments(parser)
    parser.add_argument("--ladder", type=float, nargs="+", default=[0.5, 0.0, -0.5, -1.0, -2.0, -3.0])
    cut = parser.add_mutually_exclusive_group()
    cut.add_argument("--before_refiner", action="store_true", help="cut the decoder's upsampled logits")
    cut.add_argument("--geodesic", action="store_true", help="cut the geodesic distance from the click (< ladder)")
    args = parser.parse_args(argv)
    network, pre = load_model(args)
    scores: dict[str, list[list[float]]] = {b: [] for b in SIZE_BINS}
    ladder = [-t for t in args.ladder] if args.geodesic else args.ladder  # distance < t: -distance > -t
    for lesion in lesions(args, pre):
        logits, point = first_click_logits(network, lesion.crop, lesion.target, args.before_refiner)
        if args.geodesic:
            logits = -click_distance(network, lesion.crop, point)
        scores[lesion.size].append([dice(click_component(logits, t, point), lesion.target) for t in ladder])
    cut = "distance <" if args.geodesic else "at"
    print("| size | lesions | " + " | ".join(f"Dice@1 {cut} {t:+.1f} (%)" for t in args.ladder) + " |")
    print("|---" * (len(args.ladder) + 2) + "|")
    for size, rows in scores.items():
        cells = [f"{100 * v:.1f}" for v in np.mean(rows, axis=0)] if rows else ["-"] * len(args.ladder)
        print(f"| {size} | {len(rows)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
