"""Crop windows of the interactive engine: where a window lies in the resampled volume, which faces a mask touches
(large-lesion extension), the union of every window's mask, and the resampling of that mask back onto the file.

A window is the ``S``³ network crop starting at voxel ``start`` of the resampled RAS volume (``start`` may be
negative or run past the end: the outside is zero-padded, see :func:`scripts.data.transforms.crop_at`).

Large lesions (SAM-Med3D: extend with 50 %-overlap windows where the mask touches the crop edge). The engine's rule,
per object and recomputed whenever the object gets new clicks:
    1. the object's mask in its main window is checked face by face (order -x, +x, -y, +y, -z, +z); a face counts
       when the mask has a voxel on the window's outermost slice there AND the resampled volume continues beyond
       that face;
    2. each such face queues a window shifted by ``S // 2`` along that axis (50 % overlap), breadth first;
       windows found touching a face are expanded the same way; a start already used is skipped; at most
       ``max_extra_windows`` (default 6) extra windows per object;
    3. an extra window is prompted with ALL of the object's clicks that fall inside it (crop coordinates), and as
       mask prompt the object's current full-resolution logits cropped to the window (where earlier windows
       overlap it; the union's maximum logit) and area-downsampled to the low-res grid; the part no window has
       seen yet is 0, i.e. the "no prior" value of round one. No click inside = a mask-only round, which SAM-Med3D
       also trained on;
    4. the object's mask is the union over its windows of ``sigmoid(upsampled logits) > 0.5``, each window's logits
       first made to agree with its clicks when the network is ``click_consistent`` (``click_rounds.shown_logits``;
       only the main window keeps just the components that hold a foreground click).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from ..data.crops import window_region
from ..data.inference_image import InferenceImage, translation

__all__ = ["LogitVolume", "inside", "merge_windows", "to_file_grid", "touching_faces", "window_region"]


def inside(point: Sequence[float], start: Sequence[int], size: int, margin: float = 0.0) -> bool:
    """Is ``point`` inside window ``start`` (``margin`` voxels in from each face; 0 = anywhere in it)?"""
    return all(st - 0.5 + margin <= p < st + size - 0.5 - margin for p, st in zip(point, start))


def touching_faces(start, window_mask: torch.Tensor, shape: Sequence[int], size: int) -> list[tuple[int, int, int]]:
    """Starts of the half-shifted windows beyond each face the mask touches where the volume continues.

    Faces in the order -x, +x, -y, +y, -z, +z; a face counts when the mask has a voxel on the window's outermost
    slice there and the volume continues beyond it; the new window is shifted by ``size // 2`` (50 % overlap).
    """
    half = size // 2
    out = []
    for axis in range(3):
        for side in (-1, 1):
            if side < 0 and start[axis] <= 0:
                continue  # nothing beyond the face: the window already starts at (or before) the volume edge
            if side > 0 and start[axis] + size >= shape[axis]:
                continue
            face = window_mask.select(axis, 0 if side < 0 else size - 1)
            if bool(face.any()):
                new = list(start)
                new[axis] += side * half
                out.append(tuple(new))
    return out


class LogitVolume:
    """One object's crop-resolution logits over the resampled volume, window by window (kept per window, so a CT of
    millions of voxels costs nothing extra).

    Where windows overlap, the maximum logit counts; where no window has looked yet the value is 0, the "no prior"
    value of round one, and outside the volume it is 0 too. An extension window's mask prompt is :meth:`prior`.
    """

    def __init__(self, shape: Sequence[int], size: int) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.size = int(size)
        self.windows: list[tuple[tuple[int, ...], torch.Tensor]] = []

    def add(self, start, full: torch.Tensor) -> torch.Tensor:
        """Add one window's (S, S, S) logits; returns its in-volume mask (S, S, S) bool."""
        s = self.size
        window_mask = torch.zeros((s, s, s), dtype=torch.bool)
        region = window_region(start, s, self.shape)
        if region is not None:
            window_mask[region[1]] = full[region[1]] > 0
            self.windows.append((tuple(int(v) for v in start), full))
        return window_mask

    def prior(self, start) -> torch.Tensor:
        """(S, S, S) float32 logits of the window at ``start``: the added windows' maximum where they overlap it."""
        s = self.size
        out = torch.zeros((s, s, s))
        covered = torch.zeros((s, s, s), dtype=torch.bool)
        for other, full in self.windows:
            lo = [max(a, b, 0) for a, b in zip(start, other)]
            hi = [min(a + s, b + s, n) for a, b, n in zip(start, other, self.shape)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            here = tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, start))
            there = tuple(slice(l - b, h - b) for l, h, b in zip(lo, hi, other))
            sub = full[there].float()
            out[here] = torch.where(covered[here], torch.maximum(out[here], sub), sub)
            covered[here] = True
        return out


def merge_windows(objects: Sequence, shape: Sequence[int], size: int) -> tuple[list[int], torch.Tensor] | None:
    """Union of every object's windows (sigmoid > 0.5 of the crop-resolution logits) in the resampled grid, held
    only over the windows' bounding box: (box start, bool mask of the box), or None when no window is in the volume.
    """
    parts = []
    for obj in objects:
        for start, full in [(obj.start, obj.full), *obj.extra]:
            region = window_region(start, size, shape)
            if region is not None and full is not None:
                parts.append((*region, full))
    if not parts:
        return None
    lo = [min(dst[a].start for dst, _, _ in parts) for a in range(3)]
    hi = [max(dst[a].stop for dst, _, _ in parts) for a in range(3)]
    box = torch.zeros([h - l for l, h in zip(lo, hi)], dtype=torch.bool)
    for dst, src, full in parts:
        box[tuple(slice(d.start - l, d.stop - l) for d, l in zip(dst, lo))] |= full[src] > 0
    return lo, box


def to_file_grid(merged: tuple[list[int], torch.Tensor] | None, inf: InferenceImage) -> tuple[list[int], np.ndarray]:
    """Nearest resampling of :func:`merge_windows`' box onto the file's grid: (start in the file grid, uint8 part
    of the file-grid mask there; zero elsewhere). Only the file voxels whose nearest resampled voxel can lie in
    the box are computed; every other one would read zero padding, so the result equals resampling the whole
    resampled-grid mask."""
    empty = ([0, 0, 0], np.zeros((0, 0, 0), dtype=np.uint8))
    if merged is None or not bool(merged[1].any()):
        return empty
    lo, box = merged
    hi = [l + n for l, n in zip(lo, box.shape)]
    low, high = inf.file_extent([l - 1 for l in lo], hi)  # a margin of one voxel
    shape = np.asarray(inf.original_shape)
    file_lo = np.clip(np.floor(low).astype(int), 0, shape)
    file_hi = np.clip(np.ceil(high).astype(int) + 1, file_lo, shape)
    if np.any(file_hi <= file_lo):
        return empty
    src = MetaTensor(box[None].float(), affine=torch.as_tensor(inf.resampled_affine @ translation(lo)))
    out = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float32)(
        src,
        dst_affine=torch.as_tensor(inf.original_affine @ translation(file_lo)),
        spatial_size=[int(n) for n in file_hi - file_lo],
    )
    return [int(v) for v in file_lo], (torch.as_tensor(out)[0] > 0.5).cpu().numpy().astype(np.uint8)
