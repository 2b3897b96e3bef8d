"""SAM-Med3D-compatible mask decoder: image embedding + prompt embeddings -> low-res mask logits + IoU."""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm3d
from .transformer import TwoWayTransformer


class MaskDecoder3D(nn.Module):
    """Predicts ``num_multimask_outputs + 1`` masks at 4x the embedding resolution and an IoU per mask."""

    def __init__(
        self,
        transformer_dim: int = 384,
        transformer_depth: int = 2,
        transformer_heads: int = 8,
        transformer_mlp_dim: int = 2048,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(transformer_depth, transformer_dim, transformer_heads, transformer_mlp_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embeddings: (B or 1, C, X, Y, Z); a single embedding is shared by all B prompts.
            image_pe: (1, C, X, Y, Z).
            sparse_prompt_embeddings: (B, N, C).
            dense_prompt_embeddings: (B, C, X, Y, Z).

        Returns:
            masks (B, 1 or 3, 4X, 4Y, 4Z) logits, iou_pred (B, 1 or 3).
        """
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings
        if src.shape[0] != batch:
            src = torch.repeat_interleave(src, batch, dim=0)
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, batch, dim=0) if image_pe.shape[0] != batch else image_pe
        b, c, x, y, z = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, x, y, z))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, x, y, z = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, x * y * z)).view(b, -1, x, y, z)
        iou_pred = self.iou_prediction_head(iou_token_out)
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]
