"""How visible are a dataset's lesions? The best Dice an intensity threshold can reach, told the answer.

For every lesion of a split (preprocessed like ``scripts.evaluate``, cropped by the same
``transforms.lesion_crops``), this tries every intensity threshold (both signs, hypo- and hyper-intense; a few
Gaussian smoothings) and keeps the connected component that holds the lesion's deepest voxel, the evaluation's
first click. The best Dice over all of them, chosen with the ground truth, is the ``threshold ceiling``. It is a
diagnostic, not a segmenter: it shows which lesions the image barely shows after resampling (partial volume from
thick slices, low contrast, texture), so a model's per-size Dice can be read against what the data allows. A
learned model can beat it (shape priors), and lesions with a ceiling near zero are nearly invisible in the
resampled image.

Hand-written because no library offers a truth-tuned threshold search; it uses SciPy's labelling and filters.

CLI (from the repository root, after ``source tools/env.sh``)::

    python -m experiments.lesion_visibility --dataset_json bundle/data/synthetic_lesions/dataset.json --split test
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from scripts.clicks import SIZE_BINS, dice, lesion_size_bin
from scripts.data.transforms import get_preprocess_transforms, lesion_crops, load_datalist

__all__ = ["threshold_ceiling", "dataset_threshold_ceiling"]


def threshold_ceiling(
    image: np.ndarray,
    target: np.ndarray,
    sigmas: Sequence[float] = (0.0, 0.5, 0.8, 1.2),
    num_thresholds: int = 49,
    margin: int = 4,
) -> float:
    """Best Dice of ``component at the deepest target voxel of (±smooth(image) > t)`` over sigmas, signs and t.

    Args:
        image: (X, Y, Z) normalised crop.
        target: (X, Y, Z) bool lesion mask (non-empty).
        sigmas: Gaussian smoothing widths in voxels (0 = none).
        num_thresholds: thresholds per sign, twice: quantiles of the intensities within ``margin`` voxels of the
            lesion, and evenly spaced values between their extremes.
    """
    target = np.asarray(target, dtype=bool)
    if not target.any():
        raise ValueError("the target mask is empty")
    depth = ndimage.distance_transform_edt(target)
    seed = np.unravel_index(int(np.argmax(depth)), depth.shape)
    near = ndimage.binary_dilation(target, iterations=margin)
    best = 0.0
    for sigma in sigmas:
        smooth = ndimage.gaussian_filter(image.astype(np.float32), sigma) if sigma > 0 else image.astype(np.float32)
        for signed in (smooth, -smooth):
            values = signed[near]
            quantiles = np.quantile(values, np.linspace(0.02, 0.98, num_thresholds))
            for t in np.unique(np.concatenate([quantiles, np.linspace(values.min(), values.max(), num_thresholds)])):
                mask = signed > t
                if not mask[seed]:
                    continue
                components, _ = ndimage.label(mask)
                best = max(best, float(dice(components == components[seed], target)))
    return best


def dataset_threshold_ceiling(
    dataset_json: str, split: str = "test", crop: int = 64, spacing: float = 1.5, target_label: int = 1
) -> dict:
    """Per-lesion threshold ceilings of a split and their means per size bin (``scripts.evaluate`` crops)."""
    preprocess = get_preprocess_transforms(target_label, None, False, spacing)
    lesions = []
    for item in load_datalist(dataset_json, split):
        data = preprocess({"image": item["image"], "label": item["label"]})
        for k, num_voxels, _, image, target in lesion_crops(data["image"], data["label"], crop):
            if target.any():
                ceiling = threshold_ceiling(image[0].numpy(), target)
                lesions.append({"case": str(item["image"]), "lesion": k, "voxels": num_voxels,
                                "size_bin": lesion_size_bin(num_voxels, spacing), "ceiling": ceiling})  # fmt: skip
    groups = {"overall": [r["ceiling"] for r in lesions]}
    groups.update({b: [r["ceiling"] for r in lesions if r["size_bin"] == b] for b in SIZE_BINS})
    summary = {g: {"mean": float(np.mean(v)), "n": len(v)} for g, v in groups.items() if v}
    return {"lesions": lesions, "summary": summary}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset_json", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--crop", type=int, default=64, help="crop size, as the evaluated network's img_size")
    parser.add_argument("--spacing", type=float, default=1.5)
    parser.add_argument("--target_label", type=int, default=1)
    args = parser.parse_args(argv)
    result = dataset_threshold_ceiling(args.dataset_json, args.split, args.crop, args.spacing, args.target_label)
    print("| group | n | threshold ceiling Dice (%) |\n|---|---|---|")
    for group, s in result["summary"].items():
        print(f"| {group} | {s['n']} | {100 * s['mean']:.1f} |")
    print(json.dumps(result["summary"]))
    return result


if __name__ == "__main__":
    main()
