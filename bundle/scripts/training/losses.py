"""Segmentation losses: SGP-SAM's Zoom Loss and the Dice+CE baseline.

All losses take logits ``(B, 1, X, Y, Z)`` (sigmoid, one binary channel) and binary targets of the same shape.
Whether both are at the decoder's low resolution or upsampled to the crop is the trainer's decision.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss, FocalLoss
from torch import nn

__all__ = ["ZoomLoss", "balanced_focal", "dilate", "build_loss", "LOSSES", "BACKGROUND_DIVISORS"]

BACKGROUND_DIVISORS = ("rim", "lesion", "region")


def dilate(mask: torch.Tensor, margin: int) -> torch.Tensor:
    """Binary dilation by a cube of side ``2 * margin + 1`` (Chebyshev distance ``<= margin``).

    Hand-written because MONAI's ``dilate`` convolves with a dense k³ kernel; a cube is separable, so three 1-D
    max-pools give the same result at a fraction of the cost on 128³ crops.

    Args:
        mask: ``(B, C, X, Y, Z)`` bool or {0, 1} tensor.
        margin: dilation radius in voxels, ``>= 0``.

    Returns:
        ``(B, C, X, Y, Z)`` bool tensor.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    out = mask.float()
    if margin == 0:
        return out > 0
    k = 2 * margin + 1
    for kernel, pad in (((k, 1, 1), (margin, 0, 0)), ((1, k, 1), (0, margin, 0)), ((1, 1, k), (0, 0, margin))):
        # max_pool pads with -inf, i.e. voxels outside the crop never switch anything on
        out = F.max_pool3d(out, kernel_size=kernel, stride=1, padding=pad)
    return out > 0


def balanced_focal(
    focal: torch.Tensor,
    target: torch.Tensor,
    region: torch.Tensor | None = None,
    alpha_fg: float = 0.5,
    bg_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Voxel-balanced mean of per-voxel focal values: foreground and background are averaged separately.

    ``F = (a·[n_fg>0]·mean_fg + (1-a)·[n_bg>0]·mean_bg) / (a·[n_fg>0] + (1-a)·[n_bg>0])`` per (sample, channel),
    with the means taken over the voxels of ``region``; 0 where the region holds no voxel (or the only non-empty
    class has weight 0). Hand-written because MONAI's focal ``alpha`` weights single voxels, so a 10-voxel lesion
    is still outvoted by millions of background voxels; here each class mean has a fixed share.

    Args:
        focal: ``(B, C, *spatial)`` per-voxel focal loss.
        target: ``(B, C, *spatial)`` binary target.
        region: optional ``(B, C, *spatial)`` bool mask restricting both means; whole crop if None.
        alpha_fg: weight of the foreground mean, background gets ``1 - alpha_fg``.
        bg_count: optional ``(B, C)`` divisor of the background sum in place of the region's background voxel count
            (where > 0); the Zoom Loss passes the lesion rim's size so false positives do not dilute themselves.

    Returns:
        ``(B, C)`` balanced focal value.
    """
    fg = target.flatten(2) > 0
    bg = ~fg
    if region is not None:
        keep = region.flatten(2)
        fg, bg = fg & keep, bg & keep
    values = focal.flatten(2)
    n_fg, n_bg = fg.sum(-1), bg.sum(-1)
    # clamp avoids 0/0; an empty class then has mean 0 and its weight is switched off below
    mean_fg = (values * fg).sum(-1) / n_fg.clamp_min(1)
    if bg_count is not None:
        n_bg_norm = torch.where(bg_count > 0, bg_count.to(n_bg.dtype), n_bg)
    else:
        n_bg_norm = n_bg
    mean_bg = (values * bg).sum(-1) / n_bg_norm.clamp_min(1)
    w_fg = alpha_fg * (n_fg > 0).to(values.dtype)
    w_bg = (1.0 - alpha_fg) * (n_bg > 0).to(values.dtype)
    denom = w_fg + w_bg
    return torch.where(denom > 0, (w_fg * mean_fg + w_bg * mean_bg) / denom.clamp_min(1e-12), torch.zeros_like(denom))


class ZoomLoss(nn.Module):
    r"""Zoom Loss: Dice plus a voxel-balanced focal term, evaluated on the whole crop and again in a zoom region.

    Inputs are logits :math:`z` and a binary target :math:`y` of shape ``(B, 1, X, Y, Z)``;
    :math:`p = \sigma(z)`, :math:`p_t = p` where :math:`y=1` and :math:`1-p` where :math:`y=0`.
    Per sample :math:`b`:

    * ``FL_v = -(1 - p_t)^γ · log(p_t)`` per voxel (MONAI ``FocalLoss``, sigmoid, no alpha).
    * Balanced focal over a voxel set :math:`R`, with :math:`A = R ∩ \{y=1\}`, :math:`B = R ∩ \{y=0\}`:
      ``F(R) = (α·[|A|>0]·mean_A FL + (1-α)·[|B|>0]·mean_B FL) / (α·[|A|>0] + (1-α)·[|B|>0])``
      (0 if :math:`R` is empty). With α = 0.5 a 10-voxel lesion weighs as much as two million background voxels;
      an empty foreground leaves the background mean alone (no NaN).
    * Zoom region ``Zr = dilate_m(y ∪ ŷ)`` with ``ŷ = [p > 0.5]`` (detached) and ``dilate_m`` a cube of side
      ``2m+1`` (``m = zoom_margin``). Dilating the target puts the lesion rim in focus; dilating the prediction
      as well keeps false-positive blobs (and their rims) in focus even when they are away from the lesion or the
      crop has no lesion. ``zoom_on_prediction=False`` uses the target alone (ablation).
    * In ``F_b(Zr)`` the background sum is divided by the size of the lesion's own rim,
      ``|dilate_m(y) \ y|``, not by the background count of ``Zr`` (``background_divisor="rim"``; the region count
      where the crop has no lesion). Dividing by ``Zr``'s count would let a false-positive blob dilute itself: the blob
      enlarges the region it is averaged over, so its mean saturates and the loss hardly cares how big it is. A
      tiny lesion then gets a blob of the size that suits large lesions. With the rim as divisor, false-positive
      voxels cost in proportion to the lesion's scale: a 4-voxel lesion's blob of 4000 voxels costs about ten
      times a missed lesion, while the same blob next to a 7000-voxel lesion is a small boundary error.
    * ``background_divisor="lesion"`` divides that sum by ``|y|`` instead, so the false-positive / miss price ratio
      no longer depends on the lesion's size (a small lesion's rim is many times its volume).
    * ``L_b = w_d·Dice_b + λ·(F_b(Ω) + w_z·F_b(Zr))``, ``Ω`` = whole crop, ``Dice_b`` = MONAI soft Dice
      (sigmoid, per sample, smooth 1e-5).

    Since ``Zr ⊇ y``, the zoom term adds ``α·w_z`` to the lesion's weight and spends ``(1-α)·w_z`` on the
    background voxels within ``m`` of the lesion/prediction only, i.e. on the boundary errors that decide a small
    lesion's Dice. The paper does not publish its weights; the defaults below are ours.

    Args:
        lambda_focal: λ, weight of the focal terms.
        gamma: γ, focusing exponent.
        alpha_fg: α, foreground share of the balanced focal mean.
        zoom_margin: m, dilation radius of the zoom region in voxels of the loss's input grid.
        zoom_weight: w_z, weight of the zoom-region focal term (0 disables it).
        dice_weight: w_d, weight of the Dice term.
        zoom_on_prediction: also dilate the predicted foreground into the zoom region.
        background_divisor: what divides the zoom term's background sum: "rim" (the lesion rim's size), "lesion"
            (the lesion's voxel count: a false positive then costs the same fraction of a miss whatever the lesion's
            size; docs/method.md, "Lesion divisor") or "region" (the zoom region's background count, the earliest
            form, for ablation). A crop without a lesion always uses the region's count.
        reduction: "mean" | "sum" over the batch, or "none" for a ``(B,)`` tensor.
        smooth: Dice numerator/denominator smoothing.
    """

    def __init__(
        self,
        lambda_focal: float = 1.0,
        gamma: float = 2.0,
        alpha_fg: float = 0.5,
        zoom_margin: int = 3,
        zoom_weight: float = 1.0,
        dice_weight: float = 1.0,
        zoom_on_prediction: bool = True,
        background_divisor: str = "rim",
        reduction: str = "mean",
        smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        if background_divisor not in BACKGROUND_DIVISORS:
            raise ValueError(f"background_divisor must be one of {BACKGROUND_DIVISORS}, got {background_divisor!r}")
        if not 0.0 <= alpha_fg <= 1.0:
            raise ValueError(f"alpha_fg must be in [0, 1], got {alpha_fg}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.lambda_focal = float(lambda_focal)
        self.gamma = float(gamma)
        self.alpha_fg = float(alpha_fg)
        self.zoom_margin = int(zoom_margin)
        self.zoom_weight = float(zoom_weight)
        self.dice_weight = float(dice_weight)
        self.zoom_on_prediction = bool(zoom_on_prediction)
        self.background_divisor = background_divisor
        self.reduction = reduction
        self.dice = DiceLoss(sigmoid=True, batch=False, reduction="none", smooth_nr=smooth, smooth_dr=smooth)
        self.focal = FocalLoss(gamma=self.gamma, use_softmax=False, reduction="none")
        # detached per-term batch means of the last call, for logging
        self.last_terms: dict[str, float] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits: ``(B, 1, X, Y, Z)`` raw network outputs.
            target: ``(B, 1, X, Y, Z)`` binary target (bool, int or float).

        Returns:
            scalar for reduction "mean"/"sum", ``(B,)`` for "none".
        """
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have equal shapes")
        if logits.ndim != 5:
            raise ValueError(f"expected (B, C, X, Y, Z) inputs, got {tuple(logits.shape)}")
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # under AMP, half precision would overflow exp/log in the focal term
        target = (target > 0).to(logits.dtype)

        dice = self.dice(logits, target).flatten(1).mean(1)  # (B,)
        fl = self.focal(logits, target)  # (B, C, X, Y, Z)
        focal_all = balanced_focal(fl, target, None, self.alpha_fg).mean(1)  # (B,)
        loss = self.dice_weight * dice + self.lambda_focal * focal_all
        focal_zoom = torch.zeros_like(focal_all)
        if self.zoom_weight != 0.0:
            lesion = target > 0
            seed = lesion | (logits.detach() > 0) if self.zoom_on_prediction else lesion  # sigmoid(z) > 0.5
            region = dilate(seed, self.zoom_margin)
            divisor = None  # "region": the zoom region's own background count
            if self.background_divisor == "rim":
                divisor = (dilate(lesion, self.zoom_margin) & ~lesion).flatten(2).sum(-1)
            elif self.background_divisor == "lesion":
                divisor = lesion.flatten(2).sum(-1)
            focal_zoom = balanced_focal(fl, target, region, self.alpha_fg, divisor).mean(1)
            loss = loss + self.lambda_focal * self.zoom_weight * focal_zoom

        self.last_terms = {
            "dice": float(dice.detach().mean()),
            "focal": float(focal_all.detach().mean()),
            "zoom": float(focal_zoom.detach().mean()),
        }
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


class _DiceCEBinary(DiceCELoss):
    """MONAI ``DiceCELoss(sigmoid=True)`` that accepts bool/int targets (its BCE branch needs float targets)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(input, (target > 0).to(input.dtype))


LOSSES = ("zoom", "dice_ce")


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a loss by config name.

    Args:
        name: "zoom" (:class:`ZoomLoss`) or "dice_ce" (MONAI ``DiceCELoss(sigmoid=True)``, the upstream
            SAM-Med3D objective and our plain fine-tuning baseline).
        **kwargs: forwarded to the loss constructor.

    Returns:
        the loss module, called as ``loss(logits, target)`` on ``(B, 1, X, Y, Z)`` tensors.
    """
    key = name.lower().replace("-", "_")
    if key == "zoom":
        return ZoomLoss(**kwargs)
    if key in ("dice_ce", "dicece"):
        kwargs.setdefault("sigmoid", True)
        return _DiceCEBinary(**kwargs)
    raise ValueError(f"unknown loss {name!r}, expected one of {LOSSES}")
