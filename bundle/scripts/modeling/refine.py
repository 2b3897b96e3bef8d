"""High-resolution mask refiner: corrects the upsampled decoder mask on the input grid, where small lesions live.

SAM-Med3D's decoder predicts on a coarser grid: 32^3 for a 128^3 crop (6 mm voxels at 1.5 mm spacing), and 32^3
for the tiny preset's 64^3 crop (3 mm voxels). A 3-10 mm lesion is one to three low-res voxels, so its outline is
whatever trilinear upsampling makes of them. This small convolutional head sees the image at full resolution, the
upsampled decoder logits, its own previous output (the full-resolution history of the interaction) and every
click so far, and predicts a residual added to the upsampled logits.

It works at half resolution on sub-voxel channels: every 2x2x2 block of the input grid becomes 8 channels of one
voxel (pixel unshuffle, lossless), the convolutions run on that grid, and the output's 8 channels are shuffled
back to full resolution. So it predicts every voxel of the crop at an eighth of the cost of full-resolution
convolutions (CPU convolutions with few channels are memory-bound). The last convolution is zero-initialised:
a fresh refiner returns the upsampled logits unchanged, so a SAM-Med3D checkpoint behaves exactly as released
until the refiner is trained. Our design (docs/method.md); not part of SAM-Med3D or the SGP-SAM paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.utils import pixelshuffle, pixelunshuffle
from torch import nn

from .click_prompt import click_heat_maps
from .common import Conv3d
from .geodesic import click_geodesic_maps

# upsampled decoder probability, previous refined probability, positive and negative click maps, and the image's
# contrast to the tissue under the positive clicks and to the tissue inside the previous mask
PROMPT_CHANS = 6
SUBVOXELS = 8  # 2 x 2 x 2
GEODESIC_SCALES = (4.0, 16.0)  # half-res voxels of homogeneous tissue; an edge of median change adds 10


class MaskRefiner(nn.Module):
    """(image features, upsampled logits, previous logits, clicks) -> refined logits on the input grid.

    Args:
        in_chans: image channels.
        image_chans: image feature channels (computed once per crop by ``image_features``).
        hidden_chans: channels of the per-round convolutions.
        click_sigma: Gaussian width of the click maps in input voxels.
        context: ``"local"`` (about 40 voxels around each voxel) or ``"crop"``: also a branch at an eighth of the
            resolution whose 3^3 convolutions span a 64^3 crop, zero-initialised so a file trained without it loads
            and computes the same (crop sides must be multiples of 8).
        geodesic: also take geodesic distance maps of the clicks (``geodesic.py``) through a zero-initialised
            input, so a file trained without them loads and computes the same.
    """

    def __init__(
        self,
        in_chans: int = 1,
        image_chans: int = 16,
        hidden_chans: int = 16,
        click_sigma: float = 1.5,
        context: str = "local",
        geodesic: bool = False,
    ):
        super().__init__()
        if context not in ("local", "crop"):
            raise ValueError(f"refiner context must be 'local' or 'crop', got {context!r}")
        self.click_sigma = float(click_sigma)
        self.in_chans = int(in_chans)
        self.image_stem = nn.Sequential(
            Conv3d(in_chans * SUBVOXELS, image_chans, kernel_size=3, padding=1),
            nn.GELU(),
            Conv3d(image_chans, image_chans, kernel_size=3, padding=1),
            nn.GELU(),
        )
        h = hidden_chans
        self.prompt_in = nn.Sequential(
            Conv3d(in_chans * SUBVOXELS + image_chans + PROMPT_CHANS * SUBVOXELS, h, kernel_size=1),
            nn.GELU(),
            Conv3d(h, h, kernel_size=3, padding=1),
            nn.GELU(),
        )
        # geodesic maps join the first convolution's output: the same as extra input columns, but a separate
        # module, so files trained without it keep their keys and shapes
        self.geodesic_in = None
        if geodesic:
            self.geodesic_in = Conv3d(2 * len(GEODESIC_SCALES), h, kernel_size=1)
            nn.init.zeros_(self.geodesic_in.weight)
            nn.init.zeros_(self.geodesic_in.bias)
        # context at a quarter resolution: what the lesion around the click looks like (receptive field ~ 40 voxels)
        self.context = nn.Sequential(
            Conv3d(h, 2 * h, kernel_size=2, stride=2),
            nn.GELU(),
            Conv3d(2 * h, 2 * h, kernel_size=3, padding=1),
            nn.GELU(),
            Conv3d(2 * h, 2 * h, kernel_size=3, padding=1),
            nn.GELU(),
            nn.ConvTranspose3d(2 * h, h, kernel_size=2, stride=2),
        )
        # the first mask's size is otherwise a set number of voxels, whatever the lesion (docs/experiments.md, 18)
        self.wide = None if context == "local" else _crop_context(h)
        self.out = nn.Sequential(nn.GELU(), Conv3d(h, SUBVOXELS, kernel_size=3, padding=1))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, S, S, S), S even -> features (B, 8C + F, S/2, S/2, S/2): image sub-voxels, then stem output."""
        if any(n % 2 for n in images.shape[2:]):
            raise ValueError(f"the refiner needs an even crop size, got {tuple(images.shape[2:])}")
        if self.wide is not None and any(n % 8 for n in images.shape[2:]):
            raise ValueError(f"the refiner's crop context needs crop sides that are multiples of 8, got {images.shape}")
        sub = pixelunshuffle(images, 3, 2)
        return torch.cat([sub, self.image_stem(sub)], dim=1)

    @staticmethod
    def intensity_contrast(smooth: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The locally smoothed image minus its ``weights``-weighted mean: the clicked / segmented tissue's contrast.

        smooth (B, 1, S, S, S) (``local_mean`` of the image); weights (B, 1, S, S, S) >= 0 (the positive click map
        or the previous mask). A row without weight gets zeros. The network could learn this comparison itself,
        but only slowly; with it given, "same tissue as under the click" is one convolution away.
        """
        total = weights.flatten(1).sum(1)
        reference = (smooth * weights).flatten(1).sum(1) / total.clamp_min(1e-6)
        return torch.where(total[:, None, None, None, None] > 1e-3, smooth - reference[:, None, None, None, None], 0.0)

    def geodesic_image(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 1, S/2, S/2, S/2) the image the geodesic maps are measured on: the first channel's 2^3 means
        (its sub-voxels in ``features``), smoothed like the contrast channels."""
        return self.local_mean(features[:, :SUBVOXELS].float().mean(1, keepdim=True))

    def geodesic_maps(self, features: torch.Tensor, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, 2 * len(GEODESIC_SCALES), S/2, S/2, S/2) geodesic maps of the clicks (features of batch 1 broadcast
        over the clicks' batch)."""
        return click_geodesic_maps(self.geodesic_image(features), points, labels, GEODESIC_SCALES)

    @staticmethod
    def local_mean(image: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S, S) mean over each voxel's 3^3 neighbourhood inside the crop.

        ``avg_pool3d(kernel_size=3, stride=1, padding=1, count_include_pad=False)`` up to float rounding, computed as
        three 1D means: the 3D box is separable, and PyTorch's CPU pooling kernel is several times slower.
        """
        for dim in (2, 3, 4):
            n = image.shape[dim]
            if n < 2:
                continue
            total = image.clone()
            total.narrow(dim, 1, n - 1).add_(image.narrow(dim, 0, n - 1))
            total.narrow(dim, 0, n - 1).add_(image.narrow(dim, 1, n - 1))
            count = torch.full((n,), 3.0, dtype=image.dtype, device=image.device)
            count[0] = count[-1] = 2.0
            image = total / count.view([n if d == dim else 1 for d in range(image.dim())])
        return image

    def forward(
        self,
        features: torch.Tensor,
        logits: torch.Tensor,
        prev_logits: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Refined logits (B, 1, S, S, S).

        Args:
            features: ``image_features`` of the crop (batch 1 broadcasts over the prompts' batch).
            logits: (B, 1, S, S, S) upsampled decoder logits.
            prev_logits: (B, 1, S, S, S) the previous round's refined logits; None in round one.
            points, labels: every click so far (crop voxel indices; the decoder gets only the new one); None: none.
        """
        batch, size = logits.shape[0], tuple(logits.shape[2:])
        crop = tuple(2 * n for n in features.shape[2:])
        if crop != size:
            raise ValueError(f"refiner features are for a {crop} crop, logits {size}")
        prev = torch.zeros_like(logits) if prev_logits is None else torch.sigmoid(prev_logits.to(logits.dtype))
        if points is None or points.shape[1] == 0:
            clicks = logits.new_zeros((batch, 2, *size))
        else:
            clicks = click_heat_maps(points, labels, size, size, self.click_sigma).to(logits.dtype)
        geodesic = None
        if self.geodesic_in is not None and points is not None and points.shape[1]:
            geodesic = self.geodesic_maps(features, points, labels)  # before the crop is repeated per prompt
        features = features.expand(batch, -1, -1, -1, -1).to(logits.dtype)
        image = pixelshuffle(features[:, : self.in_chans * SUBVOXELS], 3, 2)[:, :1]
        smooth = self.local_mean(image)
        contrast = [self.intensity_contrast(smooth, clicks[:, :1]), self.intensity_contrast(smooth, prev)]
        prompts = pixelunshuffle(torch.cat([torch.sigmoid(logits), prev, clicks, *contrast], dim=1), 3, 2)
        local = self.prompt_in[0](torch.cat([features, prompts], dim=1))
        if geodesic is not None:
            local = local + self.geodesic_in(geodesic.to(local.dtype))
        local = self.prompt_in[1:](local)
        context = self.context(local)
        if self.wide is not None:  # crop sides checked once per crop, in image_features
            context = context + self.wide(local)
        return logits + pixelshuffle(self.out(local + context), 3, 2)


def _crop_context(h: int) -> nn.Sequential:
    """Half resolution -> an eighth -> three 3^3 convolutions (7 voxels = a 64^3 crop) -> back, output zeroed."""
    layers = [Conv3d(h, 2 * h, kernel_size=4, stride=4), nn.GELU()]
    for _ in range(3):
        layers += [Conv3d(2 * h, 2 * h, kernel_size=3, padding=1), nn.GELU()]
    layers.append(nn.ConvTranspose3d(2 * h, h, kernel_size=4, stride=4))
    nn.init.zeros_(layers[-1].weight)
    nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)
