"""Click rounds on one encoded crop: SAM-Med3D's training protocol and the deterministic evaluation protocol.

Both feed the decoder, each round, only the NEW click(s) together with the previous round's low-res logits as the
mask prompt (round one: an all-zero mask prompt), which is how SAM-Med3D was trained and evaluated by default; a
``multi_click`` network gets every click so far instead (SAM-Med3D's ``--multi_click``). The optional
high-resolution refiner (our addition) gets every click so far and its own previous output. Training, validation,
evaluation, inference and the MONAI Label app all go through these functions so they stay consistent.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..clicks import (
    central_region,
    click_consistent_logits,
    dice,
    next_eval_click,
    sample_training_click,
    training_round_schedule,
)


def initial_mask_prompt(network, batch: int, device) -> torch.Tensor:
    """All-zero low-res mask prompt of round one, (B, 1, X/4... ) as SAM-Med3D feeds it."""
    return torch.zeros((batch, 1, *network.low_res_size), device=device)


def decoder_clicks(network, new, history):
    """What a round feeds the decoder: the new click(s), or every click so far (``history``, the new ones included)
    for a ``multi_click`` network. Any representation works: (points, labels) tensors here, click lists in the app."""
    return history if getattr(network, "multi_click", False) else new


def shown_logits(
    network, logits: torch.Tensor, points=None, labels=None, keep_clicked_components: bool = True
) -> torch.Tensor:
    """The round's logits as the annotator sees them (detached): made to agree with every click so far when the
    network is ``click_consistent`` (:func:`scripts.clicks.click_consistent_logits`). They pick the next click and
    are the refiner's previous-round input."""
    if not getattr(network, "click_consistent", False):
        return logits.detach()
    return click_consistent_logits(logits, points, labels, keep_clicked_components=keep_clicked_components)


def training_rounds(
    network,
    images: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    num_rounds: int = 11,
    rng: random.Random | None = None,
    generator: torch.Generator | None = None,
    encode_inputs: dict[str, Any] | None = None,
    first_round_weight: float = 1.0,
    decoder_loss_weight: float = 0.0,
    central_first_click: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Simulated interactive rounds with the loss summed over rounds.

    Args:
        images: (B, 1, S, S, S) normalised crops.
        targets: (B, 1, S, S, S) binary lesion masks.
        loss_fn: loss on full-resolution logits vs targets.
        encode_inputs: extra ``network.encode`` inputs, e.g. ``{"anatomy": organ masks (B, 1, S, S, S)}`` (TAGS).
        first_round_weight: weight of round one's loss (the others weigh 1). The first click alone has to draw the
            whole lesion, which a sum over many rounds underprices (docs/experiments.md, section 16).
        decoder_loss_weight: with a refiner, each round also adds this times the loss of the mask decoder's own
            upsampled logits (the loss upstream SAM-Med3D trains), so the decoder stays a calibrated mask and the
            refiner a correction of it (docs/experiments.md, section 17); 0 = the refined logits alone.
        central_first_click: share of samples whose first click is drawn from the lesion's central region
            (:func:`scripts.clicks.central_region`) instead of the whole lesion; 0 = upstream's uniform draw.

    Returns:
        (weighted sum of the rounds' losses, last round's full-resolution logits).
    """
    embeddings = network.encode(images, **(encode_inputs or {}))
    features = network.refine_features(images)
    prev_logits = initial_mask_prompt(network, images.shape[0], images.device)
    target_bool = targets > 0.5
    total = images.new_zeros(())
    logits = shown = None  # the network's logits (the loss's input) and what the annotator sees of them
    history = (None, None)  # every click fed so far: the refiner's input (the decoder's with multi_click)
    for index, feed_points in enumerate(training_round_schedule(num_rounds, rng)):
        if logits is not None:  # made here, not after the loss, so the last round's is never computed
            shown = shown_logits(network, logits, *history)
        with torch.no_grad():
            pred = torch.zeros_like(target_bool) if shown is None else shown > 0
            drawn_from = _first_click_region(target_bool, central_first_click, generator) if index == 0 else target_bool
            points, labels = sample_training_click(pred, drawn_from, generator)
        if not feed_points:
            points = labels = None
        else:
            history = _append_clicks(history, points, labels)
            points, labels = decoder_clicks(network, (points, labels), history)
        low_res, _ = network.decode(embeddings, points, labels, prev_logits)
        logits = network.full_res_logits(low_res, images.shape[2:], features, shown, *history)
        round_loss = loss_fn(logits.float(), targets.float())
        if decoder_loss_weight and getattr(network, "refiner", None) is not None:
            decoded = network.upscale_logits(low_res, images.shape[2:])
            round_loss = round_loss + decoder_loss_weight * loss_fn(decoded.float(), targets.float())
        total = total + (first_round_weight if index == 0 else 1.0) * round_loss
        prev_logits = low_res.detach()  # no gradient through earlier rounds (memory), as in VISTA3D-style training
    return total, logits


def _first_click_region(target: torch.Tensor, central_share: float, generator: torch.Generator | None) -> torch.Tensor:
    """Where round one's click is drawn: the central region for a ``central_share`` of the samples, else the whole
    target. The region lies inside the target, so the click's label (1) and an empty target's fallback are kept."""
    if central_share <= 0:
        return target
    chosen = torch.rand(target.shape[0], generator=generator, device=target.device) < central_share
    if not bool(chosen.any()):
        return target
    region = target.clone()
    region[chosen] = central_region(target[chosen])  # the distance transform runs on the CPU: only where needed
    return region


def _append_clicks(history, points: torch.Tensor, labels: torch.Tensor):
    """(all points (B, k, 3), all labels (B, k)) with this round's clicks appended."""
    if history[0] is None:
        return points, labels
    return torch.cat([history[0], points], 1), torch.cat([history[1], labels], 1)


@torch.no_grad()
def evaluation_clicks(
    network,
    image: torch.Tensor,
    target: np.ndarray,
    num_clicks: int,
    spacing: tuple[float, float, float] | None = None,
    embedding: torch.Tensor | None = None,
    keep_masks_at: Sequence[int] = (),
    encode_inputs: dict[str, Any] | None = None,
) -> dict:
    """Deterministic click protocol on one crop: deepest point of the larger error region each round.

    Args:
        image: (1, 1, S, S, S) normalised crop on the network's device.
        target: (S, S, S) bool lesion mask of this crop.
        num_clicks: clicks to simulate (stops early once the prediction is perfect; later Dice = last one).
        embedding: cached ``network.encode(image)`` if available.
        keep_masks_at: click counts k whose masks to return in ``"masks_at"`` (the last mask if stopped earlier).
        encode_inputs: extra ``network.encode`` inputs (e.g. ``{"anatomy": (1, 1, S, S, S)}``) when not cached.

    Returns:
        {"dice": [Dice after click 1..k], "mask": final (S, S, S) bool, "low_res_logits": last (1, 1, ...),
         "full_logits": last shown (1, 1, S, S, S) logits (None before a click), "points": [(i, j, k)],
         "labels": [0/1], "masks_at": {k: (S, S, S) bool}}
    """
    target = np.asarray(target, dtype=bool)
    embedding = network.encode(image, **(encode_inputs or {})) if embedding is None else embedding
    features = network.refine_features(image)
    prev_logits = initial_mask_prompt(network, 1, image.device)
    full_logits = None
    history = (None, None)
    pred = np.zeros_like(target)
    result = {"dice": [], "points": [], "labels": [], "mask": pred, "low_res_logits": prev_logits, "masks_at": {}}
    for _ in range(num_clicks):
        click = next_eval_click(pred, target, spacing)
        if click is None:
            break
        point, label = click
        points = torch.as_tensor(np.asarray(point, dtype=np.float32)[None, None], device=image.device)
        labels = torch.as_tensor([[int(label)]], device=image.device)
        history = _append_clicks(history, points, labels)
        prev_logits, _ = network.decode(embedding, *decoder_clicks(network, (points, labels), history), prev_logits)
        full_logits = network.full_res_logits(prev_logits.float(), target.shape, features, full_logits, *history)
        full_logits = shown_logits(network, full_logits, *history)
        pred = (full_logits > 0)[0, 0].cpu().numpy()
        result["dice"].append(float(dice(pred, target)))
        result["points"].append(tuple(int(p) for p in point))
        result["labels"].append(int(label))
        if len(result["dice"]) in keep_masks_at:
            result["masks_at"][len(result["dice"])] = pred
    for k in keep_masks_at:
        result["masks_at"].setdefault(k, pred)
    result.update(mask=pred, low_res_logits=prev_logits, full_logits=full_logits)
    return result
