"""Small helpers the bundle configs call."""

from __future__ import annotations

import glob
import logging
import os
import re

import torch

from .checkpoint import load_weights
from .training_policy import format_parameter_counts, set_trainable

logger = logging.getLogger("sgpsam")

from . import BUNDLE_ROOT  # noqa: E402,F401  (re-exported for configs)


def latest_checkpoint(checkpoint_dir: str, required: bool = False, pattern: str = "checkpoint_epoch=*.pt") -> str | None:
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


def prepare_network(
    network: torch.nn.Module,
    pretrained_ckpt: str | None = None,
    train_image_encoder: bool = False,
    train_prompt_encoder: bool = True,
    train_mask_decoder: bool = True,
    train_sgpm: bool = True,
    train_extensions: bool = True,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Load a SAM-Med3D / SGP-SAM checkpoint (strictly into the backbone), set the trainable groups, move to device."""
    if pretrained_ckpt:
        report = load_weights(network, pretrained_ckpt)
        logger.info(
            "loaded %d tensors from %s; %d extension tensors keep their identity initialisation",
            len(report["loaded"]),
            pretrained_ckpt,
            len(report["initialised"]),
        )
    counts = set_trainable(
        network, train_image_encoder, train_prompt_encoder, train_mask_decoder, train_sgpm, train_extensions
    )
    logger.info("trainable parameters:\n%s", format_parameter_counts(counts))
    return network.to(device)
