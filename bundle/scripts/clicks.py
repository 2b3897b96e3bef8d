"""Click simulation and interactive-segmentation metrics, shared by training, evaluation and the Label app.

Conventions (docs/conventions.md): points are voxel indices of the network input crop in the image tensor's
axis order, ``(B, N, 3)`` float; labels ``(B, N)``: 1 foreground, 0 background, -1 padding.

* Training (SAM-Med3D protocol): :func:`sample_training_click`, :func:`training_round_schedule`; optionally first
  clicks from the lesion's centre, where annotators and the evaluation put them: :func:`central_region`.
* Evaluation (deterministic, RITM-style): :func:`next_eval_click`.
* Click consistency (training, evaluation and the app alike): :func:`click_consistent_logits`.
* Metrics: :func:`dice`, :func:`number_of_clicks`, :func:`lesion_size_bin`, :func:`summarise`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice
from scipy.ndimage import distance_transform_edt, generate_binary_structure
from scipy.ndimage import label as label_components

__all__ = [
    "sample_training_click",
    "central_region",
    "training_round_schedule",
    "next_eval_click",
    "click_consistent_logits",
    "dice",
    "number_of_clicks",
    "lesion_size_bin",
    "summarise",
    "SIZE_BINS",
]

SIZE_BINS = ("<10mm", "10-30mm", ">30mm")


# ----------------------------------------------------------------------------------------------------------------
# training protocol
# ----------------------------------------------------------------------------------------------------------------
def sample_training_click(
    pred_mask: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one click per sample uniformly from the error region (SAM-Med3D training protocol).

    Candidates per sample: the error region FN ∪ FP if non-empty; else the target (a positive click on a
    solved case keeps the prompt informative); else any voxel (target and prediction empty: a negative click).
    The label is the target value at the drawn voxel, which is 1 exactly for FN / inside-target clicks.

    Args:
        pred_mask: ``(B, 1, X, Y, Z)`` bool current prediction (the trainer thresholds the logits).
        target: ``(B, 1, X, Y, Z)`` bool ground truth.
        generator: torch generator on the tensors' device, for reproducible draws.

    Returns:
        points ``(B, 1, 3)`` float voxel indices, labels ``(B, 1)`` long, on the input device.
    """
    if pred_mask.shape != target.shape or pred_mask.ndim != 5:
        raise ValueError(f"expected equal (B, 1, X, Y, Z) shapes, got {tuple(pred_mask.shape)}, {tuple(target.shape)}")
    b = target.shape[0]
    spatial = target.shape[2:]
    pred = pred_mask.reshape(b, -1).bool()
    tgt = target.reshape(b, -1).bool()
    error = pred ^ tgt
    has_error = error.any(1, keepdim=True)
    has_target = tgt.any(1, keepdim=True)
    candidates = torch.where(has_error, error, torch.where(has_target, tgt, torch.ones_like(tgt)))
    # multinomial over a 0/1 weight row = uniform draw among candidates, all rows at once, on any device
    flat = torch.multinomial(candidates.float(), 1, generator=generator)  # (B, 1)
    labels = tgt.gather(1, flat).long()
    _, sy, sz = spatial
    coords = torch.stack((flat // (sy * sz), (flat // sz) % sy, flat % sz), dim=-1)  # (B, 1, 3)
    return coords.float(), labels


def central_region(target: torch.Tensor, depth_fraction: float = 0.5) -> torch.Tensor:
    """The voxels of each sample's target at least ``depth_fraction`` of its greatest depth inside it.

    Depth is the Euclidean distance to the nearest background voxel, the crop's outside counted as background as in
    :func:`next_eval_click` (so a lesion filling the crop has its centre there).
    Upstream draws the first training click uniformly from the lesion, so on a large lesion it mostly lands near
    the border, while annotators and the evaluation protocol click near the centre (the deepest point).

    Args:
        target: ``(B, 1, X, Y, Z)`` bool ground truth, any device.

    Returns:
        ``(B, 1, X, Y, Z)`` bool on the target's device; empty where the target is empty.
    """
    masks = target[:, 0].detach().bool().cpu().numpy()
    depth = torch.zeros(masks.shape, dtype=torch.float32)
    for row, mask in zip(depth, masks):
        if mask.any():
            box, box_depth = _depth_in_box(mask, None)
            row[box] = torch.from_numpy(box_depth.astype(np.float32))
    deepest = depth.flatten(1).amax(1).view(-1, 1, 1, 1)
    return ((depth >= depth_fraction * deepest) & (depth > 0))[:, None].to(target.device)


def training_round_schedule(
    num_rounds: int = 11, rng: np.random.Generator | random.Random | None = None, mask_only_range: tuple = (2, 8)
) -> list[bool]:
    """Which training rounds feed the new click (True) and which feed the previous mask only (False).

    Upstream SAM-Med3D makes the last round and one random round mask-only; that round is drawn as
    ``np.random.randint(2, 9)`` on a 0-based round counter. ``mask_only_range`` is therefore an inclusive range
    of 0-BASED list indices (default 2..8, i.e. rounds 3..9 counted from 1), clipped to the rounds that exist
    before the last one. A click is still sampled in mask-only rounds upstream; it is just not fed.

    Args:
        num_rounds: rounds per sample (upstream 11).
        rng: ``numpy.random.Generator`` or ``random.Random``; a fresh unseeded numpy generator if None.
        mask_only_range: inclusive 0-based index range for the random mask-only round.

    Returns:
        list of ``num_rounds`` bools, ``schedule[i]`` for round ``i`` (0-based).
    """
    if num_rounds < 1:
        raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
    schedule = [True] * num_rounds
    if num_rounds == 1:
        return schedule  # the only round needs its click: the mask prompt is still empty
    schedule[-1] = False
    lo, hi = max(1, mask_only_range[0]), min(num_rounds - 2, mask_only_range[1])
    if lo <= hi:
        rng = np.random.default_rng() if rng is None else rng
        idx = int(rng.integers(lo, hi + 1)) if isinstance(rng, np.random.Generator) else rng.randint(lo, hi)
        schedule[idx] = False
    return schedule


# ----------------------------------------------------------------------------------------------------------------
# evaluation protocol
# ----------------------------------------------------------------------------------------------------------------
def _depth_in_box(region: np.ndarray, spacing: Sequence[float] | None) -> tuple[tuple[slice, ...], np.ndarray]:
    """Distance of every voxel of a non-empty ``region``'s bounding box to the nearest voxel outside the region,
    the crop border counted as outside: (the box's slices, distances of the box's shape; 0 outside the region).

    The EDT runs on the bounding box padded by one background voxel: that pad plays the crop border where the box
    touches it, and elsewhere it is background anyway, so distances equal those of the full volume padded by one
    voxel (the nearest outside voxel is never beyond the padded box) at a fraction of the cost.
    """
    idx = np.nonzero(region)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    return box, distance_transform_edt(np.pad(region[box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]


def _deepest_point(region: np.ndarray, spacing: Sequence[float] | None) -> tuple[np.ndarray | None, float]:
    """Deepest voxel of ``region`` with the crop border counted as outside (:func:`_depth_in_box`). Ties go to the
    lowest flat index, which translation of the box does not change (C order).

    Args:
        region: ``(X, Y, Z)`` bool.
        spacing: voxel size per axis (distances in mm) or None (voxels).

    Returns:
        (point ``(3,)`` int64 or None if empty, max distance; 0.0 if empty).
    """
    if not region.any():
        return None, 0.0
    box, dist = _depth_in_box(region, spacing)
    flat = int(np.argmax(dist))  # first maximum = lowest flat index
    point = np.array(np.unravel_index(flat, dist.shape), dtype=np.int64) + [s.start for s in box]
    return point, float(dist.flat[flat])


def next_eval_click(
    pred_mask: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, int] | None:
    """Next deterministic evaluation click: the deepest point of the larger error region.

    FN = target \\ prediction, FP = prediction \\ target; both get a Euclidean distance transform with the crop
    border counted as outside (``sampling=spacing`` if given). The click goes to the region with the larger
    maximum distance (FN wins only if strictly larger, as in RITM's protocol), at its deepest voxel (ties:
    lowest flat index); label 1 for FN, 0 for FP. The first click (empty prediction) is the same rule with
    FN = target: the deepest interior point of the lesion.

    Args:
        pred_mask: ``(X, Y, Z)`` bool current prediction.
        target: ``(X, Y, Z)`` bool ground truth.
        spacing: voxel size per axis, e.g. mm; None for isotropic voxel units.

    Returns:
        (point ``(3,)`` int64 voxel index, label) or None if the prediction has no error.
    """
    pred = np.asarray(pred_mask, dtype=bool)
    tgt = np.asarray(target, dtype=bool)
    if pred.shape != tgt.shape or pred.ndim != 3:
        raise ValueError(f"expected equal (X, Y, Z) shapes, got {pred.shape}, {tgt.shape}")
    if spacing is not None:
        spacing = [float(s) for s in (np.broadcast_to(np.asarray(spacing, dtype=float), (3,)))]
    fn_point, fn_dist = _deepest_point(tgt & ~pred, spacing)
    fp_point, fp_dist = _deepest_point(pred & ~tgt, spacing)
    if fn_point is None and fp_point is None:
        return None
    if fn_dist > fp_dist:
        return fn_point, 1
    return fp_point, 0


# ----------------------------------------------------------------------------------------------------------------
# click consistency
# ----------------------------------------------------------------------------------------------------------------
def click_consistent_logits(
    logits: torch.Tensor,
    points: torch.Tensor | None,
    labels: torch.Tensor | None,
    connectivity: int = 3,
    margin: float = 4.0,
    keep_clicked_components: bool = True,
) -> torch.Tensor:
    """Logits whose mask (``logits > 0``) agrees with every click so far.

    An annotator's click is a fact about one voxel, but the network treats it as a hint: it may leave a
    foreground click outside the mask (a 4-voxel lesion it cannot see) or keep a background click inside it. Here
    each clicked voxel takes its click's label (a later click on the same voxel wins), and, when there is a
    foreground click, only the connected components of the mask that hold one are kept: the object is what was
    clicked, not a blob elsewhere in the crop (a neighbouring lesion, a vessel). Only the logits whose sign
    disagrees change, to ``±margin``, so the next round's refiner input and the undo snapshots stay consistent.

    Hand-written: MONAI's ``KeepLargestConnectedComponent`` keeps by size, not by seed.

    Args:
        logits: (B, 1, X, Y, Z) crop-resolution logits (not modified; the result is detached).
        points: (B, N, 3) crop voxel indices of every click so far, or None.
        labels: (B, N) 1 foreground, 0 background, -1 padding (ignored), or None.
        connectivity: 1, 2 or 3 (26-neighbours, as the evaluation's lesion components).
        margin: logit magnitude given to a flipped voxel (sigmoid(4) = 0.98).
        keep_clicked_components: False keeps every component (click voxels are still set).

    Returns:
        (B, 1, X, Y, Z) logits, same dtype and device.
    """
    if points is None or labels is None or points.shape[1] == 0:
        return logits.detach()
    if logits.ndim != 5 or logits.shape[1] != 1:
        raise ValueError(f"expected (B, 1, X, Y, Z) logits, got {tuple(logits.shape)}")
    logits = logits.detach()
    mask = (logits > 0)[:, 0].cpu().numpy()
    shape = np.asarray(mask.shape[1:])
    coords = np.clip(np.rint(points.detach().cpu().numpy()).astype(np.int64), 0, shape - 1)
    clicks = labels.detach().cpu().numpy()
    structure = generate_binary_structure(3, connectivity)
    for b in range(mask.shape[0]):
        valid = clicks[b] >= 0
        for (x, y, z), lab in zip(coords[b][valid], clicks[b][valid]):
            mask[b, x, y, z] = bool(lab)
        seeds = coords[b][valid & (clicks[b] == 1)]
        if keep_clicked_components and len(seeds) and mask[b].any():
            # label inside the mask's bounding box only (a lesion's box is a small part of a 128^3 crop)
            profiles = [np.flatnonzero(mask[b].any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)]
            box = tuple(slice(int(p[0]), int(p[-1]) + 1) for p in profiles)
            components, count = label_components(mask[b][box], structure)
            kept = np.zeros(count + 1, dtype=bool)  # lookup table: far cheaper than np.isin
            kept[components[tuple((seeds - [sl.start for sl in box]).T)]] = True
            kept[0] = False
            mask[b][box] = kept[components]
    consistent = torch.as_tensor(mask, device=logits.device)[:, None]
    flip_on, flip_off = consistent & (logits <= 0), ~consistent & (logits > 0)
    return torch.where(flip_on, margin, torch.where(flip_off, -margin, logits)).to(logits.dtype)


# ----------------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------------
def dice(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
    """Dice of two binary masks of equal shape, 1.0 when both are empty.

    Uses ``monai.metrics.compute_dice`` and maps its empty-target result explicitly: our convention is 1.0 for
    empty vs empty and 0.0 for a non-empty prediction of an empty target.

    Args:
        pred: ``(X, Y, Z)`` (or any shape) bool/{0,1} prediction.
        target: same shape, ground truth.

    Returns:
        Dice in [0, 1].
    """
    p = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).bool()
    t = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target).bool()
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch {tuple(p.shape)} vs {tuple(t.shape)}")
    if not t.any():
        return 0.0 if p.any() else 1.0
    value = compute_dice(p.reshape(1, 1, *p.shape).float(), t.reshape(1, 1, *t.shape).float(), include_background=True)
    return float(value.reshape(-1)[0])


def number_of_clicks(dice_per_click: Sequence[float], threshold: float, max_clicks: int = 20) -> int:
    """NoC@threshold: the first 1-based click count whose Dice reaches ``threshold``, else ``max_clicks``.

    Args:
        dice_per_click: Dice after click 1, 2, ... (fractions in [0, 1]).
        threshold: target Dice as a fraction, e.g. 0.85 for NoC@85.
        max_clicks: cap (literature: 20); later entries are ignored.

    Returns:
        k in [1, max_clicks].
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a fraction in [0, 1] (0.85 for NoC@85), got {threshold}")
    for k, value in enumerate(list(dice_per_click)[:max_clicks], start=1):
        if value >= threshold:
            return k
    return max_clicks


def lesion_size_bin(num_voxels: int, spacing: float | Sequence[float]) -> str:
    """Size bin by equivalent-sphere diameter ``d = (6·V/π)^(1/3)``, ``V = num_voxels · prod(spacing)`` mm³.

    Bins: ``d < 10`` → "<10mm", ``10 <= d <= 30`` → "10-30mm", ``d > 30`` → ">30mm".

    Args:
        num_voxels: lesion voxel count.
        spacing: voxel size in mm, scalar (isotropic) or per axis.

    Returns:
        one of :data:`SIZE_BINS`.
    """
    voxel_mm3 = float(np.prod(np.broadcast_to(np.asarray(spacing, dtype=float), (3,))))
    diameter = (6.0 * num_voxels * voxel_mm3 / math.pi) ** (1.0 / 3.0)
    if diameter < 10.0:
        return SIZE_BINS[0]
    if diameter <= 30.0:
        return SIZE_BINS[1]
    return SIZE_BINS[2]


def _stats(values: list[float]) -> dict[str, float]:
    """Mean, population std (ddof=0) and count; NaN mean/std for an empty list."""
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def summarise(
    records: Iterable[Mapping[str, Any]],
    ks: Sequence[int] = (1, 3, 5, 10),
    noc_thresholds: Sequence[float] = (0.85, 0.90),
    max_clicks: int = 20,
) -> dict[str, dict[str, dict[str, float]]]:
    """Aggregate per-lesion click curves into Dice@k and NoC, overall and per size bin.

    Each record holds ``"dice"``: Dice after click 1, 2, ... and either ``"size_bin"`` or ``"num_voxels"`` plus
    ``"spacing"``. A curve shorter than k carries its last value forward: evaluation stops early only when
    :func:`next_eval_click` finds no error left, after which the Dice cannot change.

    Args:
        records: per-lesion dicts as above.
        ks: click counts for Dice@k.
        noc_thresholds: Dice fractions for NoC (keys use the percentage, e.g. "noc@85").
        max_clicks: NoC cap.

    Returns:
        ``{"overall" | "<10mm" | "10-30mm" | ">30mm": {"dice@k" | "noc@T": {"mean", "std", "n"}}}``; every bin is
        present, an empty one has n = 0 and NaN mean/std. Std is the population std (ddof=0).
    """
    groups: dict[str, list[Mapping[str, Any]]] = {"overall": [], **{name: [] for name in SIZE_BINS}}
    for rec in records:
        size = rec.get("size_bin")
        if size is None:
            size = lesion_size_bin(rec["num_voxels"], rec["spacing"])
        if size not in SIZE_BINS:
            raise ValueError(f"unknown size bin {size!r}")
        if len(rec["dice"]) == 0:
            raise ValueError("a record needs at least one Dice value")
        groups["overall"].append(rec)
        groups[size].append(rec)

    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, recs in groups.items():
        curves = [list(r["dice"]) for r in recs]
        row = {f"dice@{k}": _stats([c[min(k, len(c)) - 1] for c in curves]) for k in ks}
        for thr in noc_thresholds:
            row[f"noc@{round(thr * 100)}"] = _stats([float(number_of_clicks(c, thr, max_clicks)) for c in curves])
        out[name] = row
    return out
