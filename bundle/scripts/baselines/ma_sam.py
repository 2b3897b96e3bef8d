"""MA-SAM-style parameter-efficient adaptation (Chen et al., MedIA 2024) on the SAM-Med3D encoder.

Two 3D adapters per ViT block (before the attention branch and before the MLP branch) and FacT factor-tuning of
the attention's q and v projections. Every module lives under ``extensions.ma_sam.*``; the encoder blocks only
receive plain callables (``Block3D.pre_attn_adapter`` / ``pre_mlp_adapter``, ``Attention3D.qkv_delta``), so the
backbone keeps exactly SAM-Med3D's state-dict keys and a SAM-Med3D checkpoint still loads strictly.

Both parts are zero-initialised (adapter up-projection, FacT's V), so freshly added they leave the backbone's
outputs unchanged. Faithful parts and adaptations: docs/method.md, "MA-SAM and TAGS options".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

# Token axes are (X, Y, Z) in the RAS order of the input tensor (docs/conventions.md). MA-SAM's depth axis is the
# axis its 2D slices were stacked along: for axially acquired volumes in RAS that is Z, the last token axis.
DEPTH_AXIS = 2
KERNELS = ("depth", "cube", "cube_full")


def adapter_kernel_size(kernel: str | Sequence[int], depth_axis: int = DEPTH_AXIS) -> tuple[int, int, int]:
    """Kernel shape in token-axis order for "depth" (3 along ``depth_axis``), "cube"/"cube_full" (3³) or a tuple."""
    if isinstance(kernel, str):
        if kernel not in KERNELS:
            raise ValueError(f"adapter_kernel must be one of {KERNELS} or a 3-tuple, got {kernel!r}")
        if kernel == "depth":
            size = [1, 1, 1]
            size[depth_axis] = 3
            return tuple(size)  # type: ignore[return-value]
        return (3, 3, 3)
    size = tuple(int(k) for k in kernel)
    if len(size) != 3 or any(k < 1 or k % 2 == 0 for k in size):
        raise ValueError(f"an explicit adapter kernel must be three odd sizes, got {kernel!r}")
    return size  # type: ignore[return-value]


class MA3DAdapter(nn.Module):
    """LayerNorm -> Linear(dim->adapter_dim) -> Conv3d on the token grid -> GELU -> Linear(->dim) -> residual.

    Args:
        dim: token width.
        adapter_dim: bottleneck width (MA-SAM: 384 for ViT-B's 768).
        kernel_size: Conv3d kernel in token-axis order; (1, 1, 3) is MA-SAM's depth-only (3, 1, 1) on RAS tokens.
        depthwise: grouped convolution (one filter per channel); MA-SAM's conv is a full one.

    Both linear maps have no bias, as in MA-SAM's code; the up-projection is zero-initialised, so the adapter starts
    as the identity.
    """

    def __init__(self, dim: int, adapter_dim: int, kernel_size: Sequence[int] = (1, 1, 3), depthwise: bool = False):
        super().__init__()
        kernel_size = tuple(kernel_size)
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, adapter_dim, bias=False)
        self.conv = nn.Conv3d(
            adapter_dim,
            adapter_dim,
            kernel_size=kernel_size,
            padding=tuple(k // 2 for k in kernel_size),
            groups=adapter_dim if depthwise else 1,
        )
        self.act = nn.GELU()
        self.up = nn.Linear(adapter_dim, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, X, Y, Z, C) tokens -> same shape."""
        h = self.down(self.norm(x)).permute(0, 4, 1, 2, 3)  # (B, adapter_dim, X, Y, Z)
        h = self.act(self.conv(h)).permute(0, 2, 3, 4, 1)
        return x + self.up(h)


class FacTCore(nn.Module):
    """Per-block r×r cores of FacT for q and v."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.q = nn.Linear(rank, rank, bias=False)
        self.v = nn.Linear(rank, rank, bias=False)


class FacT(nn.Module):
    """FacT-TT factor-tuning of q and v: delta_q = V(drop(Cq_i(U x))) * s, delta_v likewise with Cv_i.

    U (dim->r) and V (r->dim) are shared across blocks; V is zero-initialised, so every delta starts at zero. All
    maps are linear without bias, so a zero token (SAM-Med3D's padded-window keys/values) gets a zero delta.
    """

    def __init__(self, dim: int, depth: int, rank: int = 32, dropout: float = 0.1, scale: float = 1.0) -> None:
        super().__init__()
        self.dim = dim
        self.scale = scale
        self.u = nn.Linear(dim, rank, bias=False)
        self.v = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.v.weight)
        self.cores = nn.ModuleList(FacTCore(rank) for _ in range(depth))
        self.dropout = nn.Dropout(dropout)

    def qkv_delta(self, block_index: int, x: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """x (..., dim), qkv (..., 3·dim) -> qkv with the q and v thirds shifted by their FacT deltas."""
        core = self.cores[block_index]
        u = self.u(x)
        dq = self.v(self.dropout(core.q(u))) * self.scale
        dv = self.v(self.dropout(core.v(u))) * self.scale
        return qkv + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)


class _BlockQKVDelta:
    """Plain (non-Module) callable bound to one block index, so the attention layer registers nothing new."""

    def __init__(self, fact: FacT, block_index: int) -> None:
        self.fact = fact
        self.block_index = block_index

    def __call__(self, x: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        return self.fact.qkv_delta(self.block_index, x, qkv)


class MASAMExtension(nn.Module):
    """All MA-SAM parts for one encoder; register as ``model.extensions["ma_sam"]`` (see ``add_ma_sam``).

    Args:
        encoder: the ``ImageEncoderViT3D`` to adapt (not stored: only callables are installed on its blocks).
        adapter_dim: adapter bottleneck width (None: dim // 2, i.e. MA-SAM's 384 at ViT-B width); 0 = no adapters.
        adapter_kernel: "depth" (MA-SAM, 3 along the slice axis), "cube" (depthwise 3³, our 3D option),
            "cube_full" (full 3³ conv; 9× the conv parameters of "depth") or an explicit kernel in token-axis order.
        fact_rank: FacT rank r (MA-SAM: 32); 0 = no FacT.
        fact_dropout, fact_scale: FacT dropout (0.1) and scale (1).
    """

    def __init__(
        self,
        encoder: nn.Module,
        adapter_dim: int | None = None,
        adapter_kernel: str | Sequence[int] = "depth",
        fact_rank: int = 32,
        fact_dropout: float = 0.1,
        fact_scale: float = 1.0,
    ) -> None:
        super().__init__()
        blocks = encoder.blocks
        dim = blocks[0].norm1.normalized_shape[0]
        adapter_dim = dim // 2 if adapter_dim is None else int(adapter_dim)
        self.kernel_size = adapter_kernel_size(adapter_kernel)
        depthwise = adapter_kernel == "cube"
        self.attn_adapters = nn.ModuleList()
        self.mlp_adapters = nn.ModuleList()
        if adapter_dim > 0:
            for _ in blocks:
                self.attn_adapters.append(MA3DAdapter(dim, adapter_dim, self.kernel_size, depthwise))
                self.mlp_adapters.append(MA3DAdapter(dim, adapter_dim, self.kernel_size, depthwise))
        self.fact = FacT(dim, len(blocks), fact_rank, fact_dropout, fact_scale) if fact_rank > 0 else None
        self.attach(encoder)

    def attach(self, encoder: nn.Module) -> None:
        """Install the adapters and FacT deltas on ``encoder``'s blocks without registering them there.

        Bound methods (not closures), so ``copy.deepcopy`` of the whole model rebinds them to the copied modules.
        """
        for index, block in enumerate(encoder.blocks):
            if len(self.attn_adapters):
                object.__setattr__(block, "pre_attn_adapter", self.attn_adapters[index].__call__)
                object.__setattr__(block, "pre_mlp_adapter", self.mlp_adapters[index].__call__)
            if self.fact is not None:
                object.__setattr__(block.attn, "qkv_delta", _BlockQKVDelta(self.fact, index).__call__)

    def make_block_hook(self, **_extension_inputs):
        """Adapters act inside the blocks; nothing to do between them."""
        return lambda index, x: x


def add_ma_sam(model: nn.Module, **kwargs) -> MASAMExtension:
    """Create the MA-SAM extension for ``model.image_encoder`` and register it as ``model.extensions["ma_sam"]``."""
    extension = MASAMExtension(model.image_encoder, **kwargs)
    model.extensions["ma_sam"] = extension
    return extension


@dataclass(frozen=True)
class MASAMConfig:
    """MA-SAM as a network extension: ``build_sgp_sam(..., extensions=[MASAMConfig()])`` (see ``MASAMExtension``).

    Args:
        adapter_dim: adapter bottleneck (None: embed_dim // 2 = MA-SAM's 384 at 768; 0: no adapters).
        adapter_kernel: "depth" (MA-SAM, 3 along the slice axis Z), "cube" (depthwise 3^3), "cube_full" (full 3^3)
            or an explicit kernel in token-axis order (X, Y, Z).
        fact_rank: FacT rank on q and v (MA-SAM: 32; 0: no FacT).
    """

    adapter_dim: int | None = None
    adapter_kernel: str | Sequence[int] = "depth"
    fact_rank: int = 32

    def __call__(self, model: nn.Module) -> MASAMExtension:
        return add_ma_sam(
            model, adapter_dim=self.adapter_dim, adapter_kernel=self.adapter_kernel, fact_rank=self.fact_rank
        )
