"""MONAI dictionary pipelines that reproduce SAM-Med3D's preprocessing, plus lesion-balanced cropping.

Order (what the released SAM-Med3D weights expect):
    load -> channel first -> [pick one input channel] -> [CT clamp to [-1000, 1000]] -> [keep target label(s), binarise]
    -> Orientation RAS -> Spacing 1.5 mm (bilinear image / nearest label)            = deterministic, cacheable
    -> crop ``roi_size``^3 centred on one lesion, zero padding -> z-normalise the crop  = random part (training)

Shapes follow docs/conventions.md: channel-first ``(C, X, Y, Z)`` in RAS voxel order; C = 1 after preprocessing.

Optional anatomy mask (TAGS anatomy prompt, ``anatomy_key``, e.g. ``"organ"``): loaded from the item's own file, or
copied from the label file (``anatomy_from_label``: MSD Liver's liver + tumour labels), binarised, resampled with
nearest neighbour and cropped with the image, so it reaches the network as ``(1, S, S, S)`` like the label.

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

import json
import os
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, load_decathlon_datalist
from monai.transforms import (
    AsDiscreted,
    Compose,
    CopyItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    InvertibleTransform,
    LabelFilterd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandFlipd,
    Randomizable,
    RandRotate90d,
    RandScaleIntensityd,
    Spacingd,
    ThresholdIntensityd,
)
from monai.transforms.croppad.array import Crop, Pad
from monai.utils import convert_to_dst_type, convert_to_tensor
from scipy import ndimage

__all__ = [
    "CT_CLAMP_RANGE",
    "InferenceImage",
    "LesionCropd",
    "NormaliseCropd",
    "RandLesionCropd",
    "RequireKeysd",
    "SelectChanneld",
    "crop_at",
    "file_voxel_to_resampled",
    "get_crop_transforms",
    "get_preprocess_transforms",
    "get_train_transforms",
    "get_val_transforms",
    "lesion_components",
    "lesion_items",
    "load_datalist",
    "normalise_crop",
    "paste_crop",
    "preprocess_image_for_inference",
    "resampled_to_file_voxel",
]

CT_CLAMP_RANGE = (-1000.0, 1000.0)


# ----------------------------------------------------------------------------------------------------------------
# Small building blocks
# ----------------------------------------------------------------------------------------------------------------
def normalise_crop(crop: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Z-normalise one crop exactly like SAM-Med3D (torchio ``ZNormalization(masking_method=lambda x: x > 0)``).

    Mean and (unbiased) std are taken over the voxels > 0 only, but the shift/scale is applied to EVERY voxel, so
    zero padding and air become ``-mean/std`` (not 0). MONAI's ``NormalizeIntensity(nonzero=True)`` differs on
    three counts (mask ``!= 0`` not ``> 0``, leaves zeros at 0, population std), hence this function. Training and
    inference both call it so they cannot drift apart.

    Args:
        crop: one sample, any shape (typically (1, S, S, S)); MetaTensor meta is kept.

    Returns:
        float32 tensor (or ndarray for ndarray input) of the same shape. Returned unchanged (as float) when fewer
        than two voxels are > 0 or their std is 0 (torchio raises there; an all-air crop is not an error for us).
    """
    is_numpy = isinstance(crop, np.ndarray)
    x = torch.as_tensor(crop).float()
    plain = x.as_tensor() if isinstance(x, MetaTensor) else x
    values = plain[plain > 0]
    if values.numel() >= 2:
        mean, std = values.mean(), values.std()
        if torch.isfinite(std) and std > 0:
            x = (x - mean) / std
    return x.numpy() if is_numpy else x


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


def lesion_crops(image: torch.Tensor, label: torch.Tensor, size: int, connectivity: int = 3):
    """One crop per lesion of a preprocessed case, the way the evaluation protocol scores lesions.

    Every connected component of ``label`` (largest first) gets the ``size``^3 crop centred on its bounding box,
    the image z-normalised within the crop and the target that component only (other lesions are background).

    Args:
        image, label: (1, X, Y, Z) preprocessed volumes.

    Yields:
        (k, lesion voxels in the volume, crop start (3,), image crop (1, S, S, S) float tensor, target (S, S, S) bool
        ndarray). A target can be empty for a pathological shape with no voxel in its own centred crop.
    """
    comps, sizes, bboxes = lesion_components(label, connectivity)
    for k, (lo, hi) in enumerate(bboxes):
        start = centred_crop_start((lo + hi) / 2.0, size)
        crop = convert_to_tensor(normalise_crop(crop_at(image, start, size)), track_meta=False)
        lesion = torch.as_tensor(comps == k + 1)[None].float()
        target = convert_to_tensor(crop_at(lesion, start, size), track_meta=False)[0].numpy() > 0.5
        yield k, int(sizes[k]), start, crop, target


_CROPPER, _PADDER = Crop(), Pad(mode="constant")


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


class SelectChanneld(MapTransform):
    """Keep one input channel (C, ...) -> (1, ...); with ``channel=None`` require a single-channel image.

    MONAI has no dictionary transform that picks one channel by index and fails clearly otherwise; slicing keeps
    the MetaTensor meta (affine). E.g. MSD Task01 BrainTumour: 0 FLAIR, 1 T1w, 2 T1gd, 3 T2w.
    """

    def __init__(self, keys: KeysCollection, channel: int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channel = channel

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            n = img.shape[0]
            if self.channel is None:
                if n != 1:
                    raise ValueError(
                        f"'{key}' has {n} channels; set image_channel to the input channel to use "
                        "(e.g. MSD Task01 BrainTumour: 0 FLAIR, 1 T1w, 2 T1gd, 3 T2w)"
                    )
                continue
            if not -n <= self.channel < n:
                raise ValueError(f"image_channel={self.channel} but '{key}' has {n} channels")
            c = self.channel % n
            d[key] = img[c : c + 1]
        return d


class NormaliseCropd(MapTransform):
    """Dictionary wrapper of :func:`normalise_crop` (SAM-Med3D z-normalisation over voxels > 0)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = normalise_crop(d[key])
        return d


# ----------------------------------------------------------------------------------------------------------------
# Lesion-centred crop
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------------------------
def _as_label_list(target_label: int | Sequence[int]) -> list[int]:
    return [int(target_label)] if np.isscalar(target_label) else [int(t) for t in target_label]


class RequireKeysd(MapTransform):
    """Fail with ``hint`` when an item lacks one of ``keys`` (instead of the loader's bare KeyError)."""

    def __init__(self, keys: KeysCollection, hint: str = ""):
        super().__init__(keys)
        self.hint = hint

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        missing = [k for k in self.keys if k not in data]
        if missing:
            raise KeyError(f"item {data.get('image', '?')} has no {missing} entry. {self.hint}")
        return data


def get_preprocess_transforms(
    target_label: int | Sequence[int] | None = 1,
    image_channel: int | None = None,
    ct_clamp: bool = False,
    spacing: float = 1.5,
    image_key: str | None = "image",
    label_key: str | None = "label",
    load: bool = True,
    anatomy_key: str | None = None,
    anatomy_labels: int | Sequence[int] | None = None,
    anatomy_from_label: bool = False,
) -> Compose:
    """Deterministic part: load -> channel first -> channel pick -> CT clamp -> binary target -> RAS -> spacing.

    Output: ``image`` (1, X, Y, Z) float32 RAS at ``spacing`` mm (not normalised); ``label`` (1, X, Y, Z) float32 0/1
    where the original label is in ``target_label`` (int or list, e.g. MSD Task03 liver tumour 2, Task01 enhancing
    tumour 3; None keeps any label > 0). ``label_key=None`` builds the image-only pipeline, ``image_key=None`` the
    label-only one; ``load=False`` expects channel-first tensors already in the dict. Good for ``CacheDataset``.

    ``anatomy_key`` (None = off) adds a binary organ mask under that key, same grid as the label: where the item's
    ``anatomy_key`` file is in ``anatomy_labels`` (None = any value > 0), or, with ``anatomy_from_label``, where the
    label file is (e.g. MSD Task03: ``[1, 2]`` = liver with its tumours, so the mask has no tumour-shaped holes).
    """
    if image_key is None and label_key is None:
        raise ValueError("get_preprocess_transforms needs an image_key, a label_key or both")
    keys = [k for k in (image_key, label_key) if k is not None]
    anatomy_from_label = bool(anatomy_from_label and anatomy_key)  # inert while the anatomy prompt is off
    if anatomy_from_label and label_key is None:
        raise ValueError("anatomy_from_label needs a label_key to copy the organ mask from")
    loaded = keys + ([anatomy_key] if anatomy_key and not anatomy_from_label else [])
    xforms: list = []
    if load:
        if len(loaded) > len(keys):
            hint = "List an organ-mask file per case in dataset.json, or set anatomy_from_label (organ = label values)."
            xforms.append(RequireKeysd(anatomy_key, hint=hint))
        xforms += [LoadImaged(loaded, image_only=True), EnsureChannelFirstd(loaded)]
    if anatomy_from_label:
        xforms.append(CopyItemsd(label_key, names=anatomy_key))  # before the label keeps only the target
    if image_key is not None:
        xforms.append(SelectChanneld(image_key, channel=image_channel))
    if ct_clamp and image_key is not None:
        # two thresholds = an exact clamp (ScaleIntensityRanged would re-scale in float arithmetic)
        xforms += [
            ThresholdIntensityd(image_key, threshold=CT_CLAMP_RANGE[1], above=False, cval=CT_CLAMP_RANGE[1]),
            ThresholdIntensityd(image_key, threshold=CT_CLAMP_RANGE[0], above=True, cval=CT_CLAMP_RANGE[0]),
        ]
    if label_key is not None:
        if target_label is not None:
            xforms.append(LabelFilterd(label_key, applied_labels=_as_label_list(target_label)))
        xforms.append(AsDiscreted(label_key, threshold=0.5))
    if anatomy_key:
        if anatomy_labels is not None:
            xforms.append(LabelFilterd(anatomy_key, applied_labels=_as_label_list(anatomy_labels)))
        xforms.append(AsDiscreted(anatomy_key, threshold=0.5))
        keys = keys + [anatomy_key]
    modes = ["bilinear" if k == image_key else "nearest" for k in keys]
    xforms += [
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),  # explicit: no FutureWarning
        Spacingd(keys, pixdim=(spacing,) * 3, mode=modes),
        EnsureTyped(keys, dtype=torch.float32),
    ]
    return Compose(xforms)


def get_crop_transforms(
    roi_size: int = 128,
    jitter: int | None = None,
    instance: bool = True,
    random: bool = True,
    lesion_index: int = 0,
    image_key: str = "image",
    label_key: str = "label",
    all_label_key: str | None = "label_all",
    connectivity: int = 3,
    extra_keys: Sequence[str] = (),
) -> Compose:
    """Crop part: lesion-centred ``roi_size``^3 crop (zero padding) -> SAM-Med3D z-normalisation of the image.

    ``random=True``: :class:`RandLesionCropd` (uniform lesion choice + jitter); ``random=False``: :class:`LesionCropd`
    (lesion ``data["lesion_index"]`` or ``lesion_index``, no jitter). See the module docstring for the added keys.
    ``extra_keys`` (e.g. the anatomy mask) are cropped like the label and not normalised.
    """
    common = dict(
        keys=(image_key, label_key, *extra_keys),
        label_key=label_key,
        roi_size=roi_size,
        instance=instance,
        all_label_key=all_label_key,
        connectivity=connectivity,
    )
    crop = RandLesionCropd(jitter=jitter, **common) if random else LesionCropd(lesion_index=lesion_index, **common)
    return Compose([crop, NormaliseCropd(image_key)])


def _preprocess_and_crop(
    crop_kwargs: dict,
    target_label: int | Sequence[int] | None,
    image_channel: int | None,
    ct_clamp: bool,
    spacing: float,
    anatomy_key: str | None,
    anatomy_labels: int | Sequence[int] | None,
    anatomy_from_label: bool,
) -> Compose:
    """Preprocess + lesion crop (the organ mask, if any, cropped with the image) as ONE flat Compose, so
    CacheDataset caches everything up to the first random transform."""
    pre = get_preprocess_transforms(
        target_label,
        image_channel,
        ct_clamp,
        spacing,
        anatomy_key=anatomy_key,
        anatomy_labels=anatomy_labels,
        anatomy_from_label=anatomy_from_label,
    )
    crop = get_crop_transforms(extra_keys=(anatomy_key,) if anatomy_key else (), **crop_kwargs)
    return Compose([*pre.transforms, *crop.transforms])


def get_train_transforms(
    roi_size: int = 128,
    target_label: int | Sequence[int] | None = 1,
    image_channel: int | None = None,
    ct_clamp: bool = False,
    spacing: float = 1.5,
    jitter: int | None = None,
    instance: bool = True,
    anatomy_key: str | None = None,
    anatomy_labels: int | Sequence[int] | None = None,
    anatomy_from_label: bool = False,
    augment: bool = False,
) -> Compose:
    """Preprocess + random lesion crop (+ optional augmentation of the crop).

    ``augment``: random flips on every axis, a random multiple of 90 degrees in the axial plane (axes 0-1 after RAS;
    the slice axis keeps its direction, since slices are often thicker) and a +-10 % intensity scale, applied to the
    crop after normalisation, so the cache still holds the preprocessed volumes. A lesion's label does not change
    under any of them, and with a few dozen training cases they stretch what fine-tuning sees.
    ``anatomy_*``: optional organ mask, see :func:`get_preprocess_transforms`."""
    crop_kwargs = dict(roi_size=roi_size, jitter=jitter, instance=instance, random=True)
    transforms = _preprocess_and_crop(
        crop_kwargs, target_label, image_channel, ct_clamp, spacing, anatomy_key, anatomy_labels, anatomy_from_label
    )
    if not augment:
        return transforms
    spatial = ["image", "label", "label_all", *([anatomy_key] if anatomy_key else [])]
    return Compose(
        [
            *transforms.transforms,
            *(RandFlipd(spatial, prob=0.5, spatial_axis=axis, allow_missing_keys=True) for axis in range(3)),
            RandRotate90d(spatial, prob=0.75, max_k=3, spatial_axes=(0, 1), allow_missing_keys=True),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
        ]
    )


def get_val_transforms(
    roi_size: int = 128,
    target_label: int | Sequence[int] | None = 1,
    image_channel: int | None = None,
    ct_clamp: bool = False,
    spacing: float = 1.5,
    lesion_index: int = 0,
    instance: bool = True,
    anatomy_key: str | None = None,
    anatomy_labels: int | Sequence[int] | None = None,
    anatomy_from_label: bool = False,
) -> Compose:
    """Deterministic preprocess + crop on lesion ``data["lesion_index"]`` (default ``lesion_index``, 0 = largest).

    ``anatomy_*``: optional organ mask, see :func:`get_preprocess_transforms`."""
    crop_kwargs = dict(roi_size=roi_size, instance=instance, random=False, lesion_index=lesion_index)
    return _preprocess_and_crop(
        crop_kwargs, target_label, image_channel, ct_clamp, spacing, anatomy_key, anatomy_labels, anatomy_from_label
    )


def load_datalist(dataset_json: str | os.PathLike, split: str = "training", base_dir: str | None = None) -> list[dict]:
    """Items of ``split`` ("training", "validation", "test") from an MSD-style dataset.json, paths made absolute."""
    with open(dataset_json) as fh:
        available = [k for k, v in json.load(fh).items() if isinstance(v, list)]
    if split not in available:
        raise KeyError(f"split '{split}' not in {dataset_json}; lists available: {available}")
    return load_decathlon_datalist(dataset_json, is_segmentation=True, data_list_key=split, base_dir=base_dir)


def lesion_items(
    datalist: Sequence[Mapping],
    lesions: str | Sequence[int] = "extremes",
    target_label: int | Sequence[int] | None = 1,
    spacing: float = 1.5,
    connectivity: int = 3,
) -> list[dict]:
    """One item per lesion to validate, ``dict(item, lesion_index=k)`` (k as in :class:`LesionCropd`).

    Args:
        lesions: "extremes" = each case's largest and smallest lesion (labels not read here); "all" = every lesion,
            as the evaluation protocol scores them (each label is read once and resampled to ``spacing`` mm like
            training, so the count is that of the components the crop will see); or a list of indices.
        target_label, spacing: as in :func:`get_preprocess_transforms`.
    """
    if lesions == "extremes":
        lesions = (0, -1)
    if lesions != "all":
        if isinstance(lesions, str) or not all(isinstance(i, int) for i in lesions):
            raise ValueError(f"lesions must be 'extremes', 'all' or a list of ints, got {lesions!r}")
        return [dict(item, lesion_index=i) for item in datalist for i in lesions]
    count_label = get_preprocess_transforms(target_label, spacing=spacing, image_key=None)
    items = []
    for item in datalist:
        label = count_label({"label": item["label"]})["label"]
        n = len(lesion_components(label, connectivity)[1])
        items += [dict(item, lesion_index=k) for k in range(max(n, 1))]  # no lesion: one centre crop, as before
    return items


# ----------------------------------------------------------------------------------------------------------------
# Interactive inference helpers
# ----------------------------------------------------------------------------------------------------------------
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
