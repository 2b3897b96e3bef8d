"""Deterministic synthetic lesion volumes written as a Medical-Segmentation-Decathlon-style dataset.

Layout written under ``output_dir``::

    imagesTr/synth_000.nii.gz  labelsTr/synth_000.nii.gz   training and validation cases
    imagesTs/synth_030.nii.gz  labelsTs/synth_030.nii.gz   test cases (labels kept, for evaluation)
    organsTr/synth_000.nii.gz  organsTs/synth_030.nii.gz   only with ``organ_masks=True``: the organ mask
    dataset.json                                           written last: its presence marks a complete dataset

``dataset.json`` holds the usual MSD keys plus three split lists of ``{"image", "label"}`` paths relative to
``output_dir`` ("training", "validation", "test"; validation files live in ``imagesTr``/``labelsTr`` as in MSD),
and a ``"synthetic"`` block with the generator parameters (used for idempotency) and per-case lesion facts.
With ``organ_masks=True`` every item also has an ``"organ"`` path: a binary mask (1 = organ, lesions included), the
anatomy prompt of the TAGS option and the large target of the transfer study's pretraining. The image and label
files are the same bytes with or without organ masks.

The cases themselves (MR-like organ volumes with irregular lesions, anisotropic LPS-flipped voxels) are drawn by
:mod:`scripts.data.synthetic_case`.

CLI (run from ``bundle/``)::

    python -m scripts.data.synthetic_data --output_dir ../data/synthetic --num_train 24 --num_val 6 --num_test 8
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np
import torch

from .synthetic_case import (
    DEFAULT_SHAPE,
    INPLANE_SPACING_RANGE,
    SLICE_SPACING_RANGE,
    generate_case,
    generate_case_with_organ,
)

__all__ = [
    "plan_cases",
    "generate_dataset",
    "ensure_dataset",
    "generate_case",
    "generate_case_with_organ",
    "DEFAULT_SHAPE",
    "GENERATOR_VERSION",
    "INPLANE_SPACING_RANGE",
    "SLICE_SPACING_RANGE",
]

# Bump when the generated content changes, so cached datasets are regenerated.
GENERATOR_VERSION = 2
CASE_PREFIX = "synth_"


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write .nii.gz reproducibly (gzip mtime 0) and atomically (temp file + rename)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
    os.replace(tmp, path)


def remove_unlisted(root: Path, folders, prefix: str, listed: set[str]) -> None:
    """Delete ``<folder>/<prefix>*.nii.gz`` files that ``listed`` (paths relative to ``root``) does not name."""
    for sub in folders:
        for f in (root / sub).glob(f"{prefix}*.nii.gz"):
            if f"{sub}/{f.name}" not in listed:
                f.unlink()


def run_jobs(function: Callable, jobs: Sequence[tuple], workers: int = 1) -> list:
    """``[function(*job) for job in jobs]``, in ``workers`` processes when more than one (results in job order)."""
    if workers <= 1 or len(jobs) <= 1:
        return [function(*job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(pool.map(function, *zip(*jobs), chunksize=1))


def plan_cases(num_train: int, num_val: int, num_test: int, prefix: str, organ_masks: bool = False):
    """The MSD-style split lists and, per case in index order, ``(index, name, item)`` with its file paths."""
    splits: dict[str, list] = {"training": [], "validation": [], "test": []}
    planned = []
    for idx in range(num_train + num_val + num_test):
        split = "training" if idx < num_train else "validation" if idx < num_train + num_val else "test"
        suffix = "Ts" if split == "test" else "Tr"
        name = f"{prefix}{idx:03d}"
        item = {"image": f"images{suffix}/{name}.nii.gz", "label": f"labels{suffix}/{name}.nii.gz"}
        if organ_masks:
            item["organ"] = f"organs{suffix}/{name}.nii.gz"
        splits[split].append(item)
        planned.append((idx, name, item))
    return splits, planned


def dataset_meta(
    name: str, description: str, module: str, release: int, modality: str, splits: dict, **extra: Any
) -> dict:
    """MSD-style ``dataset.json`` content of a generated (CC0) dataset with one lesion label."""
    return {
        "name": name,
        "description": description,
        "reference": f"bundle/scripts/data/{module}.py",
        "licence": "CC0-1.0",
        "release": str(release),
        "tensorImageSize": "3D",
        "modality": {"0": modality},
        "labels": {"0": "background", "1": "lesion"},
        **extra,
        "numTraining": len(splits["training"]),
        "numValidation": len(splits["validation"]),
        "numTest": len(splits["test"]),
        **splits,
    }


def write_json_atomically(meta: dict, json_path: Path) -> None:
    """Write ``dataset.json`` through a temp file and a rename, so a reader never sees half of it."""
    tmp = json_path.with_name(f".dataset.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, json_path)


def _params(
    num_train: int, num_val: int, num_test: int, seed: int, shape: Sequence[int], organ_masks: bool = False
) -> dict[str, Any]:
    params = {
        "version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_test": int(num_test),
        "seed": int(seed),
        "shape": [int(s) for s in shape],
    }
    if organ_masks:  # only when set, so datasets written before the option keep matching their parameters
        params["organ_masks"] = True
    return params


def _is_complete(meta: dict[str, Any], root: Path) -> bool:
    for split in ("training", "validation", "test"):
        for item in meta.get(split, []):
            files = [item["image"], item["label"]] + ([item["organ"]] if "organ" in item else [])
            if not all((root / f).is_file() for f in files):
                return False
    return True


def _lists_organ_masks(meta: dict[str, Any]) -> bool:
    items = [item for split in ("training", "validation", "test") for item in meta.get(split, [])]
    return bool(items) and all("organ" in item for item in items)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_case(root: Path, seed: int, idx: int, shape: Sequence[int], item: dict) -> dict:
    image, label, organ, affine, info = generate_case_with_organ(np.random.default_rng([seed, idx]), shape)
    write_nifti(image, affine, root / item["image"])
    write_nifti(label, affine, root / item["label"])
    if "organ" in item:
        write_nifti(organ, affine, root / item["organ"])
    return info


def generate_dataset(
    output_dir: str | os.PathLike,
    num_train: int = 24,
    num_val: int = 6,
    num_test: int = 8,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    overwrite: bool = False,
    organ_masks: bool = False,
    workers: int = 1,
) -> Path:
    """Write the synthetic dataset and return the path of its ``dataset.json``.

    ``organ_masks=True`` also writes ``organsTr/``/``organsTs/`` and lists them as ``"organ"`` in every item.

    Idempotent: if ``output_dir/dataset.json`` was written by this generator with the same parameters and every
    listed file exists, nothing is done. ``dataset.json`` is removed first and written last, so an interrupted
    run is regenerated next time. A ``dataset.json`` not written by this generator is never replaced unless
    ``overwrite=True``. Case ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so it does not depend
    on the split sizes (nor on the number of ``workers`` processes that draw them).
    """
    root = Path(output_dir)
    json_path = root / "dataset.json"
    params = _params(num_train, num_val, num_test, seed, shape, organ_masks)
    if json_path.exists():
        meta = _read_json(json_path)
        ours = isinstance(meta, dict) and "synthetic" in meta
        if not ours and not overwrite:
            raise FileExistsError(f"{json_path} was not written by this generator; pass overwrite=True to replace it")
        if ours and not overwrite and meta["synthetic"].get("params") == params and _is_complete(meta, root):
            return json_path
        json_path.unlink()

    folders = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
    organ_folders = ("organsTr", "organsTs")
    for sub in folders + (organ_folders if organ_masks else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    splits, planned = plan_cases(num_train, num_val, num_test, CASE_PREFIX, organ_masks)
    infos = run_jobs(_write_case, [(root, seed, idx, shape, item) for idx, _, item in planned], workers)
    cases: dict[str, Any] = {name: info for (_, name, _), info in zip(planned, infos)}

    # Drop stale cases of an earlier, larger run so the folders match dataset.json.
    listed = {path for items in splits.values() for item in items for key, path in item.items()}
    remove_unlisted(root, folders + organ_folders, CASE_PREFIX, listed)

    meta = dataset_meta(
        "SGPSAM-SyntheticLesions",
        "Synthetic MR-like organ volumes with irregular lesions (generated, no patient data)",
        "synthetic_data",
        GENERATOR_VERSION,
        "MR",
        splits,
        **({"organ": "organs*/: 1 = organ (lesions included), 0 = outside"} if organ_masks else {}),
    )
    meta["synthetic"] = {"params": params, "cases": cases}
    write_json_atomically(meta, json_path)
    return json_path


def ensure_dataset(dataset_dir: str | os.PathLike, organ_masks: bool = False, **kwargs: Any) -> str:
    """Return ``dataset_dir``, generating the synthetic dataset there first if no complete dataset exists.

    A complete existing dataset (every file listed in its ``dataset.json`` present) is used as is, whoever wrote
    it and with whatever parameters, so pointing the bundle at real MSD data or a custom synthetic set just works.
    A synthetic dataset is regenerated, keeping its parameters, when an older GENERATOR_VERSION wrote it or when
    ``organ_masks`` is asked for and it has none (its images and labels come out byte-identical).
    """
    root = Path(dataset_dir)
    meta = _read_json(root / "dataset.json")
    stored = meta.get("synthetic", {}).get("params") if isinstance(meta, dict) else None
    ours = isinstance(stored, dict)
    if ours and stored.get("version") != GENERATOR_VERSION:
        # ours but from an older generator: regenerate with the same split sizes/seed/shape unless overridden
        kwargs = {**{k: v for k, v in stored.items() if k != "version"}, **kwargs}
    elif isinstance(meta, dict) and _is_complete(meta, root):
        if not (organ_masks and ours and not _lists_organ_masks(meta)):
            return str(dataset_dir)
        kwargs = {**{k: v for k, v in stored.items() if k != "version"}, **kwargs}
    kwargs["organ_masks"] = bool(organ_masks or kwargs.get("organ_masks", False))
    generate_dataset(root, **kwargs)
    return str(dataset_dir)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_train", type=int, default=24)
    parser.add_argument("--num_val", type=int, default=6)
    parser.add_argument("--num_test", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"))
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--organ_masks", action="store_true", help="also write organ masks (TAGS anatomy prompt)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (same files for any number)")
    args = parser.parse_args(argv)
    start = time.time()
    path = generate_dataset(
        args.output_dir,
        args.num_train,
        args.num_val,
        args.num_test,
        args.seed,
        args.shape,
        args.overwrite,
        organ_masks=args.organ_masks,
        workers=args.workers,
    )
    print(f"{path} ready ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
