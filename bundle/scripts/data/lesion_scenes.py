"""Domain-randomised lesion scenes: labelled CT- and MR-like volumes for training segmenters that meet real scans.

The recipe follows SynthSeg (Billot et al., Medical Image Analysis 2023): draw a random map of tissue labels, give
each tissue a random intensity, then simulate an acquisition. Here the label maps are body regions with lesions
(``scene_anatomy``, ``scene_lesions``) and intensities come in two flavours:

* CT: Hounsfield units drawn per tissue from textbook ranges and a contrast phase (unenhanced, arterial, portal);
  liver lesions hypo- or hyperdense, rim-enhancing, necrotic, cystic or calcified; lung nodules solid, ground-glass,
  part-solid, cavitated, calcified or spiculated; quantum noise 5-30 HU.
* random contrast (written as MR): every tissue and every lesion part a random intensity, lesions brighter or darker
  than their host, a smooth multiplicative bias field, random gamma and Rician noise.

Every scene is acquired on a realistic grid: in-plane 0.45-1 mm, slices 0.6-6.5 mm. Tissue and lesions are drawn on
sub-slices and averaged into each slice (slice-thickness partial volume), after an in-plane blur (point spread).
MR slices may run along any axis. Lesions range from a few voxels to more than a 128^3 crop at 1.5 mm; they sit
inside organs, straddle organ borders (confined to the organ, so a tumour meets the chest wall without an edge),
touch vessels and lie beside other lesions. The label is 1 on lesions; each lesion is one 26-connected component.

Layout written under ``output_dir`` (as ``synthetic_data``; case ``i`` depends only on (seed, i))::

    imagesTr/scene_000.nii.gz  labelsTr/scene_000.nii.gz   training and validation cases
    imagesTs/scene_030.nii.gz  labelsTs/scene_030.nii.gz   test cases
    dataset.json   "training" / "validation" / "test" lists, "lesion_scenes": {"params", "cases"} (written last)

CLI (run from ``bundle/``)::

    python -m scripts.data.lesion_scenes --output_dir ../data/scenes --num_train 32 --num_val 4 --num_test 4 --seed 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.transforms import RandAdjustContrast, RandBiasField
from monai.utils import convert_to_numpy
from scipy import ndimage

from . import scene_anatomy as A
from .scene_anatomy import BUILDERS, WorkGrid, smooth_noise
from .scene_lesions import ct_look, lesion_diameters, place_lesions, random_look
from .synthetic_data import dataset_meta, plan_cases, remove_unlisted, run_jobs, write_json_atomically, write_nifti

__all__ = ["SCENE_WEIGHTS", "generate_scene", "generate_scenes_dataset", "ensure_scenes_dataset", "VERSION"]

VERSION = 1  # bump when the generated content changes
CASE_PREFIX = "scene_"
SCENE_WEIGHTS = {"lung": 0.25, "liver": 0.25, "soft": 0.1, "brain": 0.15, "breast": 0.1, "random": 0.15}
CT_SITES = {"lung": 0.8, "liver": 0.8, "soft": 0.7, "random": 0.3}  # chance of HU rendering, else random contrast
MAX_DIAMETER_MM = {"lung": 110.0, "liver": 150.0, "soft": 120.0, "brain": 70.0, "breast": 60.0, "random": 120.0}
SLICE_MM = {
    "CT": ((0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0), (0.08, 0.15, 0.1, 0.1, 0.12, 0.15, 0.3)),
    "brain": ((1.0, 3.0, 4.0, 5.0, 6.0, 6.5), (0.2, 0.1, 0.1, 0.25, 0.15, 0.2)),
    "breast": ((1.0, 1.5, 2.0, 2.5, 3.0), (0.2, 0.2, 0.3, 0.15, 0.15)),
}
WORK_VOXELS = 4_000_000  # budget of the sub-sliced working grid (time and memory)


def _phase_hu(rng, phase: str, unenhanced, arterial, portal) -> float:
    return float(rng.uniform(*{"unenhanced": unenhanced, "arterial": arterial, "portal": portal}[phase]))


def ct_intensities(rng, phase: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-tissue mean and texture std (HU) for one CT case in contrast ``phase``."""
    mean = np.zeros(len(A.TISSUES), np.float32)
    std = np.full(len(A.TISSUES), 8.0, np.float32)
    ranges = {
        A.AIR: (-1010, -990),
        A.FAT: (-120, -80),
        A.MUSCLE: (35, 55),
        A.CORTICAL: (700, 1500),
        A.CANCELLOUS: (200, 400),
        A.LUNG: (-950, -790),
        A.AIRWAY: (-1000, -960),
        A.FLUID: (-10, 20),
        A.WM: (20, 30),
        A.GM: (35, 45),
        A.GLAND: (20, 50),
    }
    for tissue, (lo, hi) in ranges.items():
        mean[tissue] = rng.uniform(lo, hi)
    mean[A.BLOOD] = _phase_hu(rng, phase, (35, 50), (150, 350), (130, 200))
    mean[A.LIVER] = _phase_hu(rng, phase, (50, 65), (65, 90), (90, 130))
    mean[A.SPLEEN] = mean[A.LIVER] + rng.uniform(-10, 20)
    mean[A.KIDNEY] = _phase_hu(rng, phase, (28, 40), (150, 250), (120, 200))
    mean[A.VESSEL] = _phase_hu(rng, phase, (35, 50), (60, 120), (120, 200))
    std[[A.CORTICAL, A.CANCELLOUS, A.LUNG]] = (80.0, 40.0, 25.0)
    std[[A.AIR, A.AIRWAY, A.LIVER]] = (3.0, 5.0, 6.0)
    return mean, std


def random_intensities(rng, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """SynthSeg: every tissue an independent uniform mean in [lo, hi] and a small-to-large std; outside air stays
    dark in most MR-like cases (magnitude images have a noise floor there) and cortical bone is usually dark."""
    span = hi - lo
    mean = rng.uniform(lo, hi, len(A.TISSUES)).astype(np.float32)
    std = (rng.uniform(0.0, 0.04, len(A.TISSUES)) * span).astype(np.float32)
    if rng.uniform() < 0.9:
        mean[A.AIR], std[A.AIR] = lo + rng.uniform(0, 0.04) * span, 0.0
    if rng.uniform() < 0.8:
        mean[A.CORTICAL] = lo + rng.uniform(0, 0.15) * span
    return mean, std


def choose_grid(rng, kind: str, modality: str, max_lesion_mm: float) -> WorkGrid:
    """Acquisition grid: realistic spacing and a field of view that holds the largest lesion, within WORK_VOXELS.

    Over budget, the field of view shrinks first (slices, then in-plane, not below what the lesion needs), then the
    in-plane spacing coarsens (up to 1 mm); a lesion that still does not fit is shrunk when it is placed."""
    table = SLICE_MM.get(kind, SLICE_MM["CT"]) if modality == "MR" else SLICE_MM["CT"]
    slice_mm = float(rng.choice(table[0], p=table[1]))
    inplane = rng.uniform(0.55, 1.0) if modality == "CT" else rng.uniform(0.45, 1.0)
    k = int(np.clip(round(slice_mm / 1.5), 1, 3))
    need = 1.2 * max_lesion_mm + 16.0
    fov = max(rng.uniform(150, 300), need, 200.0 if kind == "brain" else 0.0) * np.array([1.0, rng.uniform(0.8, 1.0)])
    z_mm = max(rng.uniform(50, 180), need)
    budget_mm3 = WORK_VOXELS * inplane**2 * slice_mm / k  # field of view the budget allows at this spacing
    z_mm = max(min(z_mm, budget_mm3 / fov.prod()), min(need, z_mm), 12 * slice_mm)
    fov = np.maximum(np.minimum(fov, np.sqrt(budget_mm3 / z_mm)), min(need, fov.min()))
    inplane = float(np.clip(np.sqrt(fov.prod() * z_mm * k / (WORK_VOXELS * slice_mm)), inplane, max(inplane, 1.0)))
    nxy = np.round(fov / inplane).astype(int)
    nz = max(min(int(round(z_mm / slice_mm)), int(WORK_VOXELS / (nxy.prod() * k))), 12)
    return WorkGrid((int(nxy[0]), int(nxy[1]), nz * k), np.array([inplane, inplane, slice_mm / k]), k)


def acquire(rng, image: np.ndarray, grid: WorkGrid, modality: str) -> tuple[np.ndarray, dict[str, float]]:
    """Simulate the scanner on the work-grid image: slice profile (mean of each slice's sub-slices: partial
    volume), in-plane point spread, then CT quantum noise with texture, or MR bias field, gamma and Rician noise.
    Returns the acquired float32 image and its settings."""
    nx, ny, nz = image.shape
    image = image.reshape(nx, ny, nz // grid.k, grid.k).mean(axis=-1)
    psf = rng.uniform(0.3, 1.2)  # in-plane point spread (voxels): sharp to low-resolution reconstructions
    image = ndimage.gaussian_filter(image, (psf, psf, rng.uniform(0.0, 0.3)), mode="nearest")
    # Noise from the numpy Generator in float32: MONAI's noise transforms draw float64 from a legacy RandomState,
    # 4x slower here, and the noise is a single line either way.
    if modality == "CT":
        sigma = float(rng.uniform(5.0, 30.0))
        noise = ndimage.gaussian_filter(rng.standard_normal(image.shape, dtype=np.float32), (0.7, 0.7, 0.0))
        image += noise * (sigma / max(float(noise.std()), 1e-6))  # filtered: CT noise has a grain
        return image, {"noise_hu": round(sigma, 1), "psf_voxels": round(psf, 2)}
    seed = int(rng.integers(2**31))
    coarse = tuple(max(2, s // 8) for s in image.shape)  # the bias field is smooth: draw it coarse, upsample
    bias = RandBiasField(prob=1.0, coeff_range=(0.05, 0.35)).set_random_state(seed)(np.ones((1, *coarse), np.float32))
    bias = torch.nn.functional.interpolate(
        torch.as_tensor(bias)[None].float(), size=image.shape, mode="trilinear", align_corners=True
    )[0, 0].numpy()
    image = RandAdjustContrast(prob=1.0, gamma=(0.6, 1.6)).set_random_state(seed + 1)(image[None] * bias)
    image = convert_to_numpy(image)[0]
    relative = float(np.exp(rng.uniform(np.log(0.003), np.log(0.03))))
    level = relative * float(np.percentile(image[::4, ::4], 99))
    real = image + level * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(real * real + np.square(level * rng.standard_normal(image.shape, dtype=np.float32)))  # Rician
    return image.astype(np.float32), {"noise_rel": round(relative, 4), "psf_voxels": round(psf, 2)}


def generate_scene(rng: np.random.Generator, kind: str | None = None, modality: str | None = None, diameters=None):
    """Draw one scene: image (X, Y, Z) int16 (HU for CT), label uint8 (1 = lesion), affine (4, 4), facts (dict).

    ``kind`` (a key of SCENE_WEIGHTS), ``modality`` ("CT" or "MR") and lesion ``diameters`` (mm, equivalent
    sphere) are drawn from ``rng`` unless given. Lesions that do not fit are shrunk or left out."""
    kind = kind or str(
        rng.choice(list(SCENE_WEIGHTS), p=np.array(list(SCENE_WEIGHTS.values())) / sum(SCENE_WEIGHTS.values()))
    )
    is_ct = rng.uniform() < CT_SITES.get(kind, 0.0)
    modality = modality or ("CT" if is_ct else "MR")
    n_lesions = int(rng.choice([1, 2, 3, 4, 5, 6], p=[0.2, 0.25, 0.2, 0.15, 0.1, 0.1]))
    drawn = lesion_diameters(rng, n_lesions, MAX_DIAMETER_MM[kind])
    diameters = np.sort(np.asarray(diameters, float))[::-1] if diameters is not None else drawn
    grid = choose_grid(rng, kind, modality, float(diameters[0]))
    anatomy = BUILDERS[kind](rng, grid)
    ct_tissues = modality == "CT" and kind != "random"
    phase = str(rng.choice(["unenhanced", "arterial", "portal"], p=[0.25, 0.2, 0.55])) if ct_tissues else None
    if ct_tissues:
        mean, std = ct_intensities(rng, phase)
        lo, hi = -1000.0, 1500.0
    else:
        lo, hi = (-1000.0, 1500.0) if modality == "CT" else (0.0, 1.0)
        mean, std = random_intensities(rng, lo, hi)
    texture = smooth_noise(rng, grid.shape, grid.spacing, rng.uniform(2.0, 4.0))
    image = mean[anatomy.tissue] + std[anatomy.tissue] * texture
    del texture
    site = next(iter(anatomy.hosts))

    def look_for(host_tissue: int):
        host = float(mean[host_tissue])
        return (ct_look(rng, site, host) if ct_tissues else random_look(rng, site, host, lo, hi)), host

    instances = np.zeros((grid.shape[0], grid.shape[1], grid.shape[2] // grid.k), np.uint16)
    facts = place_lesions(rng, grid, anatomy, site, diameters, image, instances, look_for)
    image, acquisition = acquire(rng, image, grid, modality)
    spacing = grid.spacing * np.array([1.0, 1.0, grid.k])
    if modality == "MR" and rng.uniform() < 0.4:  # thick slices along x or y (sagittal / coronal acquisitions)
        order = (2, 1, 0) if rng.uniform() < 0.5 else (0, 2, 1)
        image, instances, spacing = image.transpose(order), instances.transpose(order), spacing[list(order)]
    image = _quantise(rng, image, modality)
    voxels = np.bincount(instances.ravel(), minlength=len(facts) + 1)[1:]
    for fact, count in zip(facts, voxels):
        fact["voxels"] = int(count)
    affine = np.diag([*(spacing * np.where(rng.uniform() < 0.6, [-1, -1, 1], [1, 1, 1])), 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(image.shape) - 1) / 2.0)
    info = {
        "kind": kind,
        "modality": modality,
        "phase": phase,
        "spacing": [round(float(s), 4) for s in spacing],
        "shape": list(image.shape),
        **acquisition,
        "lesions": facts,
    }
    return image, (instances > 0).astype(np.uint8), affine, info


def _quantise(rng, image: np.ndarray, modality: str) -> np.ndarray:
    if modality == "CT":
        return np.clip(np.round(image), -1024, 3071).astype(np.int16)
    top = float(np.percentile(image, 99.5))
    image = image * (rng.uniform(300.0, 3000.0) / max(top, 1e-6))  # MR has no absolute scale
    return np.clip(np.round(image), 0, np.iinfo(np.int16).max).astype(np.int16)


def parse_weights(text: str | None) -> dict[str, float]:
    """``"lung=2,liver=1,brain"`` -> normalised scene weights (a bare name weighs 1); None -> SCENE_WEIGHTS."""
    if not text:
        return dict(SCENE_WEIGHTS)
    weights = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in SCENE_WEIGHTS:
            raise ValueError(f"unknown scene kind {name.strip()!r}; choose from {sorted(SCENE_WEIGHTS)}")
        weights[name.strip()] = float(value) if value else 1.0
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


def case_kind(seed: int, index: int, weights: dict[str, float]) -> str:
    """Scene kind of case ``index``: drawn from its own stream, so each kind's share holds for any split size."""
    rng = np.random.default_rng([seed, index, 1])
    return str(rng.choice(list(weights), p=np.array(list(weights.values())) / sum(weights.values())))


def _write_scene(root: Path, seed: int, idx: int, kind: str, item: dict) -> dict:
    image, label, affine, info = generate_scene(np.random.default_rng([seed, idx]), kind)
    write_nifti(image, affine, root / item["image"])
    write_nifti(label, affine, root / item["label"])
    return info


def generate_scenes_dataset(
    output_dir, num_train=32, num_val=4, num_test=4, seed=0, kinds=None, overwrite=False, workers=1
):
    """Write the scene dataset (layout in the module docstring) and return the path of its ``dataset.json``.

    ``workers`` processes draw the cases in parallel; the files are the same for any number. Idempotent: an existing
    ``dataset.json`` written with the same parameters, with every listed file present, is kept. ``dataset.json`` is
    removed first and written last, so an interrupted run regenerates. A dataset.json not written by this module is
    only replaced with ``overwrite=True``."""
    root = Path(output_dir)
    json_path = root / "dataset.json"
    weights = parse_weights(kinds) if isinstance(kinds, (str, type(None))) else dict(kinds)
    params = {
        "version": VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_test": int(num_test),
        "seed": int(seed),
        "kinds": {k: round(v, 6) for k, v in weights.items()},
    }
    meta = _read_json(json_path)
    if meta is not None:
        ours = "lesion_scenes" in meta
        if not ours and not overwrite:
            raise FileExistsError(f"{json_path} was not written by this generator; pass overwrite=True to replace it")
        if ours and not overwrite and meta["lesion_scenes"].get("params") == params and _complete(meta, root):
            return json_path
    if json_path.exists():
        json_path.unlink()
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    splits, planned = plan_cases(num_train, num_val, num_test, CASE_PREFIX)
    jobs = [(root, seed, idx, case_kind(seed, idx, weights), item) for idx, _, item in planned]
    infos = run_jobs(_write_scene, jobs, workers)
    cases: dict[str, Any] = {name: info for (_, name, _), info in zip(planned, infos)}
    listed = {item[key] for items in splits.values() for item in items for key in ("image", "label")}
    # drop cases of an earlier, larger run
    remove_unlisted(root, ("imagesTr", "labelsTr", "imagesTs", "labelsTs"), CASE_PREFIX, listed)
    meta = dataset_meta(
        "SGPSAM-LesionScenes",
        "Domain-randomised CT (HU) and random-contrast MR-like scenes with lesions (no patient data)",
        "lesion_scenes",
        VERSION,
        "CT or MR, per case in lesion_scenes.cases",
        splits,
    )
    meta["lesion_scenes"] = {"params": params, "cases": cases}
    write_json_atomically(meta, json_path)
    return json_path


def _read_json(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _complete(meta: dict, root: Path) -> bool:
    items = [item for split in ("training", "validation", "test") for item in meta.get(split, [])]
    return all((root / item[key]).is_file() for item in items for key in ("image", "label"))


def ensure_scenes_dataset(dataset_dir, **kwargs) -> str:
    """Return ``dataset_dir``, writing the scene dataset there first unless a complete one is there already (any
    complete dataset.json is used as is, so pointing at other data just works; an older VERSION of ours is
    regenerated with its own parameters unless ``kwargs`` override them)."""
    root = Path(dataset_dir)
    meta = _read_json(root / "dataset.json")
    stored = (meta or {}).get("lesion_scenes", {}).get("params")
    if isinstance(stored, dict) and stored.get("version") != VERSION:
        kwargs = {**{k: v for k, v in stored.items() if k != "version"}, **kwargs}
    elif meta is not None and _complete(meta, root):
        return str(dataset_dir)
    generate_scenes_dataset(root, **kwargs)
    return str(dataset_dir)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_train", type=int, default=32)
    parser.add_argument("--num_val", type=int, default=4)
    parser.add_argument("--num_test", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kinds", default=None, help=f"scene mix, e.g. 'lung=2,liver=2,brain' (default {SCENE_WEIGHTS})"
    )
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (same files for any number)")
    args = parser.parse_args(argv)
    start = time.time()
    sizes = (args.num_train, args.num_val, args.num_test)
    path = generate_scenes_dataset(args.output_dir, *sizes, args.seed, args.kinds, args.overwrite, args.workers)
    print(f"{path} ready ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
