"""Exponential moving average (EMA) of the trained weights: validated, checkpointed and shipped in their place.

Fine-tuning on a few dozen cases runs a few hundred iterations at most, and the weights at any one iteration carry
that iteration's batch noise. The average over the last ~1 / (1 - decay) iterations is a smoother model at no extra
training cost. ``torch.optim.swa_utils.AveragedModel`` keeps the average; this handler updates it after every
iteration, swaps it into the network while the validator runs (so the best-metric ``model.pt`` holds the averaged
weights) and swaps the live weights back before training continues. ``decay`` None or 0 disables it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["WeightEMA"]

logger = logging.getLogger("sgpsam.ema")


class WeightEMA:
    """Ignite handler: EMA of ``network``'s parameters and buffers, used by ``evaluator`` in place of the live ones.

    Args:
        network: the bare network being trained (not a DDP wrapper; every rank holds the same weights).
        decay: EMA decay per iteration, e.g. 0.95 averages over roughly the last 20 iterations; None or 0 = off.
        evaluator: the validation engine; while it runs, the network holds the averaged weights.
    """

    def __init__(self, network: nn.Module, decay: float | None = None, evaluator: Engine | None = None):
        if decay is not None and not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or null, got {decay}")
        self.network = network
        self.decay = float(decay) if decay else 0.0
        self.evaluator = evaluator
        self.averaged = (
            AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
            if self.enabled
            else None
        )
        self._live: dict[str, torch.Tensor] | None = None

    @property
    def enabled(self) -> bool:
        return self.decay > 0.0

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.STARTED, self.swap_in)
            self.evaluator.add_event_handler(Events.COMPLETED, self.swap_out)
            self.evaluator.add_event_handler(Events.EXCEPTION_RAISED, self._swap_out_and_raise)

    def update(self, engine: Engine | None = None) -> None:
        self.averaged.update_parameters(self.network)

    def swap_in(self, engine: Engine | None = None) -> None:
        """Put the averaged weights into the network, keeping a copy of the live ones (once; nested calls no-op)."""
        if self._live is not None or int(self.averaged.n_averaged) == 0:
            return
        self._live = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        self.network.load_state_dict(self.averaged.module.state_dict())

    def swap_out(self, engine: Engine | None = None) -> None:
        """Give the network its live weights back."""
        if self._live is None:
            return
        self.network.load_state_dict(self._live)
        self._live = None

    def _swap_out_and_raise(self, engine: Engine, exception: BaseException) -> None:
        self.swap_out()
        raise exception

    def state_dict(self) -> dict[str, Any]:
        return {} if self.averaged is None else self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.averaged is None:
            if state:
                logger.warning("the checkpoint holds weight averages but ema_decay is off: they are not used")
            return
        if not state:
            logger.warning("the checkpoint holds no weight averages: the average restarts from the loaded weights")
            self.averaged.n_averaged.zero_()
            return
        self.averaged.load_state_dict(state)
