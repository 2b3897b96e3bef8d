"""Bundle evaluation with the TAGS anatomy prompt, on top of the unchanged ``scripts.evaluate`` protocol.

``scripts.evaluate.evaluate_dataset`` crops every lesion from the preprocessed image and calls
``network.encode(crop)``; it knows nothing of organ masks. :class:`AnatomyPromptedNetwork` wraps the network and
supplies, for each crop it is asked to encode, the organ-mask crop taken at the same place. It preprocesses each
case once more with the anatomy mask, crops every lesion with ``LesionCropd`` (the centre rule the evaluation
uses) and files the organ crop under the exact bytes of the normalised image crop. A crop it cannot match raises,
so a change in the evaluation's cropping cannot silently drop the prompt. Cases without an organ mask (e.g. the
real NRRD cases) are encoded without one, with a warning: that equals an all-zero anatomy channel.

Bundle entry (``evaluate.json``): :func:`run_evaluation`, which is ``scripts.evaluate.run_evaluation`` when the
anatomy prompt is off.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Sequence

import torch
from torch import nn

from . import evaluate
from .checkpoint import CheckpointError, load_weights
from .transforms import get_crop_transforms, get_preprocess_transforms, lesion_components, load_datalist

logger = logging.getLogger("sgpsam.evaluate")


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)


def crop_fingerprint(image: torch.Tensor) -> str:
    """Identity of a normalised image crop: a digest of its float32 bytes."""
    return hashlib.sha1(_plain(image).detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


class AnatomyPromptedNetwork(nn.Module):
    """``network`` whose ``encode(crop)`` adds ``anatomy=`` the organ-mask crop of that crop (see module docstring).

    Cases are indexed lazily in datalist order, one at a time, because the evaluation visits them in that order;
    only the current case's organ crops are held in memory.

    Args:
        network: the SGP-SAM model with a TAGS anatomy branch.
        datalist: the evaluated items ({"image", "label", and ``anatomy_key`` or not}).
        anatomy_key, anatomy_labels, anatomy_from_label: where the organ mask comes from
            (``scripts.transforms.get_preprocess_transforms``).
        target_label, image_channel, ct_clamp, spacing: the evaluation's preprocessing.
    """

    def __init__(
        self,
        network: nn.Module,
        datalist: Sequence[dict],
        anatomy_key: str,
        anatomy_labels: int | Sequence[int] | None = None,
        anatomy_from_label: bool = False,
        target_label: int | Sequence[int] | None = 1,
        image_channel: int | None = None,
        ct_clamp: bool = False,
        spacing: float = 1.5,
    ) -> None:
        super().__init__()
        self.network = network
        self.anatomy_key = anatomy_key
        self._pending = list(datalist)
        self._preprocess_args = (target_label, image_channel, ct_clamp, spacing)
        self._anatomy_args = dict(anatomy_key=anatomy_key, anatomy_labels=anatomy_labels)
        self._anatomy_from_label = anatomy_from_label
        self._case_crops: dict[str, torch.Tensor | None] = {}
        self.prompted_crops = 0  # crops encoded with an organ mask (for reports and tests)
        self.unprompted_crops = 0

    # the evaluation's view of the network
    @property
    def img_size(self) -> int:
        return self.network.img_size

    @property
    def low_res_size(self) -> tuple[int, int, int]:
        return self.network.low_res_size

    def decode(self, *args: Any, **kwargs: Any):
        return self.network.decode(*args, **kwargs)

    def upscale_logits(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.network.upscale_logits(*args, **kwargs)

    def encode(self, images: torch.Tensor, **extension_inputs: Any) -> torch.Tensor:
        if extension_inputs.get("anatomy") is None:
            extension_inputs.pop("anatomy", None)
            anatomy = self.anatomy_for(images)
            if anatomy is not None:
                extension_inputs["anatomy"] = anatomy
        self.prompted_crops += "anatomy" in extension_inputs
        self.unprompted_crops += "anatomy" not in extension_inputs
        return self.network.encode(images, **extension_inputs)

    def anatomy_for(self, images: torch.Tensor) -> torch.Tensor | None:
        """Organ-mask crop (1, 1, S, S, S) for the normalised image crop ``images`` (1, 1, S, S, S), or None."""
        key = crop_fingerprint(images)
        while key not in self._case_crops:
            if not self._pending:
                raise RuntimeError(
                    "anatomy prompt: this image crop matches no lesion crop of the datalist; the evaluation's "
                    "cropping and scripts.anatomy_evaluation have drifted apart"
                )
            self._case_crops = self._index_case(self._pending.pop(0))
        mask = self._case_crops[key]
        return None if mask is None else mask.to(images.device, torch.float32)[None]

    def _index_case(self, item: dict) -> dict[str, torch.Tensor | None]:
        has_mask = self._anatomy_from_label or self.anatomy_key in item
        if not has_mask:
            logger.warning("%s: no '%s' mask, evaluated without the anatomy prompt", item["image"], self.anatomy_key)
        anatomy = self._anatomy_args if has_mask else {}
        preprocess = get_preprocess_transforms(
            *self._preprocess_args, anatomy_from_label=self._anatomy_from_label and has_mask, **anatomy
        )
        keys = ["image", "label"] + ([self.anatomy_key] if self.anatomy_key in item else [])
        data = preprocess({k: item[k] for k in keys})
        _, sizes, _ = lesion_components(data["label"])
        extra = (self.anatomy_key,) if has_mask else ()
        crops: dict[str, torch.Tensor | None] = {}
        for k in range(len(sizes)):
            crop = get_crop_transforms(self.img_size, random=False, lesion_index=k, extra_keys=extra)(dict(data))
            mask = crop[self.anatomy_key] if has_mask else None
            crops[crop_fingerprint(crop["image"][None])] = None if mask is None else _plain(mask) > 0.5
        return crops


def _items(datalist: Any) -> list[dict]:
    if isinstance(datalist, (str, os.PathLike)):
        return load_datalist(datalist, "test")
    return list(datalist)


def run_evaluation(
    network: nn.Module,
    ckpt_path: str | os.PathLike | None,
    datalist: Any,
    output_dir: str | os.PathLike,
    anatomy_key: str | None = None,
    anatomy_labels: int | Sequence[int] | None = None,
    anatomy_from_label: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """``scripts.evaluate.run_evaluation``, with the organ mask passed to ``encode`` when ``anatomy_key`` is set."""
    if not anatomy_key:
        return evaluate.run_evaluation(network, ckpt_path, datalist, output_dir, **kwargs)
    if ckpt_path is not None and str(ckpt_path).strip().lower() not in ("", "none", "null"):
        if not os.path.isfile(os.fspath(ckpt_path)):
            raise CheckpointError(f"checkpoint not found: {ckpt_path} (train first or pass --ckpt_path)")
        load_weights(network, ckpt_path)
    else:
        logger.warning("ckpt_path is null: evaluating the network's current weights")
    items = _items(datalist)
    preprocess_args = {k: kwargs[k] for k in ("target_label", "image_channel", "ct_clamp", "spacing") if k in kwargs}
    prompted = AnatomyPromptedNetwork(
        network, items, anatomy_key, anatomy_labels, anatomy_from_label, **preprocess_args
    )
    summary = evaluate.evaluate_dataset(prompted, items, output_dir, **kwargs)
    print(
        f"mean Dice after 5 clicks: {summary['mean_dice@5']:.4f} ({summary['num_lesions']} lesions; "
        f"{prompted.prompted_crops} crops with the anatomy prompt, {prompted.unprompted_crops} without)"
    )
    return summary


__all__ = ["AnatomyPromptedNetwork", "crop_fingerprint", "run_evaluation"]
