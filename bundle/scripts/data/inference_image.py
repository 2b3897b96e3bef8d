"""An image alone through the training preprocessing, for interactive inference, and the map between the file's
voxels and the resampled grid the network sees.

Geometry (docs/conventions.md): file voxel (i, j, k) --original affine--> world mm (RAS) --resampled affine^-1-->
voxel of the RAS grid at ``spacing`` mm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from .transforms import get_preprocess_transforms

__all__ = ["InferenceImage", "file_voxel_to_resampled", "preprocess_image_for_inference", "resampled_to_file_voxel"]


@dataclass
class InferenceImage:
    """Result of :func:`preprocess_image_for_inference`.

    Attributes:
        image: (1, X, Y, Z) float32 MetaTensor, RAS, isotropic ``spacing`` mm, NOT normalised (normalise the crop).
        original_affine: (4, 4) file voxel index (array index after MONAI ``LoadImage``) -> world mm (RAS).
        resampled_affine: (4, 4) voxel index of ``image`` -> world mm.
        original_shape: spatial shape of the file array.
    """

    image: MetaTensor
    original_affine: np.ndarray
    resampled_affine: np.ndarray
    original_shape: tuple[int, ...]


def preprocess_image_for_inference(
    image: str | os.PathLike | torch.Tensor,
    spacing: float = 1.5,
    image_channel: int | None = None,
    ct_clamp: bool = False,
) -> InferenceImage:
    """Run the training preprocessing on an image alone (same transforms, ``label_key=None``).

    Args:
        image: a file path (read with MONAI ``LoadImage``), or an already loaded channel-first MetaTensor
            (C, X, Y, Z) / (X, Y, Z) whose ``affine`` maps its voxels to world.
    """
    pre = get_preprocess_transforms(None, image_channel, ct_clamp, spacing, label_key=None, load=False)
    if isinstance(image, torch.Tensor):
        img = image if isinstance(image, MetaTensor) else MetaTensor(image)
        img = img[None] if img.ndim == 3 else img
    else:
        loaded = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")])({"image": image})
        img = loaded["image"]
    original_affine = np.asarray(img.affine, dtype=np.float64)
    original_shape = tuple(int(s) for s in img.shape[1:])
    out = pre({"image": img})["image"]
    return InferenceImage(out, original_affine, np.asarray(out.affine, dtype=np.float64), original_shape)


def _apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ affine[:3, :3].T + affine[:3, 3]


def file_voxel_to_resampled(
    points_ijk: np.ndarray | torch.Tensor | Sequence, original_affine: np.ndarray, resampled_affine: np.ndarray
) -> np.ndarray:
    """Map file voxel indices (N, 3) to float voxel coordinates (N, 3) of the resampled RAS grid via world mm."""
    pts = np.asarray(torch.as_tensor(points_ijk).cpu(), dtype=np.float64).reshape(-1, 3)
    world = _apply_affine(np.asarray(original_affine, np.float64), pts)
    return _apply_affine(np.linalg.inv(np.asarray(resampled_affine, np.float64)), world)


def resampled_to_file_voxel(
    points: np.ndarray | torch.Tensor | Sequence, original_affine: np.ndarray, resampled_affine: np.ndarray
) -> np.ndarray:
    """Inverse of :func:`file_voxel_to_resampled`: resampled voxel coordinates (N, 3) -> file voxel indices (N, 3)."""
    return file_voxel_to_resampled(points, resampled_affine, original_affine)
