"""SAM-Med3D-compatible 3D ViT image encoder (state-dict keys ``image_encoder.*`` of ``sam_med3d_turbo.pth``)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .attention import Attention3D
from .common import LayerNorm3d, MLPBlock

# (block_index, tokens (B, D, H, W, C)) -> tokens; lets extensions (SGPM, adapters) act between blocks.
BlockHook = Callable[[int, torch.Tensor], torch.Tensor]


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches: (B, C_in, X, Y, Z) -> tokens (B, X/p, Y/p, Z/p, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


class Block3D(nn.Module):
    """Pre-norm transformer block; ``window_size`` > 0 makes the attention a padded single window."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, grid_size: int, window_size: int, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        rel_pos_size = window_size if window_size > 0 else grid_size
        self.attn = Attention3D(dim, num_heads, rel_pos_size=rel_pos_size, window_size=window_size, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size
        # Optional token-grid adapters (B, D, H, W, C) -> (B, D, H, W, C) applied to the residual stream before
        # the attention and MLP branches; set by parameter-efficient extensions (MA-SAM), owned elsewhere.
        self.pre_attn_adapter: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.pre_mlp_adapter: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_attn_adapter is not None:
            x = self.pre_attn_adapter(x)
        x = x + self.attn(self.norm1(x))
        if self.pre_mlp_adapter is not None:
            x = self.pre_mlp_adapter(x)
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT3D(nn.Module):
    """3D ViT with absolute + decomposed relative position embeddings and a conv neck.

    Input (B, in_chans, S, S, S) with S = img_size; output embedding (B, out_chans, S/p, S/p, S/p).
    """

    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.grid_size = grid
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block3D(
                embed_dim,
                num_heads,
                mlp_ratio,
                grid_size=grid,
                window_size=0 if index in global_attn_indexes else window_size,
            )
            for index in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def set_attention_impl(self, impl: str) -> None:
        """Select "fast" (default, exact) or "naive" (literal padded window) attention in windowed blocks."""
        if impl not in ("fast", "naive"):
            raise ValueError(f"attention impl must be 'fast' or 'naive', got {impl!r}")
        for block in self.blocks:
            block.attn.impl = impl

    def forward(self, x: torch.Tensor, block_hook: BlockHook | None = None) -> torch.Tensor:
        """x: (B, in_chans, S, S, S) -> (B, out_chans, S/p, S/p, S/p). ``block_hook(i, tokens)`` runs after the embedding (i = -1) and after every block i."""
        x = self.patch_embed(x)
        x = x + self.pos_embed
        if block_hook is not None:
            x = block_hook(-1, x)  # index -1: after the patch + position embedding (input-side extensions)
        for index, block in enumerate(self.blocks):
            x = block(x)
            if block_hook is not None:
                x = block_hook(index, x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
