"""Ignite engines for interactive (click-simulating) training and validation, on MONAI's supervised engines.

MONAI's ``SupervisedTrainer``/``SupervisedEvaluator`` run one forward per batch; SAM-style training needs one
encoder pass and many prompt rounds per batch, so we override ``_iteration`` (the VISTA3D bundle does the same)
and keep everything else (handlers, AMP scaler, metrics, events) from MONAI.

Extra losses: a network extension (``network.extensions``, e.g. a baseline's prompt branch) may bring its own
training objective. Any extension with a ``training_losses(targets, batch)`` method returns ``(name, weight,
value)`` terms about its last ``encode``; the step adds ``weight * value`` to the click-round loss and the trainer
reports each value under ``name``. ``batch`` holds the batch entries the extensions list in ``batch_keys``.

Gate cost: with a learned SGPM gate, the step reports the mean decision probability (``gate_open``: the share of
fusion-block compute the soft gate spends) and, with ``gate_cost`` > 0, adds ``gate_cost`` times it to the loss, so
the gate runs the fusion only where it lowers the segmentation loss by more than it costs (docs/method.md).
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import convert_to_tensor
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from .click_rounds import evaluation_clicks, training_rounds


def anatomy_inputs(batchdata: dict, anatomy_key: str | None, device: torch.device | str) -> dict[str, torch.Tensor]:
    """``network.encode`` inputs carrying the batch's organ masks (TAGS anatomy prompt); empty when off."""
    if not anatomy_key:
        return {}
    if anatomy_key not in batchdata:
        raise KeyError(f"anatomy_key '{anatomy_key}' is set but the batch has no such entry (check the preprocessing)")
    organ = convert_to_tensor(batchdata[anatomy_key], track_meta=False)
    return {"anatomy": organ.to(device=device, dtype=torch.float32)}


def extension_batch_keys(network: nn.Module) -> set[str]:
    """Batch entries the network's extensions ask for in ``training_losses``."""
    network = getattr(network, "module", network)
    extensions = getattr(network, "extensions", {})
    return {key for extension in extensions.values() for key in getattr(extension, "batch_keys", ())}


def gate_probabilities(network: nn.Module) -> torch.Tensor | None:
    """(B, stages) decision probabilities of a learned SGPM gate in the last ``encode``; None without one."""
    network = getattr(network, "module", network)
    sgpm = getattr(network, "sgpm", None)
    if sgpm is None or sgpm.gate_mode != "learned":
        return None
    return sgpm.decision_probs()


def extension_losses(network: nn.Module, targets: torch.Tensor, batch: dict) -> list[tuple[str, float, torch.Tensor]]:
    """The ``(name, weight, value)`` training terms of the network's extensions (module docstring)."""
    network = getattr(network, "module", network)
    terms = []
    for extension in getattr(network, "extensions", {}).values():
        if hasattr(extension, "training_losses"):
            terms += extension.training_losses(targets, batch)
    return terms


class ClickTrainingStep(nn.Module):
    """One training step's forward: encode once, simulated click rounds, loss summed over rounds, plus the
    extensions' extra losses (module docstring).

    Wrapping this (not the bare network) in ``DistributedDataParallel`` keeps DDP's gradient sync correct although
    the network is called many times per step.
    """

    def __init__(
        self,
        network: nn.Module,
        loss_function: Callable,
        num_rounds: int = 11,
        seed: int = 0,
        gate_cost: float = 0.0,
        first_round_weight: float = 1.0,
        decoder_loss_weight: float = 0.0,
        central_first_click: float = 0.0,
    ):
        super().__init__()
        self.network = network
        self.loss_function = loss_function
        self.num_rounds = num_rounds
        self.gate_cost = float(gate_cost)
        self.first_round_weight = float(first_round_weight)
        self.decoder_loss_weight = float(decoder_loss_weight)
        self.central_first_click = float(central_first_click)
        self.rng = random.Random(seed)
        self.last_extra_losses: dict[str, float] = {}

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        encode_inputs: dict[str, torch.Tensor] | None = None,
        batch: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_inputs``: e.g. the anatomy masks; ``batch``: the entries the extensions' losses need."""
        loss, logits = training_rounds(
            self.network,
            images,
            targets,
            self.loss_function,
            self.num_rounds,
            self.rng,
            encode_inputs=encode_inputs,
            first_round_weight=self.first_round_weight,
            decoder_loss_weight=self.decoder_loss_weight,
            central_first_click=self.central_first_click,
        )
        self.last_extra_losses = {}
        for name, weight, value in extension_losses(self.network, targets, batch or {}):
            self.last_extra_losses[name] = float(value.detach())
            if weight:
                loss = loss + weight * value
        probs = gate_probabilities(self.network)
        if probs is not None:
            self.last_extra_losses["gate_open"] = float(probs.mean().detach())
            if self.gate_cost:
                loss = loss + self.gate_cost * probs.mean()
        return loss, logits


class InteractiveTrainer(SupervisedTrainer):
    """SupervisedTrainer whose iteration runs SAM-Med3D's click-simulation protocol.

    Args (beyond SupervisedTrainer's):
        num_rounds: click rounds per sample (SAM-Med3D: 11; one random round and the last are mask-only).
        grad_clip_norm: clip the global gradient norm (None/0 = off).
        training_step: optional pre-built (e.g. DDP-wrapped) ``ClickTrainingStep``; built from ``network`` if None.
        seed: seed of the click draws' round schedule.
        anatomy_key: batch entry holding the organ masks passed to ``encode(..., anatomy=...)``; None = off.
        gate_cost: weight of the SGPM gate's compute cost in the loss (module docstring); 0 = off.
        first_round_weight: weight of the first click round's loss (``training_rounds``); 1 = a plain sum.
        decoder_loss_weight: weight of the mask decoder's own loss in each round (``training_rounds``); 0 = off.
        central_first_click: share of samples whose first click comes from the lesion's centre (``training_rounds``).
    """

    def __init__(
        self,
        *args: Any,
        num_rounds: int = 11,
        grad_clip_norm: float | None = 1.0,
        training_step: nn.Module | None = None,
        seed: int = 0,
        anatomy_key: str | None = None,
        gate_cost: float = 0.0,
        first_round_weight: float = 1.0,
        decoder_loss_weight: float = 0.0,
        central_first_click: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.training_step = training_step or ClickTrainingStep(
            self.network,
            self.loss_function,
            num_rounds,
            seed,
            gate_cost,
            first_round_weight,
            decoder_loss_weight,
            central_first_click,
        )
        self.grad_clip_norm = grad_clip_norm
        self.anatomy_key = anatomy_key

    def _iteration(self, engine: "InteractiveTrainer", batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        images, targets = batch[0], batch[1]
        encode_inputs = anatomy_inputs(batchdata, engine.anatomy_key, images.device)
        extras = {
            key: convert_to_tensor(batchdata[key], track_meta=False).to(images.device)
            for key in sorted(extension_batch_keys(engine.network))
            if key in batchdata
        }
        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = engine.amp and images.device.type == "cuda"
        with torch.autocast("cuda", **engine.amp_kwargs) if use_amp else nullcontext():
            loss, logits = engine.training_step(images, targets, encode_inputs, extras)
        engine.state.output[Keys.PRED] = logits.detach()
        engine.state.output[Keys.LOSS] = loss.detach()
        engine.state.output.update(getattr(engine.training_step, "module", engine.training_step).last_extra_losses)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine._step(loss, use_amp)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _step(self, loss: torch.Tensor, use_amp: bool) -> None:
        """Backward (scaled under AMP), gradient clipping and the optimiser step."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if use_amp and self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.fire_event(IterationEvents.BACKWARD_COMPLETED)
            self.scaler.unscale_(self.optimizer)
            if self.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if self.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
            self.optimizer.step()


def dice_after_clicks_keys(clicks: Sequence[int]) -> list[str]:
    return [f"pred_{k}click" for k in clicks]


class InteractiveEvaluator(SupervisedEvaluator):
    """Validation by the deterministic click protocol; outputs the binary prediction after each requested click.

    ``engine.state.output`` holds ``label`` and ``pred_{k}click`` (B, 1, S, S, S) for k in ``clicks``, so MONAI
    metrics (``MeanDice`` with ``from_engine``) compute Dice after k clicks.
    """

    def __init__(
        self, *args: Any, clicks: Sequence[int] = (1, 5), anatomy_key: str | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        self.clicks = tuple(int(k) for k in clicks)
        self.anatomy_key = anatomy_key

    def _iteration(self, engine: "InteractiveEvaluator", batchdata: dict[str, torch.Tensor]) -> dict:
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        images, targets = batch[0], batch[1]
        anatomy = anatomy_inputs(batchdata, engine.anatomy_key, images.device).get("anatomy")
        network = engine.network.module if hasattr(engine.network, "module") else engine.network
        network.eval()
        preds = {k: [] for k in self.clicks}
        with torch.no_grad(), (
            torch.autocast("cuda", **engine.amp_kwargs) if engine.amp and images.is_cuda else (nullcontext())
        ):
            for b in range(images.shape[0]):
                target = targets[b, 0].detach().cpu().numpy() > 0.5
                encode_inputs = {} if anatomy is None else {"anatomy": anatomy[b : b + 1]}
                result = evaluation_clicks(
                    network,
                    images[b : b + 1],
                    target,
                    max(self.clicks),
                    keep_masks_at=self.clicks,
                    encode_inputs=encode_inputs,
                )
                for k in self.clicks:
                    preds[k].append(torch.as_tensor(result["masks_at"][k][None], dtype=torch.float32))
        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: (targets > 0.5).float()}
        for k, key in zip(self.clicks, dice_after_clicks_keys(self.clicks)):
            engine.state.output[key] = torch.stack(preds[k]).to(images.device)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
