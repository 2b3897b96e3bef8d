"""Weight EMA handler: the average it keeps, the swap around validation, checkpoint round trip, off switch."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from scripts.training.ema import WeightEMA
from torch import nn


def _trainer_that_adds(network: nn.Module, steps: list[float]) -> Engine:
    """An engine whose iteration i adds steps[i] to every weight (stands in for an optimiser step)."""

    def step(engine: Engine, batch: int) -> None:
        with torch.no_grad():
            for p in network.parameters():
                p.add_(steps[engine.state.iteration - 1])

    return Engine(step)


def test_ema_follows_the_hand_computed_average_and_validation_sees_it():
    torch.manual_seed(0)
    network = nn.Linear(3, 2)
    start = network.weight.detach().clone()
    seen_by_validation = []
    evaluator = Engine(lambda engine, batch: seen_by_validation.append(network.weight.detach().clone()))
    steps = [1.0, 2.0, 4.0]
    trainer = _trainer_that_adds(network, steps)
    ema = WeightEMA(network, decay=0.5, evaluator=evaluator)
    ema.attach(trainer)
    trainer.run(range(len(steps)), max_epochs=1)

    # first update copies the weights; then avg <- 0.5 * avg + 0.5 * w
    w1, w2, w3 = start + 1, start + 3, start + 7
    expected = 0.5 * (0.5 * w1 + 0.5 * w2) + 0.5 * w3
    torch.testing.assert_close(ema.averaged.module.weight, expected)

    evaluator.run([0])
    torch.testing.assert_close(seen_by_validation[0], expected)
    # training resumes from the live weights, not the average
    torch.testing.assert_close(network.weight.detach(), w3)


def test_live_weights_come_back_when_validation_fails():
    network = nn.Linear(2, 1)
    evaluator = Engine(lambda engine, batch: (_ for _ in ()).throw(RuntimeError("bad case")))
    trainer = _trainer_that_adds(network, [1.0, 1.0])
    ema = WeightEMA(network, decay=0.9, evaluator=evaluator)
    ema.attach(trainer)
    trainer.run(range(2), max_epochs=1)
    live = network.weight.detach().clone()
    with pytest.raises(RuntimeError, match="bad case"):
        evaluator.run([0])
    torch.testing.assert_close(network.weight.detach(), live)


def test_state_round_trip_and_off_switch():
    network = nn.Linear(2, 1)
    trainer = _trainer_that_adds(network, [1.0, 3.0])
    ema = WeightEMA(network, decay=0.8)
    ema.attach(trainer)
    trainer.run(range(2), max_epochs=1)

    restored = WeightEMA(nn.Linear(2, 1), decay=0.8)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.averaged.module.weight, ema.averaged.module.weight)
    assert int(restored.averaged.n_averaged) == 2

    off = WeightEMA(network, decay=None)
    before = network.weight.detach().clone()
    off.attach(trainer)  # no handlers: the live weights are validated and saved as before
    assert off.state_dict() == {}
    off.load_state_dict(ema.state_dict())  # ignored with a warning, not an error
    torch.testing.assert_close(network.weight.detach(), before)
    with pytest.raises(ValueError, match="ema_decay"):
        WeightEMA(network, decay=1.0)
