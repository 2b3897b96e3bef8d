"""Self-Gated Prompting Module (SGPM): conditional multi-scale spatial enhancement of intermediate ViT features.

One ``SGPMStage`` sits after a chosen encoder block. Its multi-channel gating unit reads the block's tokens and
predicts (a) a per-channel gate g in (0, 1)^C and (b) a decision probability p in (0, 1) that the features need
extra multi-scale fusion. Output:

    training / soft:   x + p * g * Fuse(x, earlier features)
    inference / hard:  x                              if p < threshold  (the fusion block is not run)
                       x + p * g * Fuse(x, ...)       otherwise
    gate "open":       x + Fuse(x, ...)               (ablation: always fuse, no gate)

``Fuse`` ends in a zero-initialised projection, so at initialisation every stage is the identity and SGP-SAM
reproduces the loaded SAM-Med3D backbone exactly. Design and reasoning: docs/method.md.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .common import LayerNorm3d

GATE_MODES = ("learned", "open", "closed")


class MultiChannelGate(nn.Module):
    """Pooled token statistics -> per-channel gate (B, C) and fusion decision probability (B,)."""

    def __init__(self, dim: int, reduction: int = 8, initial_open_prob: float = 0.88) -> None:
        super().__init__()
        hidden = max(dim // reduction, 8)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(3 * dim, hidden)
        self.act = nn.GELU()
        self.channel_head = nn.Linear(hidden, dim)
        self.decision_head = nn.Linear(hidden, 1)
        # Start open so the fusion block receives gradient from the first step (its output is zero at init).
        nn.init.zeros_(self.decision_head.weight)
        nn.init.constant_(self.decision_head.bias, float(torch.logit(torch.tensor(initial_open_prob))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, D, H, W, C) -> channel_gate (B, C), decision_prob (B,)."""
        tokens = self.norm(x).flatten(1, 3)
        # mean + max + std: the max picks up small, high-contrast structures that the mean averages away.
        descriptor = torch.cat([tokens.mean(1), tokens.amax(1), tokens.std(1)], dim=-1)
        hidden = self.act(self.fc(descriptor))
        return torch.sigmoid(self.channel_head(hidden)), torch.sigmoid(self.decision_head(hidden)).squeeze(-1)


class MultiScaleFusionBlock(nn.Module):
    """Fuses several receptive fields of the current tokens with features from earlier encoder depths.

    Branches on a reduced channel width: identity, depthwise 3^3 convolutions with dilations (1, 2, 3) (receptive
    fields of 3, 5 and 7 tokens), a global-context branch, and a 1x1 projection of each earlier depth's tokens.
    Their concatenation is mixed and projected back to ``dim`` by a zero-initialised 1x1 convolution.
    """

    def __init__(self, dim: int, num_earlier: int, reduction: int = 4, dilations: Sequence[int] = (1, 2, 3)) -> None:
        super().__init__()
        hidden = max(dim // reduction, 8)
        self.norm = LayerNorm3d(dim)
        self.reduce = nn.Conv3d(dim, hidden, kernel_size=1)
        self.dilated = nn.ModuleList(
            nn.Conv3d(hidden, hidden, kernel_size=3, padding=d, dilation=d, groups=hidden) for d in dilations
        )
        self.context = nn.Linear(hidden, hidden)
        self.earlier = nn.ModuleList(
            nn.Sequential(LayerNorm3d(dim), nn.Conv3d(dim, hidden, kernel_size=1)) for _ in range(num_earlier)
        )
        num_branches = 2 + len(dilations) + num_earlier
        self.mix = nn.Sequential(nn.Conv3d(hidden * num_branches, hidden, kernel_size=1), nn.GELU())
        self.out_proj = nn.Conv3d(hidden, dim, kernel_size=1)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, earlier: Sequence[torch.Tensor]) -> torch.Tensor:
        """x and each earlier feature: (B, D, H, W, C) -> fusion residual (B, D, H, W, C)."""
        x_cf = x.permute(0, 4, 1, 2, 3)
        h = self.reduce(self.norm(x_cf))
        branches = [h] + [nn.functional.gelu(conv(h)) for conv in self.dilated]
        branches.append(self.context(h.mean(dim=(2, 3, 4)))[..., None, None, None].expand_as(h))
        branches += [proj(e.permute(0, 4, 1, 2, 3)) for proj, e in zip(self.earlier, earlier)]
        out = self.out_proj(self.mix(torch.cat(branches, dim=1)))
        return out.permute(0, 2, 3, 4, 1)


class SGPMStage(nn.Module):
    """Gate + fusion block placed after one encoder block."""

    def __init__(self, dim: int, fuse_depths: Sequence[int], gate_reduction: int = 8, fusion_reduction: int = 4):
        super().__init__()
        self.fuse_depths = tuple(fuse_depths)
        self.gate = MultiChannelGate(dim, gate_reduction)
        self.fusion = MultiScaleFusionBlock(dim, len(self.fuse_depths), fusion_reduction)
        # Count of samples that ran the fusion block, for tests and compute accounting.
        self.fusion_calls = 0
        self.last_decision_prob: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, features: dict[int, torch.Tensor], gate_mode: str, hard: bool, threshold: float
    ) -> torch.Tensor:
        if gate_mode == "closed":
            self.last_decision_prob = x.new_zeros(x.shape[0])
            return x  # SGPM off: the backbone alone (ablation)
        earlier = [features[d] for d in self.fuse_depths]
        if gate_mode == "open":
            self.fusion_calls += x.shape[0]
            self.last_decision_prob = x.new_ones(x.shape[0])
            return x + self.fusion(x, earlier)
        channel_gate, prob = self.gate(x)
        self.last_decision_prob = prob
        scale = (prob[:, None] * channel_gate)[:, None, None, None, :]
        if not hard:
            self.fusion_calls += x.shape[0]
            return x + scale * self.fusion(x, earlier)
        open_rows = torch.nonzero(prob >= threshold).flatten()
        if open_rows.numel() == 0:
            return x  # gate closed for every sample: the fusion block's compute is skipped
        self.fusion_calls += int(open_rows.numel())
        if open_rows.numel() == x.shape[0]:
            return x + scale * self.fusion(x, earlier)
        fused = self.fusion(x[open_rows], [e[open_rows] for e in earlier])
        return x.index_add(0, open_rows, scale[open_rows] * fused)


class SelfGatedPromptingModule(nn.Module):
    """SGPM stages keyed by the encoder block after which they run (state-dict prefix ``sgpm.stages.<block>``).

    Args:
        dim: encoder embed dim.
        stage_blocks: encoder block indices after which a stage runs.
        fuse_depths: for each stage block, the earlier block indices whose outputs it fuses.
        gate_mode: "learned" (soft in training, hard skip below ``threshold`` in eval), "open" (always fuse) or
            "closed" (never fuse: SGPM off, for ablations).
        threshold: hard-gate threshold on the decision probability at inference.
    """

    def __init__(
        self,
        dim: int,
        stage_blocks: Sequence[int],
        fuse_depths: dict[int, Sequence[int]],
        gate_mode: str = "learned",
        threshold: float = 0.5,
        gate_reduction: int = 8,
        fusion_reduction: int = 4,
    ) -> None:
        super().__init__()
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
        for block in stage_blocks:
            bad = [d for d in fuse_depths.get(block, ()) if d >= block]
            if bad:
                raise ValueError(f"SGPM stage after block {block} can only fuse earlier blocks, got {bad}")
        self.stages = nn.ModuleDict(
            {str(b): SGPMStage(dim, fuse_depths.get(b, ()), gate_reduction, fusion_reduction) for b in stage_blocks}
        )
        self.gate_mode = gate_mode
        self.threshold = threshold
        self.needed_depths = sorted({d for b in stage_blocks for d in fuse_depths.get(b, ())})

    def reset_counters(self) -> None:
        for stage in self.stages.values():
            stage.fusion_calls = 0

    def make_block_hook(self):
        """Hook for ``ImageEncoderViT3D.forward``: records needed depths and applies stages."""
        features: dict[int, torch.Tensor] = {}
        hard = not self.training

        def hook(index: int, x: torch.Tensor) -> torch.Tensor:
            if index in self.needed_depths:
                features[index] = x
            stage = self.stages[str(index)] if str(index) in self.stages else None
            if stage is None:
                return x
            return stage(x, features, self.gate_mode, hard, self.threshold)

        return hook

    def decision_probs(self) -> torch.Tensor | None:
        """(B, num_stages) decision probabilities of the last forward (for a gate-cost regulariser or logging)."""
        probs = [s.last_decision_prob for s in self.stages.values() if s.last_decision_prob is not None]
        return torch.stack(probs, dim=1) if probs else None
