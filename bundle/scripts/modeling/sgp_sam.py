"""The composite promptable model: SAM-Med3D backbone (+ optional SGPM and other extensions)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .click_prompt import ClickMapPrompt
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D
from .refine import MaskRefiner
from .sgpm import SelfGatedPromptingModule

BACKBONE_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


class SGPSAM(nn.Module):
    """SAM-Med3D backbone with optional extensions that live outside the backbone's state-dict prefixes.

    Backbone children (``image_encoder``, ``prompt_encoder``, ``mask_decoder``) carry exactly SAM-Med3D's keys;
    ``sgpm`` (and any extension registered in ``extensions``) carries the rest, so a SAM-Med3D checkpoint loads
    strictly into the backbone.

    Use ``encode`` once per image crop and ``decode`` once per click round; ``forward`` chains both.
    ``full_res_logits`` turns a round's low-res logits into crop-resolution logits: trilinear upsampling, then the
    optional high-resolution ``refiner`` (which needs ``refine_features`` of the crop, computed once like ``encode``).
    With ``multi_click`` the click loops feed ``decode`` every click so far instead of the new one. With
    ``click_consistent`` they (``scripts.training.click_rounds``, ``scripts.interactive``) make each round's
    mask agree with the clicks before it is shown, scored or fed back.
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT3D,
        prompt_encoder: PromptEncoder3D,
        mask_decoder: MaskDecoder3D,
        sgpm: SelfGatedPromptingModule | None = None,
        click_map: ClickMapPrompt | None = None,
        refiner: MaskRefiner | None = None,
        click_consistent: bool = False,
        multi_click: bool = False,
    ) -> None:
        super().__init__()
        # The decoder gets every click so far, not only the new one (SAM-Med3D's ``--multi_click``); a flag.
        self.multi_click = bool(multi_click)
        # Masks agree with the clicks (``scripts.clicks.click_consistent_logits``); a flag, not a weight.
        self.click_consistent = bool(click_consistent)
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.sgpm = sgpm
        self.click_map = click_map
        self.refiner = refiner
        # Other parameter-efficient extensions (adapters, prompt branches) register themselves here.
        self.extensions = nn.ModuleDict()

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    @property
    def low_res_size(self) -> tuple[int, int, int]:
        return self.prompt_encoder.mask_input_size

    def backbone_state_keys(self) -> list[str]:
        """State-dict keys that a SAM-Med3D checkpoint must provide."""
        return [k for k in self.state_dict() if k.startswith(BACKBONE_PREFIXES)]

    def encode(self, images: torch.Tensor, **extension_inputs) -> torch.Tensor:
        """images (B, 1, S, S, S) normalised crops -> image embeddings (B, C, S/p, S/p, S/p).

        Everything image-dependent (the ViT, SGPM, extensions) runs here, so ``decode`` is cheap.
        """
        hooks = [ext.make_block_hook(**extension_inputs) for ext in self.extensions.values()]
        if self.sgpm is not None:
            hooks.append(self.sgpm.make_block_hook())
        if not hooks:
            return self.image_encoder(images)

        def block_hook(index: int, x: torch.Tensor) -> torch.Tensor:
            for hook in hooks:
                x = hook(index, x)
            return x

        return self.image_encoder(images, block_hook)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder on cached embeddings.

        Args:
            image_embeddings: (B or 1, C, X, Y, Z) from ``encode``.
            points: (B, N, 3) voxel indices in the input crop, same axis order as the image tensor; None = no click.
            labels: (B, N) 1 foreground, 0 background, -1 padding.
            mask_input: (B, 1, 4X, 4Y, 4Z) previous low-res logits, or None.

        Returns:
            low-res logits (B, 1 or 3, 4X, 4Y, 4Z), predicted IoU (B, 1 or 3).
        """
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be given together")
        prompt = (points, labels) if points is not None else None
        sparse, dense = self.prompt_encoder(prompt, mask_input, batch_size=image_embeddings.shape[0])
        if self.click_map is not None and points is not None:
            dense = dense + self.click_map(points.to(dense.device), labels.to(dense.device))
        return self.mask_decoder(
            image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=multimask_output
        )

    def forward(
        self,
        images: torch.Tensor,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> torch.Tensor:
        """images (B, 1, S, S, S) -> low-res logits (B, 1, S/4... ) — ``decode(encode(images), ...)[0]``."""
        return self.decode(self.encode(images), points, labels, mask_input, multimask_output)[0]

    def upscale_logits(self, low_res_logits: torch.Tensor, size: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Trilinear (align_corners=False) upsampling of low-res logits to the input crop size."""
        size = size or (self.img_size,) * 3
        return F.interpolate(low_res_logits, size=size, mode="trilinear", align_corners=False)

    def refine_features(self, images: torch.Tensor):
        """Refiner image features of the crop (once per crop, like ``encode``); None without a refiner."""
        return None if self.refiner is None else self.refiner.image_features(images)

    def full_res_logits(
        self,
        low_res_logits: torch.Tensor,
        size: tuple[int, int, int] | None = None,
        features=None,
        prev_logits: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Crop-resolution logits (B, 1, S, S, S) of one round.

        Args:
            low_res_logits: the round's ``decode`` output.
            features: ``refine_features(images)``; required when the model has a refiner.
            prev_logits: the previous round's ``full_res_logits`` (None in round one).
            points, labels: every click so far (the decoder gets only the new one); None: no click yet.
        """
        logits = self.upscale_logits(low_res_logits, size)
        if self.refiner is None:
            return logits
        if features is None:
            raise ValueError("this model has a high-resolution refiner: pass features=model.refine_features(images)")
        return self.refiner(features, logits, prev_logits, points, labels)
