"""Interactive-segmentation evaluation by the literature's click protocol, per lesion (bundle ``evaluating``).

Protocol (deterministic, RITM-style, as SAM-Med3D's interactive evaluation):
    * every test case is preprocessed like training (RAS, ``spacing`` mm, channel / CT clamp / target label);
    * every lesion = connected component (26-connectivity) of the target label in the RESAMPLED label is a separate
      target: an ``S``³ crop (``S = network.img_size``) centred on its bounding box, normalised like training;
      the target is that component only (other lesions in the crop count as background);
    * ``training.click_rounds.evaluation_clicks`` simulates up to ``max_clicks`` clicks (first click: deepest
      point of the lesion; then the deepest point of the larger error region), each round feeding the new click and
      the previous low-res logits;
    * Dice@k (k = 1, 3, 5, 10) and NoC@85/90 (capped at ``max_clicks``) per lesion; a curve that stopped early (no
      error left) carries its last value forward;
    * size bins by equivalent-sphere diameter of the WHOLE lesion (< 10 mm, 10-30 mm, > 30 mm);
    * whole-volume Dice per case: the per-lesion masks after ``whole_volume_clicks`` clicks pasted back into the
      resampled volume (union) vs the resampled label.
Lesions larger than the crop are evaluated within their lesion-centred crop only (the part of the lesion inside
the crop is the target; ``truncated`` = 1 in the CSV); no sliding-window extension, as in the SAM-Med3D protocol.

Outputs in ``output_dir``: ``per_lesion.csv`` / ``.json`` (case, lesion, size in voxels of the resampled grid, in
mm³ and as equivalent diameter in mm, size bin, Dice after every click; NoC in the CSV), ``summary.json`` (overall
and by size bin) and ``dice_vs_clicks.png``; a Markdown table is printed.

The network and its preprocessing come from the model file ``ckpt_path`` (``scripts.model_file``). CLI, on the
config's test split or on any folder of image/label pairs (``scripts.data.folders``: NIfTI or NRRD, no
dataset.json needed)::

    python -m monai.bundle run evaluating \\
        --config_file "['bundle/configs/train.json','bundle/configs/evaluate.json']" \\
        --dataset_dir /path/to/cases --target_label 1 --ckpt_path bundle/models/model.pt
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_tensor

from .checkpoint import CheckpointError
from .clicks import SIZE_BINS, dice, lesion_size_bin, summarise
from .data.crops import crop_at, lesion_crops, paste_crop
from .data.transforms import get_preprocess_transforms, load_datalist
from .evaluation_report import DICE_KS, NOC_THRESHOLDS, format_markdown_table, json_safe, plot_curves, write_csv
from .model_file import Preprocessing, read_model_file
from .training.click_rounds import evaluation_clicks

__all__ = ["evaluate_dataset", "format_markdown_table", "run_evaluation"]

logger = logging.getLogger("sgpsam.evaluate")


def _as_datalist(datalist: Any, split: str) -> list[dict]:
    """A list of {"image", "label"} dicts, from a list, an MSD dataset.json path, or a dict of split lists."""
    if isinstance(datalist, (str, os.PathLike)):
        return load_datalist(datalist, split)
    if isinstance(datalist, Mapping):
        if split not in datalist:
            raise KeyError(f"datalist has no '{split}' split (keys: {sorted(datalist)})")
        return list(datalist[split])
    return list(datalist)


def _equivalent_diameter(num_voxels: int, spacing: float) -> float:
    return (6.0 * num_voxels * spacing**3 / math.pi) ** (1.0 / 3.0)


def _carry(curve: Sequence[float], n: int) -> list[float]:
    """Dice after clicks 1..n, the last value carried forward (stopped early = no error left)."""
    curve = list(curve)
    return curve[:n] + [curve[-1]] * max(0, n - len(curve))


@torch.no_grad()
def evaluate_dataset(
    network: torch.nn.Module,
    datalist: Any,
    output_dir: str | os.PathLike,
    max_clicks: int = 20,
    preprocessing: Preprocessing | Mapping[str, Any] | None = None,
    target_label: int | Sequence[int] | None = 1,
    device: str | torch.device | None = None,
    whole_volume_clicks: int = 5,
    connectivity: int = 3,
    split: str = "test",
    print_table: bool = True,
    plot: bool = True,
    anatomy_key: str | None = None,
    anatomy_labels: int | Sequence[int] | None = None,
    anatomy_from_label: bool = False,
) -> dict[str, Any]:
    """Evaluate ``network`` lesion by lesion with the deterministic click protocol (module docstring).

    Args:
        network: SGP-SAM / SAM-Med3D model (``encode``/``decode``/``img_size``); set to eval mode here.
        datalist: list of {"image", "label"} (paths), an MSD ``dataset.json`` path, or a dict of splits (``split``).
        output_dir: where the CSV, JSON and PNG go (created).
        max_clicks: clicks per lesion (NoC cap; literature: 20).
        preprocessing: the model's :class:`~scripts.model_file.Preprocessing` (spacing, channel, clamp,
            normalisation; a plain dict works too); None: the defaults at the network's crop size.
        target_label: label value(s) of the lesions in the label files (None: any value > 0).
        device: defaults to the network's device.
        whole_volume_clicks: click count whose masks are merged for the whole-volume Dice.
        anatomy_key, anatomy_labels, anatomy_from_label: the TAGS anatomy prompt (None = off): the organ mask is
            preprocessed with the image (``scripts.data.transforms.get_preprocess_transforms``), cropped at each
            lesion's crop and passed as ``network.encode(crop, anatomy=mask)``. A case without a mask is encoded without
            one (an all-zero anatomy channel), with a warning.

    Returns:
        {"metrics": clicks.summarise(...) ({"overall" | size bin: {"dice@k" | "noc@T": {"mean", "std", "n"}}}),
         "mean_dice@5": float, "whole_volume_dice": {"mean", "std", "n", "clicks"}, "dice_curve": {group: [mean Dice
         after 1..max_clicks]}, "num_cases", "num_lesions", "skipped_lesions", "max_clicks", "crop_size", "spacing"}
    """
    items = _as_datalist(datalist, split)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else next(network.parameters()).device
    network = network.to(device).eval()
    pre = Preprocessing(roi_size=network.img_size) if preprocessing is None else Preprocessing.from_dict(preprocessing)
    protocol = _Protocol(
        crop=int(network.img_size),
        max_clicks=int(max_clicks),
        keep=min(int(whole_volume_clicks), int(max_clicks)),
        spacing=pre.spacing,
        connectivity=connectivity,
        device=device,
        normalisation=pre.normalisation,
    )
    anatomy = (anatomy_key, anatomy_labels, anatomy_from_label)
    pipelines = _CasePipelines(target_label, pre.image_channel, pre.ct_clamp, pre.spacing, *anatomy)
    records: list[dict[str, Any]] = []
    whole: list[float] = []
    skipped = prompted_crops = 0
    for case_idx, item in enumerate(items):
        case = _evaluate_case(network, item, case_idx, pipelines, protocol)
        records += case["records"]
        skipped += case["skipped"]
        prompted_crops += case["prompted"]
        if case["whole"] is not None:
            whole.append(case["whole"])

    summary, curves = _summarise_run(records, whole, protocol)
    summary.update(num_cases=len(items), skipped_lesions=skipped, anatomy_prompted_crops=prompted_crops)
    write_csv(records, out_dir / "per_lesion.csv", max_clicks)
    (out_dir / "per_lesion.json").write_text(json.dumps(json_safe(records), indent=1))
    (out_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=1))
    if plot:
        plot_curves(summary["dice_curve"], {g: len(c) for g, c in curves.items()}, out_dir / "dice_vs_clicks.png")
    if print_table:
        print(format_markdown_table(summary))
    return summary


@dataclass(frozen=True)
class _Protocol:
    """The click protocol's settings: crop side, clicks per lesion, the click count merged for the whole-volume
    Dice, spacing (mm), lesion connectivity, device and the crop's intensity normalisation."""

    crop: int
    max_clicks: int
    keep: int
    spacing: float
    connectivity: int
    device: torch.device
    normalisation: str = "upstream"


class _CasePipelines:
    """Preprocessing of one case like training; with the anatomy prompt on, a second pipeline that also loads the
    organ mask (used for the cases that have one)."""

    def __init__(self, target_label, image_channel, ct_clamp, spacing, anatomy_key, anatomy_labels, anatomy_from_label):
        self.anatomy_key, self.anatomy_from_label = anatomy_key, anatomy_from_label
        self.plain = get_preprocess_transforms(target_label, image_channel, ct_clamp, spacing)
        self.with_anatomy = None
        if anatomy_key:
            self.with_anatomy = get_preprocess_transforms(
                target_label, image_channel, ct_clamp, spacing, anatomy_key=anatomy_key,
                anatomy_labels=anatomy_labels, anatomy_from_label=anatomy_from_label,
            )  # fmt: skip

    def __call__(self, item: Mapping) -> tuple[dict, bool]:
        """(preprocessed case, whether it carries the organ mask)."""
        key = self.anatomy_key
        has_anatomy = bool(key) and (self.anatomy_from_label or key in item)
        if key and not has_anatomy:
            logger.warning("%s: no '%s' mask, evaluated without the anatomy prompt", item["image"], key)
        keys = ("image", "label", key) if has_anatomy and not self.anatomy_from_label else ("image", "label")
        data = (self.with_anatomy if has_anatomy else self.plain)({k: item[k] for k in keys})
        return data, has_anatomy


def _evaluate_case(network, item: Mapping, case_idx: int, pipelines: _CasePipelines, protocol: _Protocol) -> dict:
    """Every lesion of one case through the click protocol: {"records", "whole" (Dice or None), "skipped",
    "prompted" (crops encoded with the organ mask)}."""
    data, has_anatomy = pipelines(item)
    image, label = data["image"], data["label"]
    shape = tuple(int(s) for s in label.shape[1:])
    merged = torch.zeros((1, *shape), dtype=torch.bool)
    case = str(item.get("case") or Path(str(item["image"])).name)  # a folder's pairs carry their case name
    out = {"records": [], "whole": None, "skipped": 0, "prompted": 0}
    num_lesions = 0
    for k, num_voxels, start, img, target in lesion_crops(
        image, label, protocol.crop, protocol.connectivity, protocol.normalisation
    ):
        num_lesions += 1
        img = img[None].to(protocol.device, torch.float32)
        if not target.any():
            out["skipped"] += 1  # pathological shape with no voxel in its own centred crop
            logger.warning("%s lesion %d: no voxel inside its centred crop, skipped", case, k)
            continue
        encode_inputs = {}
        if has_anatomy:
            organ = convert_to_tensor(crop_at(data[pipelines.anatomy_key], start, protocol.crop), track_meta=False)
            encode_inputs["anatomy"] = (organ[None] > 0.5).to(protocol.device, torch.float32)
            out["prompted"] += 1
        res = evaluation_clicks(
            network, img, target, protocol.max_clicks, spacing=(protocol.spacing,) * 3, keep_masks_at=(protocol.keep,),
            encode_inputs=encode_inputs,
        )  # fmt: skip
        merged |= paste_crop(torch.as_tensor(res["masks_at"][protocol.keep])[None], start, shape).bool()
        out["records"].append(_lesion_record(case, case_idx, k, num_voxels, start, target, res, protocol))
    if num_lesions:
        out["whole"] = dice(merged[0], label[0] > 0.5)
    return out


def _lesion_record(case, case_idx, k, num_voxels, start, target, res, protocol: _Protocol) -> dict[str, Any]:
    return {
        "case": case,
        "case_index": case_idx,
        "lesion": k,
        "num_voxels": num_voxels,
        "volume_mm3": num_voxels * protocol.spacing**3,
        "voxels_in_crop": int(target.sum()),
        "equivalent_diameter_mm": _equivalent_diameter(num_voxels, protocol.spacing),
        "size_bin": lesion_size_bin(num_voxels, protocol.spacing),
        "truncated": int(target.sum()) < num_voxels,
        "crop_start": [int(v) for v in start],
        "clicks_used": len(res["dice"]),
        "dice": _carry(res["dice"], protocol.max_clicks),
    }


def _summarise_run(records: list[dict], whole: list[float], protocol: _Protocol) -> tuple[dict[str, Any], dict]:
    """(summary without the case counts, per-group Dice curves of every lesion)."""
    metrics = (
        summarise(records, ks=DICE_KS, noc_thresholds=NOC_THRESHOLDS, max_clicks=protocol.max_clicks) if records else {}
    )
    curves = {
        "overall": [r["dice"] for r in records],
        **{b: [r["dice"] for r in records if r["size_bin"] == b] for b in SIZE_BINS},
    }
    mean_curves = {g: np.mean(c, axis=0).tolist() if c else [] for g, c in curves.items()}
    whole_arr = np.asarray(whole, dtype=float)
    summary: dict[str, Any] = {
        "metrics": metrics,
        "mean_dice@5": metrics["overall"]["dice@5"]["mean"] if records else float("nan"),
        "whole_volume_dice": {
            "mean": float(whole_arr.mean()) if whole else float("nan"),
            "std": float(whole_arr.std()) if whole else float("nan"),
            "n": len(whole),
            "clicks": protocol.keep,
        },
        "dice_curve": mean_curves,
        "num_cases": 0,
        "num_lesions": len(records),
        "skipped_lesions": 0,
        "max_clicks": protocol.max_clicks,
        "crop_size": protocol.crop,
        "spacing": float(protocol.spacing),
        "anatomy_prompted_crops": 0,
    }
    return summary, curves


def run_evaluation(
    ckpt_path: str | os.PathLike | None,
    datalist: Any,
    output_dir: str | os.PathLike,
    network_factory: Callable[[], torch.nn.Module] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Bundle entry: build the network and its preprocessing from the model file ``ckpt_path``
    (``scripts.model_file``), then :func:`evaluate_dataset`.

    ``ckpt_path`` None / "null": a randomly initialised ``network_factory()`` (the config's ``network_def``) with
    the config's ``preprocessing``, as a control."""
    if ckpt_path is not None and str(ckpt_path).strip().lower() not in ("", "none", "null"):
        if not os.path.isfile(os.fspath(ckpt_path)):
            raise CheckpointError(f"checkpoint not found: {ckpt_path} (train first or pass --ckpt_path)")
        model = read_model_file(ckpt_path, device or "cpu")
        network, preprocessing = model.network, model.preprocessing
        logger.info("model file %s (%s): preprocessing %s", ckpt_path, model.kind, preprocessing.as_dict())
    else:
        if network_factory is None:
            raise CheckpointError("ckpt_path is null and no network_factory was given: nothing to evaluate")
        logger.warning("ckpt_path is null: evaluating a RANDOMLY INITIALISED network (a control)")
        network = network_factory()
    summary = evaluate_dataset(network, datalist, output_dir, preprocessing=preprocessing, device=device, **kwargs)
    anatomy = f"; {summary['anatomy_prompted_crops']} with the anatomy prompt" if kwargs.get("anatomy_key") else ""
    print(f"mean Dice after 5 clicks: {summary['mean_dice@5']:.4f} ({summary['num_lesions']} lesions{anatomy})")
    return summary
