"""Image/label pairs in a folder without a ``dataset.json``, so users evaluate on their own data as it lies.

Layouts, pairs matched by case name (the image and its label may be in different formats):

    <case>_image.<ext>   + <case>_label.<ext>        one folder (the vendored test cases)
    imagesTr/<case>.<ext> + labelsTr/<case>.<ext>     MSD / nnU-Net (also imagesTs + labelsTs; nnU-Net's channel
                                                      suffix ``_0000`` is dropped from the image name)
    images/<case>.<ext>  + labels/<case>.<ext>

Formats: NIfTI (``.nii``, ``.nii.gz``) and NRRD (``.nrrd``, ``.nhdr``), also MetaImage (``.mha``, ``.mhd``): what
MONAI's ``LoadImage`` reads with ITK or nibabel.

:func:`dataset_source` is what ``train.json``'s ``dataset_json`` resolves to: the folder's ``dataset.json`` when it
has one, the folder itself when it holds such pairs (``load_datalist`` lists them as the ``test`` split), else the
embedded synthetic dataset generated into it (the default ``dataset_dir``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["IMAGE_SUFFIXES", "dataset_source", "find_pairs", "folder_datalist"]

logger = logging.getLogger("sgpsam.data")

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PAIR_FOLDERS = (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"), ("images", "labels"))
LAYOUTS = (
    "<case>_image.<ext> + <case>_label.<ext>; imagesTr/<case>.<ext> + labelsTr/<case>.<ext> (or imagesTs/labelsTs); "
    "images/<case>.<ext> + labels/<case>.<ext>; ext: .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd"
)


def _case_name(path: Path) -> str | None:
    """The file name without its image suffix (None for a file that is not an image)."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _images(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        case = _case_name(path)
        if case is not None and not path.name.startswith(".") and path.is_file():
            if case in found:
                raise ValueError(f"{folder}: two images for case '{case}': {found[case].name}, {path.name}")
            found[case] = path
    return found


def _suffix_pairs(folder: Path) -> list[dict[str, str]]:
    images, labels = {}, {}
    for case, path in _images(folder).items():
        match = re.fullmatch(r"(.+)_(image|label)", case)
        if match:
            (images if match.group(2) == "image" else labels)[match.group(1)] = path
    return _pair(images, labels, folder)


def _folder_pairs(image_dir: Path, label_dir: Path) -> list[dict[str, str]]:
    images = {re.sub(r"_0000$", "", case): path for case, path in _images(image_dir).items()}
    return _pair(images, _images(label_dir), image_dir)


def _pair(images: dict[str, Path], labels: dict[str, Path], where: Path) -> list[dict[str, str]]:
    unmatched = sorted(set(images) ^ set(labels))
    if unmatched:
        logger.warning("%s: no partner for %d file(s), left out: %s", where, len(unmatched), unmatched[:10])
    return [
        {"image": str(images[case]), "label": str(labels[case]), "case": case}
        for case in sorted(set(images) & set(labels))
    ]


def find_pairs(folder: str | os.PathLike) -> list[dict[str, str]]:
    """``[{"image", "label", "case"}]`` of every layout found in ``folder`` (module docstring), sorted by case."""
    root = Path(folder)
    pairs = _suffix_pairs(root)
    for image_dir, label_dir in PAIR_FOLDERS:
        if (root / image_dir).is_dir() and (root / label_dir).is_dir():
            pairs += _folder_pairs(root / image_dir, root / label_dir)
    cases = [p["case"] for p in pairs]
    duplicated = sorted({c for c in cases if cases.count(c) > 1})
    if duplicated:
        raise ValueError(f"{root}: case names found in more than one layout: {duplicated[:10]}")
    return sorted(pairs, key=lambda p: p["case"])


def folder_datalist(folder: str | os.PathLike, split: str = "test") -> list[dict[str, str]]:
    """The pairs of ``folder`` as the ``test`` split (evaluation); a clear error when there are none, or for a
    training/validation split (a folder of pairs does not say which cases are for what: write a dataset.json)."""
    if split != "test":
        raise KeyError(
            f"{folder} has no dataset.json: a folder of image/label pairs gives the 'test' list only (evaluation); "
            f"write an MSD-style dataset.json to use it as '{split}'"
        )
    pairs = find_pairs(folder)
    if not pairs:
        raise FileNotFoundError(f"no dataset.json and no image/label pairs in {folder}; layouts: {LAYOUTS}")
    return pairs


def _has_images(root: Path) -> bool:
    return any(_case_name(p) is not None for p in root.rglob("*") if p.is_file())


def dataset_source(dataset_dir: str | os.PathLike, synthetic_dir: str | os.PathLike | None = None, **kwargs: Any):
    """``dataset_dir/dataset.json`` if present (the synthetic generator completes its own, as before); else
    ``dataset_dir`` itself if it holds image/label pairs; else the embedded synthetic dataset, generated into an
    empty or missing ``dataset_dir`` or into ``synthetic_dir`` (``kwargs`` go to ``ensure_dataset``). A folder with
    images but no pairs is an error: nothing is generated over someone's data."""
    from .synthetic_data import ensure_dataset

    root = Path(dataset_dir)
    ours = synthetic_dir is not None and root.resolve() == Path(synthetic_dir).resolve()
    if (root / "dataset.json").is_file() or ours or not root.is_dir() or not _has_images(root):
        return os.path.join(ensure_dataset(root, **kwargs), "dataset.json")
    if not find_pairs(root):
        raise FileNotFoundError(f"no dataset.json and no image/label pairs in {root}; layouts: {LAYOUTS}")
    return str(root)
