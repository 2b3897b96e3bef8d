"""Small building blocks shared by the encoder, prompt encoder and decoder."""

from __future__ import annotations

import torch
from torch import nn


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state-dict keys) that runs single-image CPU inference through oneDNN.

    PyTorch sends a batch-1 float32 3D convolution with a 3^3 kernel and few channels on small volumes to its
    unblocked fallback kernel (a size heuristic written for 2D), which on a 2-core CPU is 5-15x slower than
    oneDNN for the refiner's 16-channel 32^3 maps (benchmarks/bench_model.py). The result equals the default path
    up to float rounding. Training batches and GPUs take the default path; ``Conv3d.single_image_onednn = False``
    turns the route off (the benchmark compares both).
    """

    single_image_onednn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            not self.single_image_onednn
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or x.shape[0] != 1
            or torch.is_grad_enabled()
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
            or not torch.backends.mkldnn.is_available()
        ):
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        weight = self.weight.contiguous(memory_format=torch.channels_last_3d)
        return torch.mkldnn_convolution(x, weight, self.bias, self.padding, self.stride, self.dilation, self.groups)


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of a channel-first volume (B, C, X, Y, Z)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


class MLPBlock(nn.Module):
    """Two-layer transformer MLP (``lin1`` -> act -> ``lin2``)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (keys ``layers.0`` ... ``layers.{n-1}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def downscale_by_4(in_chans: int, out_chans: int) -> list[nn.Module]:
    """Two stride-2 convolutions (LayerNorm3d + GELU after each): a low-res map (4X, 4Y, 4Z) -> the token grid.

    SAM-Med3D's mask-prompt layout (``mask_downscaling.0/.1/.3/.4``); returned as a list so callers keep those
    indices inside their own ``nn.Sequential``.
    """
    return [
        nn.Conv3d(in_chans, out_chans // 4, kernel_size=2, stride=2),
        LayerNorm3d(out_chans // 4),
        nn.GELU(),
        nn.Conv3d(out_chans // 4, out_chans, kernel_size=2, stride=2),
        LayerNorm3d(out_chans),
        nn.GELU(),
    ]
