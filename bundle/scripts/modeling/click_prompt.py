"""Dense click-map prompt: the clicks also enter the decoder as a spatial map, not only as point tokens.

SAM's point tokens reach the image grid only through attention between the point's Fourier encoding and the dense
positional encoding. SAM-Med3D learned that matching during long pretraining (with its axis-swapped dense
encoding, see ``prompt_encoder.py``). A network trained from scratch for minutes never learns it: its masks
ignore where the click is. This module rasterises the clicks as Gaussian heat maps (one channel for positive,
one for negative clicks) on the low-res mask grid. It then downsamples them the way ``mask_downscaling`` does the
mask prompt, and adds the result to the dense prompt embedding. That gives the decoder a direct spatial path, as
in DeepGrow / DeepEdit click channels. The last projection is zero-initialised, so a fresh module changes no
output and a SAM-Med3D checkpoint behaves exactly as released.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import downscale_by_4

Triple = tuple[int, int, int]


class ClickMapPrompt(nn.Module):
    """Clicks -> (B, C, X, Y, Z) dense embedding added to the mask prompt's.

    Args:
        embed_dim: prompt embedding width (the prompt encoder's ``embed_dim``).
        image_embedding_size: token grid (X, Y, Z).
        input_image_size: crop size in voxels, the frame of the click coordinates.
        hidden_chans: channels after downsampling.
        sigma: Gaussian width in low-res voxels (low-res grid = 4 x the token grid).
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Triple,
        input_image_size: Triple,
        hidden_chans: int = 16,
        sigma: float = 1.0,
    ) -> None:
        super().__init__()
        self.map_size = tuple(4 * s for s in image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.sigma = float(sigma)
        self.downscaling = nn.Sequential(*downscale_by_4(2, hidden_chans))
        self.out_proj = nn.Conv3d(hidden_chans, embed_dim, kernel_size=1)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def heat_maps(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """points (B, N, 3) crop voxel indices, labels (B, N) (1 / 0 / -1 padding) -> (B, 2, *map_size) in [0, 1]."""
        return click_heat_maps(points, labels, self.map_size, self.input_image_size, self.sigma)

    def forward(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.downscaling(self.heat_maps(points, labels)))


def click_heat_maps(
    points: torch.Tensor, labels: torch.Tensor, map_size: Triple, input_image_size: Triple, sigma: float
) -> torch.Tensor:
    """Gaussian click maps: points (B, N, 3) crop voxel indices, labels (B, N) -> (B, 2, *map_size) in [0, 1].

    Channel 0 holds the positive clicks (label 1), channel 1 the negative ones (label 0); padding (-1) is dropped.
    ``sigma`` is in ``map_size`` voxels; a click's maximum over overlapping clicks of its kind is kept.
    """
    scale = points.new_tensor([m / s for m, s in zip(map_size, input_image_size)], dtype=torch.float32)
    centres = (points.float() + 0.5) * scale - 0.5  # voxel centre -> map grid coordinates
    axes = [torch.arange(n, device=points.device, dtype=torch.float32) for n in map_size]
    # separable Gaussian per click: (B, N, X), (B, N, Y), (B, N, Z)
    g = [torch.exp(-((ax - centres[..., i, None]) ** 2) / (2 * sigma**2)) for i, ax in enumerate(axes)]
    per_click = g[0][..., :, None, None] * g[1][..., None, :, None] * g[2][..., None, None, :]
    maps = [(per_click * (labels == value)[..., None, None, None]).amax(1) for value in (1, 0)]
    return torch.stack(maps, dim=1)
