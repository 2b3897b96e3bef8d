"""Which parameters train (parameter-efficient transfer) and their optimiser groups.

Parameters are grouped by the network's top-level child: ``image_encoder``, ``prompt_encoder``, ``mask_decoder``,
``sgpm`` and ``extensions`` (the baselines' adapters and prompts). The click map is a second prompt encoder and trains
with ``prompt_encoder``; the refiner finishes the decoder's mask and trains with ``mask_decoder``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from ..checkpoint import load_weights

logger = logging.getLogger("sgpsam")

GROUPS = ("image_encoder", "prompt_encoder", "click_map", "mask_decoder", "refiner", "sgpm", "extensions")
TRAINABLE_GROUPS = ("image_encoder", "prompt_encoder", "mask_decoder", "sgpm", "extensions")
FOLLOWS = {"click_map": "prompt_encoder", "refiner": "mask_decoder"}  # groups that train with another one


def parameter_group(name: str) -> str:
    """Group of a parameter name (its top-level child)."""
    head = name.split(".", 1)[0]
    return head if head in GROUPS else "other"


def set_trainable(
    model: nn.Module, trainable: Sequence[str] = ("prompt_encoder", "mask_decoder", "sgpm", "extensions")
) -> dict[str, dict[str, int]]:
    """Train the parameter groups listed in ``trainable`` (names of ``TRAINABLE_GROUPS``) and freeze the rest; the
    default freezes the image encoder. Returns the parameter counts per group (see ``count_parameters``).
    """
    unknown = sorted(set(trainable) - set(TRAINABLE_GROUPS))
    if unknown:
        raise ValueError(f"unknown trainable groups {unknown}; choose among {list(TRAINABLE_GROUPS)}")
    flags = {group: group in trainable for group in TRAINABLE_GROUPS}
    flags.update({group: flags[leader] for group, leader in FOLLOWS.items()})
    flags["other"] = True
    for name, param in model.named_parameters():
        param.requires_grad_(flags[parameter_group(name)])
    return count_parameters(model)


def count_parameters(model: nn.Module) -> dict[str, dict[str, int]]:
    """{group: {"trainable": n, "total": n}} plus a "all" entry."""
    counts: dict[str, dict[str, int]] = {}
    for name, param in model.named_parameters():
        entry = counts.setdefault(parameter_group(name), {"trainable": 0, "total": 0})
        entry["total"] += param.numel()
        entry["trainable"] += param.numel() if param.requires_grad else 0
    counts["all"] = {
        "trainable": sum(c["trainable"] for c in counts.values()),
        "total": sum(c["total"] for c in counts.values()),
    }
    return counts


def format_parameter_counts(counts: dict[str, dict[str, int]]) -> str:
    """One line per group: trainable / total parameters."""
    return "\n".join(f"{g:15s} {c['trainable']:>12,d} / {c['total']:>12,d} trainable" for g, c in counts.items())


def optimizer_param_groups(
    model: nn.Module, base_lr: float, lr_multipliers: dict[str, float] | None = None, weight_decay: float = 0.0
) -> list[dict]:
    """Trainable parameters grouped with per-group learning rates ``base_lr * multiplier``.

    Norm weights, biases, position embeddings and relative-position tables get no weight decay.
    """
    lr_multipliers = lr_multipliers or {}
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(("pos_embed", "rel_pos_d", "rel_pos_h", "rel_pos_w"))
        groups.setdefault((parameter_group(name), no_decay), []).append(param)
    return [
        {
            "params": params,
            "lr": base_lr * float(lr_multipliers.get(group, 1.0)),
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": f"{group}{'/no_decay' if no_decay else ''}",
        }
        for (group, no_decay), params in sorted(groups.items())
    ]


def prepare_network(
    network: torch.nn.Module,
    pretrained_ckpt: str | None = None,
    trainable: Sequence[str] = ("prompt_encoder", "mask_decoder", "sgpm", "extensions"),
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
    counts = set_trainable(network, trainable)
    logger.info("trainable parameters:\n%s", format_parameter_counts(counts))
    return network.to(device)
