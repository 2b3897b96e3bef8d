"""Uncertainty score of an unlabeled image: flip test-time-augmentation disagreement of automatic click proposals.

What it measures (docs/monailabel.md): how much the model's one-click lesion proposals change when the image is
mirrored. For one image:

1. preprocess exactly like inference (RAS, ``spacing`` mm) and take one ``S``³ crop (the network's input size)
   centred on the body (centroid of voxels brighter than 10 % of the 99th intensity percentile), normalised like
   training (the model's ``normalisation``);
2. pick ``K`` candidate clicks automatically: the strongest blob-like structures (largest scale-normalised
   Laplacian-of-Gaussian magnitude at 3 and 6 mm, inside the body, at least ``S/8`` voxels apart) -- where an
   annotator would plausibly click on a lesion;
3. for every TTA member (identity and one mirror per flip axis) encode the (mirrored) crop once and decode all ``K``
   one-click proposals in one batch (round-one prompt: the click plus an all-zero mask, as SAM-Med3D was trained);
   mirror the low-res logits back;
4. per candidate, disagreement ``d_k = 1 - mean pairwise Dice`` of the members' masks (``logits > 0``; two empty
   masks agree, Dice 1); the image score is ``mean_k d_k`` in [0, 1]: 0 = the proposals do not depend on the
   mirroring, 1 = every member proposes something disjoint.

An image whose proposals flip-flop is one the current model has not learnt (the anatomy or contrast is unfamiliar),
so labelling it teaches the model most. Cost: ``1 + len(flip_axes)`` encoder runs per image.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage
from scripts.data.crops import crop_at, normalise_crop
from scripts.data.inference_image import preprocess_image_for_inference, resampled_to_file_voxel
from scripts.training.click_rounds import initial_mask_prompt

logger = logging.getLogger(__name__)

SCORE_KEY = "sgpsam_uncertainty"


def body_centre(volume: np.ndarray) -> np.ndarray:
    """Centroid (X, Y, Z) voxel of the voxels above 10 % of the 99th percentile of the positive intensities."""
    positive = volume[volume > 0]
    if positive.size == 0:
        return (np.asarray(volume.shape) - 1) / 2.0
    body = volume > 0.1 * np.percentile(positive, 99)
    return np.asarray(ndimage.center_of_mass(body)) if body.any() else (np.asarray(volume.shape) - 1) / 2.0


def candidate_points(crop: np.ndarray, raw: np.ndarray, k: int, spacing: float, min_distance: int) -> np.ndarray:
    """``k`` blob centres (crop voxel indices, (k', 3) int, k' <= k): largest |scale-normalised LoG| in the body.

    Args:
        crop: (S, S, S) normalised crop.
        raw: (S, S, S) crop before normalisation (0 where padded).
    """
    s = crop.shape[0]
    positive = raw[raw > 0]
    if positive.size == 0:
        return np.asarray([[s // 2] * 3])
    body = ndimage.binary_erosion(raw > 0.1 * np.percentile(positive, 99), iterations=2)
    margin = max(2, s // 16)
    inner = np.zeros_like(body)
    inner[margin:-margin, margin:-margin, margin:-margin] = True
    allowed = body & inner
    if not allowed.any():
        return np.asarray([[s // 2] * 3])
    response = np.zeros(crop.shape, dtype=np.float32)
    for radius_mm in (3.0, 6.0):
        sigma = radius_mm / spacing
        response = np.maximum(response, np.abs(sigma**2 * ndimage.gaussian_laplace(crop.astype(np.float32), sigma)))
    response[~allowed] = -np.inf
    grid = np.indices(crop.shape, sparse=True)
    points = []
    for _ in range(k):
        flat = int(np.argmax(response))
        if not np.isfinite(response.flat[flat]):
            break
        p = np.unravel_index(flat, crop.shape)
        points.append(p)
        near = sum((g - c) ** 2 for g, c in zip(grid, p)) <= min_distance**2
        response[near] = -np.inf
    return np.asarray(points, dtype=np.int64)


def pairwise_disagreement(masks: torch.Tensor) -> torch.Tensor:
    """masks (M, K, ...) bool -> (K,) ``1 - mean pairwise Dice`` over the M members (empty vs empty = Dice 1)."""
    m, k = masks.shape[:2]
    flat = masks.reshape(m, k, -1).float()
    dices = []
    for a, b in itertools.combinations(range(m), 2):
        inter = (flat[a] * flat[b]).sum(-1)
        total = flat[a].sum(-1) + flat[b].sum(-1)
        dices.append(torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total)))
    if not dices:
        return torch.zeros(k)
    return 1.0 - torch.stack(dices).mean(0)


@torch.inference_mode()
def image_uncertainty(
    network,
    image: str,
    spacing: float = 1.5,
    image_channel: int | None = None,
    ct_clamp: bool = False,
    normalisation: str = "upstream",
    num_candidates: int = 4,
    flip_axes: Sequence[int] = (0, 1, 2),
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Score one image (module docstring). Returns ``{"score", "per_candidate", "candidates", "members", ...}``."""
    t0 = time.perf_counter()
    inf = preprocess_image_for_inference(image, spacing, image_channel, ct_clamp)
    s = int(network.img_size)
    volume = inf.image[0].cpu().numpy()
    start = np.floor(body_centre(volume) + 0.5).astype(np.int64) - s // 2
    raw = crop_at(inf.image, start, s)
    crop = torch.as_tensor(normalise_crop(raw, normalisation)).as_subclass(torch.Tensor).float()  # (1, S, S, S)
    raw_np = torch.as_tensor(raw).as_subclass(torch.Tensor)[0].numpy()
    points = candidate_points(crop[0].numpy(), raw_np, num_candidates, spacing, max(2, s // 8))
    k = len(points)

    device = torch.device(device)
    labels = torch.ones((k, 1), dtype=torch.long, device=device)
    prompt = initial_mask_prompt(network, k, device)
    members = [None, *[int(a) for a in flip_axes]]
    masks = []
    for axis in members:
        x = crop if axis is None else crop.flip(axis + 1)
        emb = network.encode(x[None].to(device))
        pts = points.astype(np.float32).copy()
        if axis is not None:
            pts[:, axis] = s - 1 - pts[:, axis]
        logits, _ = network.decode(emb, torch.as_tensor(pts[:, None, :], device=device), labels, prompt)
        if axis is not None:
            logits = logits.flip(axis + 2)
        masks.append((logits[:, 0] > 0).cpu())
    per_candidate = pairwise_disagreement(torch.stack(masks))
    file_points = resampled_to_file_voxel(points + start, inf.original_affine, inf.resampled_affine)
    return {
        "score": float(per_candidate.mean()),
        "per_candidate": [round(float(v), 4) for v in per_candidate],
        "candidates": [[int(round(c)) for c in p] for p in file_points],
        "members": len(members),
        "latency_s": round(time.perf_counter() - t0, 3),
    }
