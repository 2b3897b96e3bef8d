"""How far below the decision threshold a model's first-click logits sit on each lesion, by lesion size.

For every lesion of ``--dataset_json``'s test split (or of a ``--dataset_dir`` of image/label pairs), the bundle's
evaluation crop gets one click at the lesion's deepest point; the script prints, per size bin, the Dice of the
connected component holding the click when the full-resolution logits are cut at each threshold of ``--ladder``.
A threshold that helps large lesions and hurts small ones shows a calibration problem no global shift can fix.
``--before_refiner`` cuts the mask decoder's upsampled logits instead, to tell which part holds the mask back.

    python experiments/first_click_logits.py --dataset_json VALIDATION_AS_TEST.json [--before_refiner]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.clicks import SIZE_BINS, dice, lesion_size_bin  # noqa: E402
from scripts.data.crops import lesion_crops  # noqa: E402
from scripts.data.folders import folder_datalist  # noqa: E402
from scripts.data.transforms import get_preprocess_transforms, load_datalist  # noqa: E402
from scripts.model_file import default_model_path, read_model_file  # noqa: E402
from scripts.training.click_rounds import evaluation_clicks  # noqa: E402


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset_json", help="a data list; its 'test' split is used")
    source.add_argument("--dataset_dir", help="a folder of image/label pairs")
    parser.add_argument("--model", default=None, help="model file (default: the shipped default model)")
    parser.add_argument("--target_label", type=int, default=1)
    parser.add_argument("--ladder", type=float, nargs="+", default=[0.5, 0.0, -0.5, -1.0, -2.0, -3.0])
    parser.add_argument("--before_refiner", action="store_true", help="cut the decoder's upsampled logits")
    args = parser.parse_args(argv)
    model = read_model_file(args.model or default_model_path())
    network, pre = model.network.eval(), model.preprocessing
    items = load_datalist(args.dataset_json, "test") if args.dataset_json else folder_datalist(args.dataset_dir)
    pipeline = get_preprocess_transforms(args.target_label, pre.image_channel, pre.ct_clamp, pre.spacing)
    scores: dict[str, list[list[float]]] = {b: [] for b in SIZE_BINS}
    for item in items:
        data = pipeline({"image": item["image"], "label": item["label"]})
        for _, num_voxels, _, crop, target in lesion_crops(
            data["image"], data["label"], pre.roi_size, 3, pre.normalisation
        ):
            target = np.asarray(target, dtype=bool)
            if target.any():
                logits, point = first_click_logits(network, crop[None].float(), target, args.before_refiner)
                row = [dice(click_component(logits, t, point), target) for t in args.ladder]
                scores[lesion_size_bin(num_voxels, pre.spacing)].append(row)
    print("| size | lesions | " + " | ".join(f"Dice@1 at {t:+.1f} (%)" for t in args.ladder) + " |")
    print("|---" * (len(args.ladder) + 2) + "|")
    for size, rows in scores.items():
        cells = [f"{100 * v:.1f}" for v in np.mean(rows, axis=0)] if rows else ["-"] * len(args.ladder)
        print(f"| {size} | {len(rows)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
