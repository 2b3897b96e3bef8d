"""What the first-click studies share: the command-line source of lesions and the model, and each lesion as the
bundle's evaluation protocol crops it (``first_click_logits.py``, ``zoom_out_click.py``, ``decoder_signal.py``)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.clicks import lesion_size_bin  # noqa: E402
from scripts.data.crops import lesion_crops  # noqa: E402
from scripts.data.folders import folder_datalist  # noqa: E402
from scripts.data.transforms import get_preprocess_transforms, load_datalist  # noqa: E402
from scripts.model_file import default_model_path, read_model_file  # noqa: E402


@dataclass
class Lesion:
    """One lesion: its preprocessed case volume (1, X, Y, Z), the crop's start there, the normalised crop
    (1, 1, S, S, S), the target (S, S, S) bool, its voxel count in the volume and its size bin."""

    volume: torch.Tensor
    start: np.ndarray
    crop: torch.Tensor
    target: np.ndarray
    num_voxels: int
    size: str


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dataset_json`` (its test split) or ``--dataset_dir`` (image/label pairs), ``--model``, ``--target_label``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset_json", help="a data list; its 'test' split is used")
    source.add_argument("--dataset_dir", help="a folder of image/label pairs")
    parser.add_argument("--model", default=None, help="model file (default: the shipped default model)")
    parser.add_argument("--target_label", type=int, default=1)


def load_model(args: argparse.Namespace):
    """(network in eval mode, its preprocessing) of ``--model`` or the shipped default model."""
    model = read_model_file(args.model or default_model_path())
    return model.network.eval(), model.preprocessing


def lesions(args: argparse.Namespace, preprocessing) -> Iterator[Lesion]:
    """Every lesion of the source with a non-empty target in its evaluation crop, case by case."""
    pre = preprocessing
    items = load_datalist(args.dataset_json, "test") if args.dataset_json else folder_datalist(args.dataset_dir)
    pipeline = get_preprocess_transforms(args.target_label, pre.image_channel, pre.ct_clamp, pre.spacing)
    for item in items:
        data = pipeline({"image": item["image"], "label": item["label"]})
        for _, num_voxels, start, crop, target in lesion_crops(
            data["image"], data["label"], pre.roi_size, 3, pre.normalisation
        ):
            target = np.asarray(target, dtype=bool)
            if target.any():
                size = lesion_size_bin(num_voxels, pre.spacing)
                yield Lesion(data["image"], start, crop[None].float(), target, num_voxels, size)
