"""MONAI dictionary pipelines that reproduce SAM-Med3D's preprocessing, plus lesion-balanced cropping, and datalists.

Order (what the released SAM-Med3D weights expect):
    load -> channel first -> [pick one input channel] -> [CT clamp to [-1000, 1000]] -> [keep target label(s), binarise]
    -> Orientation RAS -> Spacing 1.5 mm (bilinear image / nearest label)            = deterministic, cacheable
    -> crop ``roi_size``^3 centred on one lesion, zero padding -> normalise the crop    = random part (training)

The crop's intensity normalisation (``normalisation``) is "upstream" (SAM-Med3D's z-normalisation over voxels > 0)
or "robust" (percentile clip + z-normalisation over the crop, for CT and MR alike); see :func:`normalise_crop`.

Shapes follow docs/conventions.md: channel-first ``(C, X, Y, Z)`` in RAS voxel order; C = 1 after preprocessing.
The lesion crop and the keys it adds are in :mod:`scripts.data.crops`.

Optional anatomy mask (TAGS anatomy prompt, ``anatomy_key``, e.g. ``"organ"``): loaded from the item's own file, or
copied from the label file (``anatomy_from_label``: MSD Liver's liver + tumour labels), binarised, resampled with
nearest neighbour and cropped with the image, so it reaches the network as ``(1, S, S, S)`` like the label.
"""

from __future__ import annotations

import json
import os
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import load_decathlon_datalist
from monai.transforms import (
    AsDiscreted,
    Compose,
    CopyItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LabelFilterd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    Spacingd,
    ThresholdIntensityd,
)

from .crops import (
    NORMALISATIONS,
    LesionCropd,
    RandLesionCropd,
    centred_crop_start,
    crop_at,
    lesion_components,
    lesion_crops,
    normalise_crop,
    paste_crop,
)
from .folders import folder_datalist

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # explicit, so Orientation gives no FutureWarning

__all__ = [
    "CT_CLAMP_RANGE",
    "NORMALISATIONS",
    "LesionCropd",
    "NormaliseCropd",
    "RandLesionCropd",
    "RequireKeysd",
    "SelectChanneld",
    "centred_crop_start",
    "crop_at",
    "get_crop_transforms",
    "get_preprocess_transforms",
    "get_train_transforms",
    "get_val_transforms",
    "lesion_components",
    "lesion_crops",
    "lesion_items",
    "load_datalist",
    "normalise_crop",
    "paste_crop",
]

CT_CLAMP_RANGE = (-1000.0, 1000.0)


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
    """Dictionary wrapper of :func:`normalise_crop` (``mode``: "upstream" = SAM-Med3D z-normalisation over voxels
    > 0, "robust" = percentile clip then z-normalisation over the whole crop)."""

    def __init__(self, keys: KeysCollection, mode: str = "upstream", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if mode not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {mode!r}")
        self.mode = mode

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = normalise_crop(d[key], self.mode)
        return d


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
    resample: bool = True,
    dtype: torch.dtype | None = torch.float32,
) -> Compose:
    """Deterministic part: load -> channel first -> channel pick -> CT clamp -> binary target -> RAS -> spacing.

    Output: ``image`` (1, X, Y, Z) float32 RAS at ``spacing`` mm (not normalised); ``label`` (1, X, Y, Z) float32 0/1
    where the original label is in ``target_label`` (int or list, e.g. MSD Task03 liver tumour 2, Task01 enhancing
    tumour 3; None keeps any label > 0). ``label_key=None`` builds the image-only pipeline, ``image_key=None`` the
    label-only one; ``load=False`` expects channel-first tensors already in the dict; ``resample=False`` stops
    before RAS -> spacing (the voxel-wise part only), ``dtype=None`` keeps the loaded voxel type. Good for
    ``CacheDataset``.

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
    if resample:
        xforms += [
            Orientationd(keys, axcodes="RAS", labels=RAS_LABELS),
            Spacingd(keys, pixdim=(spacing,) * 3, mode=modes),
        ]
    if dtype is not None:
        xforms.append(EnsureTyped(keys, dtype=dtype))
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
    normalisation: str = "upstream",
) -> Compose:
    """Crop part: lesion-centred ``roi_size``^3 crop (zero padding) -> intensity normalisation of the image crop
    (``normalisation``, see :func:`normalise_crop`).

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
    return Compose([crop, NormaliseCropd(image_key, mode=normalisation)])


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
    normalisation: str = "upstream",
) -> Compose:
    """Preprocess + random lesion crop (+ optional augmentation of the crop).

    ``augment``: random flips on every axis, a random multiple of 90 degrees in the axial plane (axes 0-1 after RAS;
    the slice axis keeps its direction, since slices are often thicker) and a +-10 % intensity scale, applied to the
    crop after normalisation, so the cache still holds the preprocessed volumes. A lesion's label does not change
    under any of them, and with a few dozen training cases they stretch what fine-tuning sees.
    ``anatomy_*``: optional organ mask, see :func:`get_preprocess_transforms`. ``normalisation``: see
    :func:`normalise_crop`."""
    crop_kwargs = dict(roi_size=roi_size, jitter=jitter, instance=instance, random=True, normalisation=normalisation)
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
    normalisation: str = "upstream",
) -> Compose:
    """Deterministic preprocess + crop on lesion ``data["lesion_index"]`` (default ``lesion_index``, 0 = largest).

    ``anatomy_*``: optional organ mask, see :func:`get_preprocess_transforms`. ``normalisation``: see
    :func:`normalise_crop`."""
    crop_kwargs = dict(
        roi_size=roi_size, instance=instance, random=False, lesion_index=lesion_index, normalisation=normalisation
    )
    return _preprocess_and_crop(
        crop_kwargs, target_label, image_channel, ct_clamp, spacing, anatomy_key, anatomy_labels, anatomy_from_label
    )


def load_datalist(dataset_json: str | os.PathLike, split: str = "training", base_dir: str | None = None) -> list[dict]:
    """Items of ``split`` ("training", "validation", "test") from an MSD-style dataset.json, paths made absolute.

    ``dataset_json`` may also be a folder of image/label pairs without a dataset.json: its pairs are the "test"
    split (:func:`scripts.data.folders.folder_datalist`)."""
    if os.path.isdir(dataset_json):
        return folder_datalist(dataset_json, split)
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
