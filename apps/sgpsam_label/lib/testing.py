"""A deterministic stand-in checkpoint for tests and latency benchmarks (no training, < 1 s to build).

``make_cube_checkpoint`` sets the weights of an SGP-SAM network by hand so that its output does not depend on the
image or the prompts and is a cube of positive logits at the CENTRE of the input crop (16^3 voxels for the tiny
preset's 64^3 crop, 32^3 for 128^3): every residual branch (encoder blocks, SGPM fusion, two-way transformer
attention and MLPs) is zeroed so it passes its input through; the position embedding carries the distance ``r`` to
the crop centre (as a ratio that LayerNorm keeps) through the neck; the mask decoder's upscaling and hypernetwork
turn it into ``logit = f(r) - tau``. The engine centres a new lesion's crop on its first click, so the mask is a
cube around the click that stays inside one window: a model that "segments something around a click" for
geometry tests, with exactly the FLOPs of a real network of that preset for timing.
"""

from __future__ import annotations

import math
import os

import torch
from scripts.checkpoint import save_sgp_sam_checkpoint
from scripts.modeling import build_sgp_sam


def _gelu(x: float) -> float:
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


def make_cube_checkpoint(path: str | os.PathLike, preset: str = "tiny", sgpm: bool = True) -> None:
    """SGP-SAM whose mask is the central 2x2x2 tokens' cube of the crop, whatever the image (module docstring)."""
    torch.manual_seed(0)
    net = build_sgp_sam(preset, sgpm=sgpm)
    zeroed = ("out_proj.weight", "out_proj.bias", "attn.proj.weight", "attn.proj.bias", "lin2.weight", "lin2.bias")
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(zeroed):
                p.zero_()  # every residual branch adds 0: blocks/transformer layers pass their input through
        enc = net.image_encoder
        enc.patch_embed.proj.weight.zero_()
        enc.patch_embed.proj.bias.zero_()
        g = enc.pos_embed.shape[1]
        idx = torch.arange(g, dtype=torch.float32) - (g - 1) / 2
        r = torch.sqrt(idx[:, None, None] ** 2 + idx[None, :, None] ** 2 + idx[None, None, :] ** 2)
        pos = torch.zeros_like(enc.pos_embed)
        pos[0, ..., 0], pos[0, ..., 1], pos[0, ..., 2], pos[0, ..., 3] = r, -r, 1.0, -1.0  # LN keeps r as a ratio
        enc.pos_embed.copy_(pos)
        conv1, conv2 = enc.neck[0], enc.neck[2]
        conv1.weight.zero_()
        conv2.weight.zero_()
        for c in range(4):
            conv1.weight[c, c] = 1.0
            conv2.weight[c, c, 1, 1, 1] = 1.0
        pe = net.prompt_encoder
        pe.no_mask_embed.weight.zero_()
        pe.mask_downscaling[-1].weight.zero_()
        pe.mask_downscaling[-1].bias.zero_()
        dec = net.mask_decoder
        up1, up2 = dec.output_upscaling[0], dec.output_upscaling[3]
        for layer in (up1, up2):
            layer.weight.zero_()
            layer.bias.zero_()
        up1.weight[0, 0], up1.weight[0, 1], up1.weight[2, 2], up1.weight[2, 3] = 1.0, -1.0, 1.0, -1.0
        up2.weight[2, 0] = 1.0  # channel 0: decreasing in the distance to the crop centre
        up2.bias[1] = 1.0  # channel 1: constant, the threshold's reference
        # channel 0 after the decoder = gelu(gelu(sqrt(C/2) / sqrt(r^2 + 1))), C = up1's output channels; threshold
        # halfway between the central tokens (r = sqrt(3)/2) and their face neighbours (r = sqrt(11)/2)
        half_c = up1.weight.shape[1] / 2
        level = [_gelu(_gelu(math.sqrt(half_c / (r2 + 1)))) for r2 in (0.75, 2.75)]
        tau = sum(level) / 2
        gelu_1 = _gelu(1.0)
        for mlp in dec.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.zero_()
            mlp.layers[-1].bias[0], mlp.layers[-1].bias[1] = 1.0, -tau / gelu_1
    save_sgp_sam_checkpoint(net, path)
