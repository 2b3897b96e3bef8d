"""Ignite engines for interactive (click-simulating) training and validation, on MONAI's supervised engines.

MONAI's ``SupervisedTrainer``/``SupervisedEvaluator`` run one forward per batch; SAM-style training needs one
encoder pass and many prompt rounds per batch, so we override ``_iteration`` (the VISTA3D bundle does the same)
and keep everything else (handlers, AMP scaler, metrics, events) from MONAI.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from .click_rounds import evaluation_clicks, training_rounds


class ClickTrainingStep(nn.Module):
    """One training step's forward: encode once, simulated click rounds, loss summed over rounds.

    Wrapping this (not the bare network) in ``DistributedDataParallel`` keeps DDP's gradient sync correct although
    the network is called many times per step.
    """

    def __init__(
        self, network: nn.Module, loss_function: Callable, num_rounds: int = 11, gate_cost: float = 0.0, seed: int = 0
    ):
        super().__init__()
        self.network = network
        self.loss_function = loss_function
        self.num_rounds = num_rounds
        self.gate_cost = gate_cost
        self.rng = random.Random(seed)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = training_rounds(self.network, images, targets, self.loss_function, self.num_rounds, self.rng)
        sgpm = getattr(self.network, "sgpm", None)
        if self.gate_cost and sgpm is not None and sgpm.decision_probs() is not None:
            # Optional compute budget: pushes gates to close where fusion does not pay for itself.
            loss = loss + self.gate_cost * sgpm.decision_probs().mean()
        return loss, logits


class InteractiveTrainer(SupervisedTrainer):
    """SupervisedTrainer whose iteration runs SAM-Med3D's click-simulation protocol.

    Args (beyond SupervisedTrainer's):
        num_rounds: click rounds per sample (SAM-Med3D: 11; one random round and the last are mask-only).
        grad_clip_norm: clip the global gradient norm (None/0 = off).
        training_step: optional pre-built (e.g. DDP-wrapped) ``ClickTrainingStep``; built from ``network`` if None.
        gate_cost: weight of the SGPM mean-gate-probability penalty.
    """

    def __init__(
        self,
        *args: Any,
        num_rounds: int = 11,
        grad_clip_norm: float | None = 1.0,
        training_step: nn.Module | None = None,
        gate_cost: float = 0.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.training_step = training_step or ClickTrainingStep(
            self.network, self.loss_function, num_rounds, gate_cost, seed
        )
        self.grad_clip_norm = grad_clip_norm

    def _iteration(self, engine: "InteractiveTrainer", batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        images, targets = batch[0], batch[1]
        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = engine.amp and images.device.type == "cuda"
        with torch.autocast("cuda", **engine.amp_kwargs) if use_amp else nullcontext():
            loss, logits = engine.training_step(images, targets)
        engine.state.output[Keys.PRED] = logits.detach()
        engine.state.output[Keys.LOSS] = loss.detach()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        params = [p for g in engine.optimizer.param_groups for p in g["params"]]
        if use_amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.unscale_(engine.optimizer)
            if engine.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(params, engine.grad_clip_norm)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if engine.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(params, engine.grad_clip_norm)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def dice_after_clicks_keys(clicks: Sequence[int]) -> list[str]:
    return [f"pred_{k}click" for k in clicks]


class InteractiveEvaluator(SupervisedEvaluator):
    """Validation by the deterministic click protocol; outputs the binary prediction after each requested click.

    ``engine.state.output`` holds ``label`` and ``pred_{k}click`` (B, 1, S, S, S) for k in ``clicks``, so MONAI
    metrics (``MeanDice`` with ``from_engine``) compute Dice after k clicks.
    """

    def __init__(self, *args: Any, clicks: Sequence[int] = (1, 5), **kwargs: Any) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        self.clicks = tuple(int(k) for k in clicks)

    def _iteration(self, engine: "InteractiveEvaluator", batchdata: dict[str, torch.Tensor]) -> dict:
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        images, targets = batch[0], batch[1]
        network = engine.network.module if hasattr(engine.network, "module") else engine.network
        network.eval()
        preds = {k: [] for k in self.clicks}
        with torch.no_grad(), torch.autocast("cuda", **engine.amp_kwargs) if engine.amp and images.is_cuda else (
            nullcontext()
        ):
            for b in range(images.shape[0]):
                target = targets[b, 0].detach().cpu().numpy() > 0.5
                result = evaluation_clicks(network, images[b : b + 1], target, max(self.clicks), keep_masks_at=self.clicks)
                for k in self.clicks:
                    preds[k].append(torch.as_tensor(result["masks_at"][k][None], dtype=torch.float32))
        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: (targets > 0.5).float()}
        for k, key in zip(self.clicks, dice_after_clicks_keys(self.clicks)):
            engine.state.output[key] = torch.stack(preds[k]).to(images.device)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs (MONAI's set_determinism also touches cuDNN flags; this is for the engines)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
