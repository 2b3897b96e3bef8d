"""SAM-Med3D-compatible prompt encoder: clicks and a low-res mask -> sparse and dense embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import downscale_by_4

Triple = tuple[int, int, int]


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier features of normalised 3D coordinates; ``num_pos_feats`` * 3 output channels.

    The projection matrix is a buffer drawn at construction, so released weights must provide it.
    """

    def __init__(self, num_pos_feats: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((3, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """coords (..., 3) in [0, 1] -> (..., 3 * num_pos_feats) as [sin, cos, sin] (SAM-Med3D's layout)."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def forward(self, size: Triple) -> torch.Tensor:
        """Dense encoding of a (X, Y, Z) grid -> (C, X, Y, Z).

        SAM-Med3D stacks the grid coordinates as [axis1, axis0, axis2] here while clicks are read as
        [axis0, axis1, axis2]; the released weights were trained with this swap, so it is kept on purpose.
        """
        ones = torch.ones(size, device=self.positional_encoding_gaussian_matrix.device)
        axis0 = (ones.cumsum(dim=0) - 0.5) / size[0]
        axis1 = (ones.cumsum(dim=1) - 0.5) / size[1]
        axis2 = (ones.cumsum(dim=2) - 0.5) / size[2]
        return self._encode(torch.stack([axis1, axis0, axis2], dim=-1)).permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Triple) -> torch.Tensor:
        """coords (B, N, 3) in voxel units of the input image (already +0.5) -> (B, N, C)."""
        scale = coords.new_tensor(image_size, dtype=torch.float32)
        return self._encode(coords.float() / scale)


class PromptEncoder3D(nn.Module):
    """Encodes point prompts (sparse) and a low-res mask prompt (dense).

    No box embeddings exist in SAM-Med3D; with points, a padding point (label -1) is always appended.
    """

    def __init__(self, embed_dim: int, image_embedding_size: Triple, input_image_size: Triple, mask_in_chans: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        # Index 0 = negative (background) click, 1 = positive (foreground) click.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = tuple(4 * s for s in image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            *downscale_by_4(1, mask_in_chans), nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1)
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, (1, C, X, Y, Z)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """points (B, N, 3) voxel indices, labels (B, N) -> (B, N + 1, C) including the padding point."""
        points = points.float() + 0.5  # voxel centre
        pad_point = points.new_zeros((points.shape[0], 1, 3))
        pad_label = -labels.new_ones((labels.shape[0], 1))
        points = torch.cat([points, pad_point], dim=1)
        labels = torch.cat([labels, pad_label], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight, embedding)
        embedding = embedding + (labels == 0) * self.point_embeddings[0].weight
        embedding = embedding + (labels == 1) * self.point_embeddings[1].weight
        return embedding

    def forward(
        self, points: tuple[torch.Tensor, torch.Tensor] | None, masks: torch.Tensor | None, batch_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            points: (coords (B, N, 3), labels (B, N)) or None for a mask-only round.
            masks: low-res mask logits (B, 1, 4X, 4Y, 4Z) or None.
            batch_size: B when neither prompt is given.

        Returns:
            sparse (B, N + 1, C) (or (B, 0, C) without points), dense (B, C, X, Y, Z).
        """
        if points is not None:
            batch_size = points[0].shape[0]
        elif masks is not None:
            batch_size = masks.shape[0]
        device = self.no_mask_embed.weight.device
        if points is not None:
            sparse = self._embed_points(points[0].to(device), points[1].to(device))
        else:
            sparse = torch.empty((batch_size, 0, self.embed_dim), device=device)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(
                batch_size, -1, *self.image_embedding_size
            )
        return sparse, dense
