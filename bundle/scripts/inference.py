"""Click-prompted inference from the command line (bundle ``inferring`` workflow), one image or a folder.

Usage (from the repository root or from ``bundle/``)::

    python -m monai.bundle run inferring --config_file bundle/configs/inference.json \\
        --image case.nii.gz --clicks '{"foreground": [[120, 96, 14]], "background": []}' --output_dir out
    # batch: a folder of images + {filename: {"foreground": [...], "background": [...]}}
    python -m monai.bundle run inferring --config_file bundle/configs/inference.json \\
        --batch_dir images/ --batch_clicks clicks.json --output_dir out

Clicks are [i, j, k] voxel indices of the image file as stored (the array index after MONAI ``LoadImage``, before
any reorientation), i.e. what 3D Slicer shows as IJK. The output ``<output_dir>/<image stem>_seg.nii.gz`` has the
input's shape and affine; it is written to a temporary file and renamed, so a failure leaves no partial file.

The network and its preprocessing (spacing, input channel, CT clamp, intensity normalisation) come from the model
file ``ckpt_path`` (``scripts.model_file``); there is nothing to set to match the training.

Bad input (missing file, malformed or out-of-range click, a multi-channel image for a one-channel model, missing or
unusable model file) prints ONE line ``error: ...`` on stderr and exits with status 1 (set ``SGPSAM_DEBUG=1`` for
the traceback).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from monai.data import NibabelWriter

from .checkpoint import CheckpointError
from .interactive import ClickError, InteractiveSegmenter, parse_click_list
from .model_file import ModelFile, read_model_file

__all__ = ["InputError", "load_model", "output_path", "parse_clicks", "run_inference", "save_mask"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".nii.zst")
NULL_STRINGS = ("", "none", "null")


class InputError(ValueError):
    """Unusable command-line input (clicks JSON, batch folder) — reported as one line."""


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in NULL_STRINGS)


def load_model(ckpt_path: str | os.PathLike | None, device="cpu") -> ModelFile:
    """The model file ``ckpt_path`` (network + preprocessing, ``scripts.model_file``); refuse a missing file."""
    if _is_null(ckpt_path):
        raise CheckpointError("no model file: pass --ckpt_path (a model.pt the bundle wrote, or a SAM-Med3D file)")
    path = os.fspath(ckpt_path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path} (train or download one, or pass --ckpt_path)")
    return read_model_file(path, device)


def parse_clicks(clicks: Any) -> dict[str, list]:
    """``{"foreground": [[i, j, k], ...], "background": [...]}`` from a dict, a JSON string or a JSON file path.

    A bare list means foreground clicks only. Coordinates are validated later by the engine (ClickError).
    """
    if _is_null(clicks):
        raise InputError('no clicks given: pass --clicks \'{"foreground": [[i, j, k]], "background": []}\'')
    if isinstance(clicks, (str, os.PathLike)):
        text = os.fspath(clicks)
        if os.path.isfile(text):
            text = Path(text).read_text()
        try:
            clicks = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"clicks are neither a JSON file nor valid JSON: {err}") from None
    if isinstance(clicks, (list, tuple)):
        clicks = {"foreground": list(clicks), "background": []}
    if not isinstance(clicks, Mapping):
        raise InputError(f"clicks must be a dict with 'foreground'/'background' lists, got {type(clicks).__name__}")
    unknown = sorted(set(clicks) - {"foreground", "background"})
    if unknown:
        raise InputError(f"unknown click keys {unknown}: use 'foreground' and 'background'")
    fg, bg = clicks.get("foreground") or [], clicks.get("background") or []
    parse_click_list(fg, "foreground"), parse_click_list(bg, "background")  # syntax errors before the model loads
    if not fg and not bg:
        raise ClickError("no clicks given: send at least one foreground click [i, j, k]")
    return {"foreground": fg, "background": bg}


def output_path(output_dir: str | os.PathLike, image: str | os.PathLike) -> Path:
    """``<output_dir>/<image stem>_seg.nii.gz`` (stem without .nii.gz / .nrrd / ... suffixes)."""
    name = Path(image).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = Path(name).stem
    return Path(output_dir) / f"{name}_seg.nii.gz"


def save_mask(mask: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 mask (X, Y, Z) with ``affine`` as NIfTI atomically (temporary file in the same folder, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[: -len('.nii.gz')]}.{os.getpid()}.tmp.nii.gz")
    try:
        writer = NibabelWriter(output_dtype=np.uint8)
        writer.set_data_array(torch.as_tensor(np.asarray(mask, dtype=np.uint8))[None], channel_dim=0)
        affine = torch.as_tensor(np.asarray(affine, dtype=np.float64))
        writer.set_metadata({"affine": affine, "original_affine": affine}, resample=False)
        writer.write(str(tmp), verbose=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _batch_jobs(batch_dir: str | os.PathLike, batch_clicks: Any) -> list[tuple[str, Any]]:
    folder = Path(batch_dir)
    if not folder.is_dir():
        raise InputError(f"batch_dir is not a folder: {folder}")
    if _is_null(batch_clicks):
        raise InputError("batch mode needs batch_clicks: a JSON {filename: {'foreground': [...], 'background': []}}")
    if isinstance(batch_clicks, (str, os.PathLike)):
        text = os.fspath(batch_clicks)
        try:
            batch_clicks = json.loads(Path(text).read_text() if os.path.isfile(text) else text)
        except json.JSONDecodeError as err:
            raise InputError(f"batch_clicks is neither a JSON file nor valid JSON: {err}") from None
    if not isinstance(batch_clicks, Mapping) or not batch_clicks:
        raise InputError("batch_clicks must be a non-empty JSON object {filename: clicks}")
    return [(str(folder / name), clicks) for name, clicks in sorted(batch_clicks.items())]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    text = text[0] if text else type(err).__name__
    return (
        text
        if isinstance(err, (ClickError, InputError, CheckpointError, FileNotFoundError))
        else (f"{type(err).__name__}: {text}")
    )


def run_inference(
    ckpt_path: str | os.PathLike | None,
    image: str | os.PathLike | None = None,
    clicks: Any = None,
    output_dir: str | os.PathLike = "output",
    device: str | torch.device = "cpu",
    batch_dir: str | os.PathLike | None = None,
    batch_clicks: Any = None,
    exit_on_error: bool = True,
) -> list[str]:
    """Segment one image (``image`` + ``clicks``) or every entry of ``batch_clicks`` under ``batch_dir``.

    Args:
        ckpt_path: the model file; the network and its preprocessing (spacing, channel, CT clamp, normalisation)
            come from it (``scripts.model_file``).
        clicks: dict / JSON string / JSON file ``{"foreground": [[i, j, k]], "background": [...]}`` (file voxels).
        exit_on_error: print ``error: <one line>`` to stderr and exit 1 on failure (CLI); False re-raises.

    Returns:
        paths written (batch mode continues past failing cases, then exits 1 if any failed).
    """
    written: list[str] = []
    failures: list[str] = []
    try:
        if _is_null(batch_dir):
            if _is_null(image):
                raise InputError("no image given: pass --image path (or --batch_dir and --batch_clicks)")
            jobs = [(os.fspath(image), clicks)]
        else:
            jobs = _batch_jobs(batch_dir, batch_clicks)
        for path, _ in jobs:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"image not found: {path}")
        parsed = [(path, parse_clicks(c)) for path, c in jobs]
        model = load_model(ckpt_path, device)
        pre = model.preprocessing
        segmenter = InteractiveSegmenter(
            model.network, device=device, normalisation=pre.normalisation, **pre.image_kwargs()
        )
    except Exception as err:
        return _fail(err, exit_on_error)

    for path, c in parsed:
        try:
            result = segmenter.segment(path, path, c["foreground"], c["background"])
            out = save_mask(result.mask, result.affine, output_path(output_dir, path))
            written.append(str(out))
            info = result.info
            print(
                f"{out}: {int(result.mask.sum())} voxels, {info['objects']} object(s), {info['windows']} window(s), "
                f"{info['latency_ms']:.0f} ms"
            )
        except Exception as err:
            if len(parsed) == 1:
                return _fail(err, exit_on_error)
            failures.append(f"{Path(path).name}: {_one_line(err)}")
    if failures:
        for line in failures:
            print(f"error: {line}", file=sys.stderr)
        if exit_on_error:
            raise SystemExit(1)
        raise RuntimeError(f"{len(failures)} of {len(parsed)} cases failed")
    return written


def _fail(err: Exception, exit_on_error: bool):
    if not exit_on_error or os.environ.get("SGPSAM_DEBUG"):
        raise err
    print(f"error: {_one_line(err)}", file=sys.stderr)
    raise SystemExit(1)
