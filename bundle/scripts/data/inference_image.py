"""An image alone through the training preprocessing, for interactive inference, and the map between the file's
voxels and the resampled grid the network sees.

Geometry (docs/conventions.md): file voxel (i, j, k) --original affine--> world mm (RAS) --resampled affine^-1-->
voxel of the RAS grid at ``spacing`` mm.

The whole volume is never resampled for a click: :meth:`InferenceImage.crop` resamples one network window straight
from the file's grid, with the same interpolation as the training transforms' ``Spacingd`` (bilinear, border
padding, float64 arithmetic). On a 512 x 512 x 100 CT that turns a one-second resampling into a few milliseconds.
Files are read with MONAI's ``ITKReader`` without ``LoadImage``'s copy into C order (:func:`load_image`).
"""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.data import ITKReader, MetaTensor
from monai.transforms import EnsureChannelFirst, LoadImage, Orientationd, Spacingd, SpatialResample

from .crops import window_region
from .transforms import RAS_LABELS, get_preprocess_transforms

__all__ = [
    "ImageReadError",
    "InferenceImage",
    "file_voxel_to_resampled",
    "load_image",
    "preprocess_image_for_inference",
    "resampled_to_file_voxel",
]


def translation(offset: Sequence[float]) -> np.ndarray:
    out = np.eye(4)
    out[:3, 3] = offset
    return out


@dataclass
class InferenceImage:
    """Result of :func:`preprocess_image_for_inference`.

    Attributes:
        source: (1, X, Y, Z) MetaTensor on the FILE's grid, channel picked and CT clamp applied, in the file's voxel
            type (see :func:`load_image`; windows are float32).
        original_affine: (4, 4) file voxel index (array index after MONAI ``LoadImage``) -> world mm (RAS).
        resampled_affine: (4, 4) voxel index of the resampled RAS grid at ``spacing`` mm -> world mm.
        original_shape: spatial shape of the file array.
        resampled_shape: spatial shape of the resampled grid.
        spacing: the resampled grid's voxel size in mm.
    """

    source: MetaTensor
    original_affine: np.ndarray
    resampled_affine: np.ndarray
    original_shape: tuple[int, ...]
    resampled_shape: tuple[int, ...]
    spacing: float

    @functools.cached_property
    def image(self) -> MetaTensor:
        """(1, X, Y, Z) float32 the whole resampled volume (the training transforms; computed once, on demand)."""
        pre = get_preprocess_transforms(None, None, False, self.spacing, label_key=None, load=False)
        return pre({"image": self.source})["image"]

    @property
    def nbytes(self) -> int:
        held = [self.source] + ([self.__dict__["image"]] if "image" in self.__dict__ else [])
        return sum(t.numel() * t.element_size() for t in held)

    def crop(self, start: Sequence[int], size: int) -> torch.Tensor:
        """(1, S, S, S) float32 window of the resampled volume at voxel ``start`` (``crop_at(self.image, start, S)``
        up to float rounding), resampled from the file's grid; zero outside the resampled volume."""
        out = torch.zeros((1, size, size, size), dtype=torch.float32)
        region = window_region(start, size, self.resampled_shape)
        if region is None:
            return out
        lo, hi = [d.start for d in region[0]], [d.stop for d in region[0]]
        box_lo, box_hi = self._source_box(lo, hi)
        sub = self.source[(slice(None), *(slice(a, b) for a, b in zip(box_lo, box_hi)))]
        affine = torch.as_tensor(self.original_affine @ translation(box_lo))
        sub = MetaTensor(sub.as_tensor().to(torch.float32), affine=affine)
        window = SpatialResample()(  # Spacingd's defaults: bilinear, border padding, float64 arithmetic
            sub,
            dst_affine=torch.as_tensor(self.resampled_affine @ translation(lo)),
            spatial_size=[b - a for a, b in zip(lo, hi)],
        )
        out[(slice(None), *region[1])] = torch.as_tensor(window, dtype=torch.float32)
        return out

    def file_extent(self, first: Sequence[float], last: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) file voxel coordinates of the resampled-grid box with corner voxels ``first`` and ``last``."""
        corners = np.asarray(list(itertools.product(*zip(first, last))), dtype=np.float64)
        pts = resampled_to_file_voxel(corners, self.original_affine, self.resampled_affine)
        return pts.min(axis=0), pts.max(axis=0)

    def _source_box(self, lo: Sequence[int], hi: Sequence[int]) -> tuple[list[int], list[int]]:
        """File-grid box holding every voxel that bilinear interpolation reads for resampled voxels [lo, hi)."""
        low, high = self.file_extent(lo, [h - 1 for h in hi])
        box_lo = np.floor(low).astype(int) - 1
        box_hi = np.ceil(high).astype(int) + 2
        shape = np.asarray(self.original_shape)
        box_lo = np.clip(box_lo, 0, shape - 1)  # beyond the file, border padding repeats its edge voxels
        box_hi = np.clip(box_hi, box_lo + 1, shape)
        return [int(v) for v in box_lo], [int(v) for v in box_hi]


# voxel types kept as read: torch has every operation the preprocessing runs on them (not so for uint16 / uint32)
KEPT_DTYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.float32, np.float64)}


class ImageReadError(ValueError):
    """An image file that no reader opens: corrupt, truncated or not an image (a ``ValueError``: bad input)."""


def load_image(path: str | os.PathLike) -> MetaTensor:
    """(C, X, Y, Z) image of a file: the array and affine of ``LoadImage(ensure_channel_first=True)``, in the file's
    voxel type where torch supports it (else float32).

    ``LoadImage`` copies every array into C-ordered float32. For a 512 x 512 x 100 CT read by ITK (Fortran-ordered
    arrays) that transposing copy, a fresh 100 MB to fault in, and the slower NRRD reader cost 0.3-0.8 s of a first
    click. Here the array stays ITK's buffer (the view keeps the ITK image alive) and windows are converted when
    they are cropped. Files ITK cannot read go through ``LoadImage`` and its other readers; a file none of them
    reads raises :class:`ImageReadError`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no image file {path}")
    reader = ITKReader()
    try:
        array, meta = reader.get_data(reader.read(path))
    except Exception:  # not an ITK format (or a broken file): MONAI's other readers get a chance
        try:
            return LoadImage(image_only=True, ensure_channel_first=True)(path)
        except MemoryError:
            raise
        except Exception as err:
            name = os.path.basename(path)
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0].replace(path, name)[:200]
            raise ImageReadError(f"the image file {name} cannot be read: {reason}") from err
    array = np.asarray(array)
    if array.dtype not in KEPT_DTYPES:
        array = array.astype(np.float32, order="K")  # keeps the memory order
    meta["filename_or_obj"] = path
    affine = torch.as_tensor(meta.pop("affine"), dtype=torch.float64)
    return EnsureChannelFirst()(MetaTensor(torch.from_numpy(array), affine=affine, meta=meta))


def resampled_geometry(source: MetaTensor, spacing: float) -> tuple[np.ndarray, tuple[int, ...]]:
    """(affine, spatial shape) of the training transforms' RAS grid at ``spacing`` mm, without resampling (lazy)."""
    data = {"image": MetaTensor(source.as_tensor(), affine=source.affine)}  # shares storage
    for transform in (Orientationd("image", axcodes="RAS", labels=RAS_LABELS), Spacingd("image", pixdim=spacing)):
        data = transform(data, lazy=True)  # not in a Compose: it would apply the pending operations at its end
    pending = data["image"]
    affine = np.asarray(pending.peek_pending_affine(), dtype=np.float64)
    return affine, tuple(int(n) for n in pending.peek_pending_shape())


def preprocess_image_for_inference(
    image: str | os.PathLike | torch.Tensor,
    spacing: float = 1.5,
    image_channel: int | None = None,
    ct_clamp: bool = False,
) -> InferenceImage:
    """Run the training preprocessing's voxel-wise part (channel, clamp) on an image alone, and work out the
    resampled grid; the resampling itself runs per window (:meth:`InferenceImage.crop`) or on demand (``image``).

    Args:
        image: a file path (read with :func:`load_image`), or an already loaded channel-first MetaTensor
            (C, X, Y, Z) / (X, Y, Z) whose ``affine`` maps its voxels to world.
    """
    if isinstance(image, torch.Tensor):
        img = image if isinstance(image, MetaTensor) else MetaTensor(image)
        img = img[None] if img.ndim == 3 else img
    else:
        img = load_image(image)
    original_affine = np.asarray(img.affine, dtype=np.float64)
    original_shape = tuple(int(s) for s in img.shape[1:])
    voxelwise = get_preprocess_transforms(
        None, image_channel, ct_clamp, label_key=None, load=False, resample=False, dtype=None
    )
    source = MetaTensor(voxelwise({"image": img})["image"].as_tensor(), affine=img.affine)
    resampled_affine, resampled_shape = resampled_geometry(source, spacing)
    return InferenceImage(source, original_affine, resampled_affine, original_shape, resampled_shape, float(spacing))


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
