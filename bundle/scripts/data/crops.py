"""Lesion-centred crops: connected lesions, the SAM-Med3D crop and its intensity normalisation, and the MONAI transforms
that crop one lesion per sample (deterministic for validation, uniform over lesions with jitter for training).

Keys added by the lesion crop (all samples get all of them, so they collate):
    ``label``        (1, S, S, S) the chosen lesion only when ``instance=True`` (else all lesions)
    ``label_all``    (1, S, S, S) all lesions, same crop
    ``crop_start``   int64 (3,) first crop voxel in the resampled grid (negative where the crop was padded)
    ``lesion_index`` int, rank of the chosen lesion by size (0 = largest), -1 if the label is empty
    ``num_lesions``  int, connected components in the resampled label
    ``lesion_voxels`` int, voxels of the chosen lesion in the resampled grid
The crop and pad are also recorded in the MetaTensors' ``applied_operations`` so ``Compose.inverse``/``Invertd``
can undo them (then ``Spacingd``/``Orientationd`` undo the resampling).
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Randomizable
from monai.transforms.croppad.array import Crop, Pad
from monai.utils import convert_to_dst_type, convert_to_tensor
from scipy import ndimage

__all__ = [
    "NORMALISATIONS",
    "LesionCropd",
    "RandLesionCropd",
    "centred_crop_start",
    "crop_at",
    "lesion_components",
    "lesion_crops",
    "normalise_crop",
    "paste_crop",
    "window_region",
]


NORMALISATIONS = ("upstream", "robust")
ROBUST_PERCENTILES = (0.5, 99.5)


def normalise_crop(crop: torch.Tensor | np.ndarray, mode: str = "upstream") -> torch.Tensor | np.ndarray:
    """Intensity normalisation of one crop; ``mode`` is a preprocessing setting of the model (see below).

    ``"upstream"``: z-normalisation exactly like SAM-Med3D (torchio ``ZNormalization(masking_method=lambda x: x >
    0)``). Mean and (unbiased) std are taken over the voxels > 0 only, but the shift/scale is applied to EVERY
    voxel, so zero padding and air become ``-mean/std`` (not 0). MONAI's ``NormalizeIntensity(nonzero=True)``
    differs on three counts (mask ``!= 0`` not ``> 0``, leaves zeros at 0, population std), hence this function.
    Made for MR-like intensities: on CT (HU) the mask "> 0" drops air, fat and water-like tissue.

    ``"robust"``: for CT (HU, negative values, bone and metal outliers) and MR alike, with no flag: clip the crop to
    its own 0.5th-99.5th percentiles, then z-normalise over ALL crop voxels (population std). A constant crop
    becomes all zeros.

    Args:
        crop: one sample, any shape (typically (1, S, S, S)); MetaTensor meta is kept.
        mode: ``"upstream"`` or ``"robust"``.

    Returns:
        float32 tensor (or ndarray for ndarray input) of the same shape. ``"upstream"`` returns the crop unchanged
        (as float) when fewer than two voxels are > 0 or their std is 0 (torchio raises there; an all-air crop is
        not an error for us).
    """
    if mode not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {mode!r}")
    is_numpy = isinstance(crop, np.ndarray)
    x = torch.as_tensor(crop).float()
    x = _robust_normalise(x) if mode == "robust" else _upstream_normalise(x)
    return x.numpy() if is_numpy else x


def _upstream_normalise(x: torch.Tensor) -> torch.Tensor:
    plain = x.as_tensor() if isinstance(x, MetaTensor) else x
    values = plain[plain > 0]
    if values.numel() >= 2:
        mean, std = values.mean(), values.std()
        if torch.isfinite(std) and std > 0:
            x = (x - mean) / std
    return x


def _robust_normalise(x: torch.Tensor) -> torch.Tensor:
    plain = x.as_tensor() if isinstance(x, MetaTensor) else x
    if plain.numel() == 0:
        return x
    # numpy's partition-based percentile: no size cap (torch.quantile stops at 2**24 values) and no full sort
    low, high = np.percentile(plain.detach().cpu().numpy(), ROBUST_PERCENTILES)
    x = x.clamp(float(low), float(high))
    plain = x.as_tensor() if isinstance(x, MetaTensor) else x
    mean, std = plain.mean(), plain.std(unbiased=False)
    if not torch.isfinite(std) or std <= 0:
        return x - mean  # constant crop: all zeros
    return (x - mean) / std


def lesion_components(
    label: torch.Tensor | np.ndarray, connectivity: int = 3
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Connected components of ``label > 0``, numbered by decreasing size.

    Args:
        label: (1, X, Y, Z) or (X, Y, Z).
        connectivity: 1 = faces (6-neighbourhood), 2 = +edges (18), 3 = +corners (26, default: a lesion that is
            only diagonally connected across thick slices stays one lesion).

    Returns:
        components (X, Y, Z) int32 with 0 = background and k = k-th largest lesion (1-based), sizes (n,) voxel
        counts in that order, bounding boxes [(lo (3,), hi (3,) inclusive)] in that order.
    """
    arr = np.asarray(label.detach().cpu() if isinstance(label, torch.Tensor) else label)
    if arr.ndim == 4:
        arr = arr[0]
    comps, n = ndimage.label(arr > 0, structure=ndimage.generate_binary_structure(3, connectivity))
    if n == 0:
        return comps.astype(np.int32), np.zeros(0, dtype=np.int64), []
    sizes = np.bincount(comps.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-sizes, kind="stable")
    remap = np.zeros(n + 1, dtype=np.int32)
    remap[order + 1] = np.arange(1, n + 1, dtype=np.int32)
    objects = ndimage.find_objects(comps)
    bboxes = [
        (np.array([s.start for s in objects[i]]), np.array([s.stop - 1 for s in objects[i]])) for i in order.tolist()
    ]
    return remap[comps], sizes[order], bboxes


def centred_crop_start(centre: Sequence[float] | np.ndarray, size: int) -> np.ndarray:
    """First voxel (3,) int64 of the ``size``^3 crop whose index ``size // 2`` lands on voxel ``round(centre)``, as
    in MONAI's centre crops."""
    return np.floor(np.asarray(centre, dtype=np.float64) + 0.5).astype(np.int64) - int(size) // 2


def lesion_crops(
    image: torch.Tensor, label: torch.Tensor, size: int, connectivity: int = 3, normalisation: str = "upstream"
):
    """One crop per lesion of a preprocessed case, the way the evaluation protocol scores lesions.

    Every connected component of ``label`` (largest first) gets the ``size``^3 crop centred on its bounding box,
    the image normalised within the crop (``normalisation``, see :func:`normalise_crop`) and the target that
    component only (other lesions are background).

    Args:
        image, label: (1, X, Y, Z) preprocessed volumes.

    Yields:
        (k, lesion voxels in the volume, crop start (3,), image crop (1, S, S, S) float tensor, target (S, S, S) bool
        ndarray). A target can be empty for a pathological shape with no voxel in its own centred crop.
    """
    comps, sizes, bboxes = lesion_components(label, connectivity)
    for k, (lo, hi) in enumerate(bboxes):
        start = centred_crop_start((lo + hi) / 2.0, size)
        crop = convert_to_tensor(normalise_crop(crop_at(image, start, size), normalisation), track_meta=False)
        lesion = torch.as_tensor(comps == k + 1)[None].float()
        target = convert_to_tensor(crop_at(lesion, start, size), track_meta=False)[0].numpy() > 0.5
        yield k, int(sizes[k]), start, crop, target


_CROPPER, _PADDER = Crop(), Pad(mode="constant")


def window_region(start: Sequence[int], size: int, shape: Sequence[int]) -> tuple[tuple, tuple] | None:
    """(volume slices, window slices) of the part of window ``start`` (side ``size``) inside ``shape``."""
    lo = [max(int(s), 0) for s in start]
    hi = [min(int(s) + size, n) for s, n in zip(start, shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    dst = tuple(slice(l, h) for l, h in zip(lo, hi))
    src = tuple(slice(l - int(s), h - int(s)) for l, h, s in zip(lo, hi, start))
    return dst, src


def crop_at(
    img: torch.Tensor,
    start: Sequence[int],
    roi_size: Sequence[int] | int,
    cropper: Crop = _CROPPER,
    padder: Pad = _PADDER,
) -> torch.Tensor:
    """Crop ``img`` (C, X, Y, Z) to ``roi_size`` starting at voxel ``start`` (may be negative / run past the end).

    Out-of-volume parts are zero-padded, so the crop's voxel ``start + i`` is always at crop index ``i`` (MONAI's
    symmetric ``SpatialPad`` after ``SpatialCrop`` would shift it). Uses MONAI's ``Crop``/``Pad`` so both steps are
    recorded in ``applied_operations`` and can be inverted with the same ``cropper``/``padder`` instances.
    """
    size = np.broadcast_to(np.asarray(roi_size, dtype=np.int64), (3,))
    start = np.asarray(start, dtype=np.int64)
    shape = np.asarray(img.shape[1:])
    lo, hi = np.clip(start, 0, shape), np.clip(start + size, 0, shape)
    out = cropper(img, tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)))
    to_pad = [(0, 0)] + [(int(a - s), int(s + n - b)) for a, b, s, n in zip(lo, hi, start, size)]
    return padder(out, to_pad=to_pad)


def paste_crop(crop: torch.Tensor, start: Sequence[int], spatial_shape: Sequence[int], fill: float = 0) -> torch.Tensor:
    """Inverse of ``crop_at`` for a prediction: put ``crop`` (C, S, S, S) into a ``fill`` volume (C, *spatial_shape)."""
    out = torch.full((crop.shape[0], *spatial_shape), fill, dtype=crop.dtype, device=crop.device)
    start = np.asarray(start, dtype=np.int64)
    size = np.asarray(crop.shape[1:])
    lo, hi = np.clip(start, 0, spatial_shape), np.clip(start + size, 0, spatial_shape)
    if np.any(hi <= lo):
        return out
    dst = (slice(None),) + tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    src = (slice(None),) + tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
    out[dst] = torch.as_tensor(crop)[src]
    return out


class LesionCropd(MapTransform, InvertibleTransform):
    """Crop ``roi_size``^3 centred on the bounding box of one lesion (deterministic version).

    MONAI's ``RandCropByPosNegLabeld``/``RandCropByLabelClassesd`` pick a foreground *voxel*, so a lesion is chosen
    in proportion to its volume and small lesions are rarely seen; here lesions are connected components and the
    choice is per component. The lesion is ``data[lesion_index_key]`` if present, else ``lesion_index``
    (0 = largest). With an empty label the volume centre is used and ``lesion_index`` is -1.

    Args:
        keys: keys cropped identically (image and label).
        label_key: label (1, X, Y, Z) whose components define the lesions.
        roi_size: crop side S (128 for SAM-Med3D, 64 for the CPU preset).
        instance: replace ``label_key`` by the chosen lesion only (interactive single-object target).
        all_label_key: where to keep all lesions (cropped alike); None to skip.
        connectivity: see :func:`lesion_components`.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        label_key: str = "label",
        roi_size: int = 128,
        instance: bool = True,
        lesion_index: int = 0,
        lesion_index_key: str | None = "lesion_index",
        all_label_key: str | None = "label_all",
        connectivity: int = 3,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.roi_size = int(roi_size)
        self.instance = instance
        self.lesion_index = lesion_index
        self.lesion_index_key = lesion_index_key
        self.all_label_key = all_label_key
        self.connectivity = connectivity
        self._cropper, self._padder = Crop(), Pad(mode="constant")  # own instances: inverse checks their ids

    def _choose(self, data: Mapping[Hashable, Any], n: int) -> int:
        idx = int(data.get(self.lesion_index_key, self.lesion_index)) if self.lesion_index_key else self.lesion_index
        if n and not -n <= idx < n:
            raise ValueError(f"lesion index {idx} requested but the label has {n} lesions")
        return idx % n if n else -1

    def _start(self, centre: np.ndarray, lo: np.ndarray | None, hi: np.ndarray | None) -> np.ndarray:
        return centred_crop_start(centre, self.roi_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        comps, sizes, bboxes = lesion_components(label, self.connectivity)
        idx = self._choose(d, len(sizes))
        if idx >= 0:
            lo, hi = bboxes[idx]
            start = self._start((lo + hi) / 2.0, lo, hi)
        else:
            start = self._start((np.asarray(label.shape[1:]) - 1) / 2.0, None, None)

        keys = list(self.key_iterator(d))
        if self.all_label_key is not None:
            d[self.all_label_key] = label
            keys.append(self.all_label_key)
        if self.instance and idx >= 0:
            # same type, dtype and meta as the label, only the chosen lesion set
            d[self.label_key] = convert_to_dst_type((comps == idx + 1)[None], label, dtype=label.dtype)[0]
        for key in keys:
            d[key] = crop_at(d[key], start, self.roi_size, self._cropper, self._padder)
        d["crop_start"] = start
        d["lesion_index"] = idx
        d["num_lesions"] = len(sizes)
        d["lesion_voxels"] = int(sizes[idx]) if idx >= 0 else 0
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if self.all_label_key is not None and self.all_label_key in d:
            keys.append(self.all_label_key)
        for key in keys:
            d[key] = self._cropper.inverse(self._padder.inverse(d[key]))
        return d


class RandLesionCropd(Randomizable, LesionCropd):
    """:class:`LesionCropd` with the lesion drawn uniformly among components and a random jitter of the centre.

    Every lesion, however small, is equally likely (upstream SAM-Med3D skipped crops with <= 1000 label voxels).
    ``jitter`` (default ``roi_size // 8``) shifts the crop by up to that many voxels per axis, restricted so the
    lesion's bounding box stays inside the crop whenever it fits.
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), jitter: int | None = None, **kwargs: Any):
        super().__init__(keys, **kwargs)
        self.jitter = self.roi_size // 8 if jitter is None else int(jitter)

    def randomize(self, data: Any = None) -> None:  # the draws depend on the label, see _choose/_start
        pass

    def _choose(self, data: Mapping[Hashable, Any], n: int) -> int:
        return int(self.R.randint(n)) if n else -1

    def _start(self, centre: np.ndarray, lo: np.ndarray | None, hi: np.ndarray | None) -> np.ndarray:
        base = super()._start(centre, lo, hi)
        if self.jitter <= 0:
            return base
        low, high = base - self.jitter, base + self.jitter
        if lo is not None:
            keep_lo, keep_hi = hi - self.roi_size + 1, lo  # crop starts that keep the whole bounding box
            fits = np.maximum(low, keep_lo) <= np.minimum(high, keep_hi)
            low = np.where(fits, np.maximum(low, keep_lo), low)
            high = np.where(fits, np.minimum(high, keep_hi), high)
        return np.array([self.R.randint(a, b + 1) for a, b in zip(low, high)], dtype=np.int64)
