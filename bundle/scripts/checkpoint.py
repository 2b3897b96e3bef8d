"""Safe loading of SAM-Med3D and SGP-SAM checkpoints.

SAM-Med3D's training script saves ``{"model_state_dict": ..., "optimizer_state_dict": ..., "args":
argparse.Namespace, ...}``. Plain ``torch.load(weights_only=True)`` refuses the Namespace, and full unpickling
would execute whatever a file carries. We load weights-only with a short allow-list of inert types and never fall
back to full unpickling: a file with any other pickled object is refused.
"""

from __future__ import annotations

import argparse
import glob
import os
import pickle
import re
from collections import OrderedDict
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

# Inert types found in SAM-Med3D checkpoints (args Namespace, numpy scalars in losses/dices lists).
if np.lib.NumpyVersion(np.__version__) >= "2.0.0":  # numpy 2 renamed np.core to np._core
    from numpy._core.multiarray import scalar as _numpy_scalar
else:
    from numpy.core.multiarray import scalar as _numpy_scalar
SAFE_GLOBALS: list[Any] = [argparse.Namespace, np.dtype, _numpy_scalar, OrderedDict]
SAFE_GLOBALS += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]

STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "network", "net")
STRIP_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unsafe content, wrong format, or keys/shapes that do not match."""


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> Any:
    """Weights-only ``torch.load`` with the allow-list; raises CheckpointError with a one-line reason.

    ``mmap``: map the tensors instead of reading them (cheap when only keys, shapes or metadata are needed); files
    in torch's legacy (non-zip) format are then read in full."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            if mmap:
                try:
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy format: no mmap
                    pass
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).splitlines()
        reason = next((line.strip() for line in detail if "Unsupported global" in line), detail[0] if detail else "")
        raise CheckpointError(
            f"refused to load {path}: it contains a pickled object outside the allow-list of weights and "
            f"inert types ({reason}). Re-save it as a plain state dict if you trust its origin."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Find the model weights in a loaded checkpoint and strip DDP / torch.compile prefixes."""
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError("checkpoint holds no state dict (expected a dict of tensors or 'model_state_dict')")
    non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(f"checkpoint state dict has non-tensor entries: {non_tensors[:5]}")
    state = {}
    for key, value in obj.items():
        for prefix in STRIP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    return state


def describe_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor], required: list[str]) -> list[str]:
    """Lines naming missing, unexpected and mis-shaped keys (empty if ``state`` fits)."""
    own = model.state_dict()
    missing = [k for k in required if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    lines = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")
            lines.append(f"{title}: {shown}")
    return lines


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load a SAM-Med3D checkpoint (strictly into the backbone) or an SGP-SAM checkpoint (backbone + extensions).

    Every backbone key must be present with the right shape; extension keys (``sgpm.*``, ``extensions.*``) are
    loaded when present and keep their identity initialisation when absent (a SAM-Med3D checkpoint).

    Returns:
        {"loaded": keys loaded, "initialised": extension keys left at their initialisation}.
    """
    state = extract_state_dict(read_checkpoint(source) if not isinstance(source, Mapping) else source)
    required = model.backbone_state_keys() if hasattr(model, "backbone_state_keys") else list(model.state_dict())
    problems = describe_mismatch(model, state, required)
    if problems:
        name = source if not isinstance(source, Mapping) else "state dict"
        raise CheckpointError(f"checkpoint {name} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
    initialised = [k for k in model.state_dict() if k not in state]
    return {"loaded": sorted(state), "initialised": initialised}


def save_sgp_sam_checkpoint(model: nn.Module, path: str | os.PathLike, **extra: Any) -> None:
    """Save ``{"model_state_dict": ..., **extra}`` (extra must be tensors/plain types) atomically."""
    module = model.module if hasattr(model, "module") else model
    tmp = f"{os.fspath(path)}.tmp"
    torch.save({"model_state_dict": module.state_dict(), **extra}, tmp)
    os.replace(tmp, path)


def latest_checkpoint(
    checkpoint_dir: str, required: bool = False, pattern: str = "checkpoint_epoch=*.pt"
) -> str | None:
    """Newest (highest epoch) resumable checkpoint in ``checkpoint_dir``; a clear error if ``required`` and none."""
    found = glob.glob(os.path.join(checkpoint_dir, pattern))
    if not found:
        if required:
            raise FileNotFoundError(f"--resume: no '{pattern}' checkpoint in {checkpoint_dir} to resume from")
        return None

    def epoch_of(path: str) -> int:
        match = re.search(r"=(\d+)", os.path.basename(path))
        return int(match.group(1)) if match else -1

    return max(found, key=epoch_of)
