"""Ignite engines for interactive (click-simulating) training and validation, on MONAI's supervised engines.

MONAI's ``SupervisedTrainer``/``SupervisedEvaluator`` run one forward per batch; SAM-style training needs one
encoder pass and many prompt rounds per batch, so we override ``_iteration`` (the VISTA3D bundle does the same)
and keep everything else (handlers, AMP scaler, metrics, events) from MONAI.
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

from ..baselines.tags import tags_alignment_loss
from .click_rounds import evaluation_clicks, training_rounds


def anatomy_inputs(batchdata: dict, anatomy_key: str | None, device: torch.device | str) -> dict[str, torch.Tensor]:
    """``network.encode`` inputs carrying the batch's organ masks (TAGS anatomy prompt); empty when off."""
    if not anatomy_key:
        return {}
    if anatomy_key not in batchdata:
        raise KeyError(f"anatomy_key '{anatomy_key}' is set but the batch has no such entry (check the preprocessing)")
    organ = convert_to_tensor(batchdata[anatomy_key], track_meta=False)
    return {"anatomy": organ.to(device=device, dtype=torch.float32)}


class ClickTrainingStep(nn.Module):
    """One training step's forward: encode once, simulated click rounds, loss summed over rounds.

    Wrapping this (not the bare network) in ``DistributedDataParallel`` keeps DDP's gradient sync correct although
    the network is called many times per step.

    Args:
        align_weight: weight of the TAGS alignment loss, added once per step (the encoder runs once) when the
            network has TAGS semantic prompts; 0 leaves it out.
        protocol_click_fraction: share of training clicks placed by the evaluation rule (``training_rounds``).
    """

    def __init__(
        self,
        network: nn.Module,
        loss_function: Callable,
        num_rounds: int = 11,
        gate_cost: float = 0.0,
        seed: int = 0,
        align_weight: float = 0.0,
        protocol_click_fraction: float = 0.0,
    ):
        super().__init__()
        self.network = network
        self.loss_function = loss_function
        self.num_rounds = num_rounds
        self.gate_cost = gate_cost
        self.align_weight = align_weight
        self.protocol_click_fraction = float(protocol_click_fraction)
        self.rng = random.Random(seed)
        self.last_alignment_loss: float | None = None

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        encode_inputs: dict[str, torch.Tensor] | None = None,
        alignment_targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_inputs``: e.g. the anatomy masks; ``alignment_targets``: (B, 1, S, S, S) lesion masks the TAGS
        alignment maps are scored on (default ``targets``)."""
        loss, logits = training_rounds(
            self.network,
            images,
            targets,
            self.loss_function,
            self.num_rounds,
            self.rng,
            encode_inputs=encode_inputs,
            protocol_click_fraction=self.protocol_click_fraction,
        )
        sgpm = getattr(self.network, "sgpm", None)
        if self.gate_cost and sgpm is not None and sgpm.decision_probs() is not None:
            # Optional compute budget: pushes gates to close where fusion does not pay for itself.
            loss = loss + self.gate_cost * sgpm.decision_probs().mean()
        alignment = tags_alignment_loss(self.network, targets if alignment_targets is None else alignment_targets)
        self.last_alignment_loss = None if alignment is None else float(alignment.detach())
        if self.align_weight and alignment is not None:
            loss = loss + self.align_weight * alignment
        return loss, logits


class InteractiveTrainer(SupervisedTrainer):
    """SupervisedTrainer whose iteration runs SAM-Med3D's click-simulation protocol.

    Args (beyond SupervisedTrainer's):
        num_rounds: click rounds per sample (SAM-Med3D: 11; one random round and the last are mask-only).
        grad_clip_norm: clip the global gradient norm (None/0 = off).
        training_step: optional pre-built (e.g. DDP-wrapped) ``ClickTrainingStep``; built from ``network`` if None.
        gate_cost: weight of the SGPM mean-gate-probability penalty.
        anatomy_key: batch entry holding the organ masks passed to ``encode(..., anatomy=...)`` (TAGS); None = off.
        align_weight: weight of the TAGS alignment loss (see ``ClickTrainingStep``).
        alignment_label_key: batch entry the alignment maps are scored on: all lesions of the crop ("label_all"),
            since "lesion vs normal tissue" is semantic, not one instance; falls back to the target.
        protocol_click_fraction: share of training clicks placed by the evaluation rule (0 = SAM-Med3D's uniform
            draw from the error region; see ``click_rounds.training_rounds``).
    """

    def __init__(
        self,
        *args: Any,
        num_rounds: int = 11,
        grad_clip_norm: float | None = 1.0,
        training_step: nn.Module | None = None,
        gate_cost: float = 0.0,
        seed: int = 0,
        anatomy_key: str | None = None,
        align_weight: float = 0.0,
        alignment_label_key: str | None = "label_all",
        protocol_click_fraction: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.training_step = training_step or ClickTrainingStep(
            self.network, self.loss_function, num_rounds, gate_cost, seed, align_weight, protocol_click_fraction
        )
        self.grad_clip_norm = grad_clip_norm
        self.anatomy_key = anatomy_key
        self.alignment_label_key = alignment_label_key

    def _iteration(self, engine: "InteractiveTrainer", batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        images, targets = batch[0], batch[1]
        encode_inputs = anatomy_inputs(batchdata, engine.anatomy_key, images.device)
        alignment_targets = batchdata.get(engine.alignment_label_key) if engine.alignment_label_key else None
        if alignment_targets is not None:
            alignment_targets = convert_to_tensor(alignment_targets, track_meta=False).to(images.device)
        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = engine.amp and images.device.type == "cuda"
        with torch.autocast("cuda", **engine.amp_kwargs) if use_amp else nullcontext():
            loss, logits = engine.training_step(images, targets, encode_inputs, alignment_targets)
        engine.state.output[Keys.PRED] = logits.detach()
        engine.state.output[Keys.LOSS] = loss.detach()
        alignment = getattr(engine.training_step, "module", engine.training_step).last_alignment_loss
        if alignment is not None:
            engine.state.output["alignment_loss"] = alignment
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
