"""TAGS-style multi-prompt fusion (Li et al., ICCV 2025 workshops) on the SAM-Med3D encoder.

Two prompts, both zero-initialised so that freshly added they leave the backbone's outputs unchanged:

* **Anatomy prompt.** An organ mask ``encode(images, anatomy=mask)`` (B, 1, S, S, S) goes through a patch-embedding
  branch shaped like the image's (zero weights and bias) and is added to the tokens after the patch + position
  embedding (block-hook index -1). This equals TAGS' "extra input channel": a convolution over [image, mask] is the
  image's convolution plus one over the mask. No mask given -> nothing is added.
* **Semantic prompts.** Two text vectors ("normal {organ}" vs "{organ} with lesion" prompt ensembles, see
  ``scripts/baselines/text_prompts.py``) are aligned with the tokens after chosen blocks. At each level a small adapter
  (zero-initialised last layer) is mixed back as ``x <- x + mix * align(x)`` and the alignment map
  ``tau * cosine(proj(x), text_proj(t))`` (B, 2, g, g, g) is kept in ``last_alignment_logits``. The trainer adds
  ``align_weight * alignment_loss(targets)`` through the extension's ``training_losses`` (the generic extra-loss
  interface of ``scripts.training.engines``).

Extension parameters live under ``extensions.tags.*``. Faithful parts and adaptations: docs/method.md.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# Channel order of the alignment maps.
NORMAL, LESION = 0, 1


def default_alignment_levels(depth: int) -> tuple[int, ...]:
    """Blocks at quarters of the encoder, ending with the last: (2, 5, 8, 11) at depth 12, (1, 2, 3) at depth 4."""
    step = max(round(depth / 4), 1)
    return tuple(sorted(range(depth - 1, 0, -step)))[-4:]


class AlignmentAdapter(nn.Module):
    """LayerNorm -> Linear(dim->hidden) -> GELU -> Linear(hidden->dim), last layer zero-initialised."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class AlignmentLevel(nn.Module):
    """One semantic-prompt level: the mixed-back adapter and the projection of tokens into the text space."""

    def __init__(self, dim: int, hidden: int, align_dim: int) -> None:
        super().__init__()
        self.adapter = AlignmentAdapter(dim, hidden)
        self.proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, align_dim))


def binary_focal_dice(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """(softmax focal + soft Dice) / 2 for 2-class maps.

    Args:
        logits: (B, 2, g, g, g) alignment logits (normal, lesion).
        target: (B, 1, g, g, g) lesion fraction per token in [0, 1] (soft targets allowed).

    Returns:
        scalar: batch mean of (focal + Dice) / 2, Dice averaged over both channels per sample.
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    p = log_p.exp()
    t = torch.cat([1.0 - target, target], dim=1).float()
    focal = -(t * (1.0 - p).pow(gamma) * log_p).sum(1).flatten(1).mean(1)
    dims = tuple(range(2, logits.ndim))
    inter = (p * t).sum(dims)
    denom = p.sum(dims) + t.sum(dims)
    dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    return ((focal + dice.mean(1)) / 2.0).mean()


class TAGSExtension(nn.Module):
    """Anatomy prompt + semantic (text) prompts for one encoder; register as ``model.extensions["tags"]``.

    Args:
        embed_dim, patch_size: the encoder's token width and patch size (the anatomy branch mirrors its patch embed).
        anatomy_prompt: add the zero-initialised anatomy patch-embedding branch.
        anatomy_chans: channels of the anatomy mask (1: one organ).
        semantic_prompt: add the text-aligned adapters and alignment maps.
        text_vectors: (2, text_dim) array/tensor, rows (normal, lesion); see ``scripts.baselines.text_prompts``.
        levels: blocks after which alignment runs (``default_alignment_levels(depth)`` if None).
        depth: encoder depth (only for the default levels).
        align_dim: width of the joint token/text space.
        adapter_hidden: hidden width of the alignment adapters (None: max(dim // 4, 16)).
        mix: weight of the mixed-back adapter output (TAGS: 0.2).
        init_temperature: initial value of the learnable cosine temperature (TAGS: fixed 100).
        max_temperature: clamp of the learnable temperature.
        target_pooling: how a crop-resolution target becomes a token-grid target: "fraction" (lesion fraction per
            token, soft) or "max" (a token with any lesion voxel is lesion).
        focal_gamma: focal exponent of the alignment loss.
        align_weight: weight of the alignment loss in training (``training_losses``; 0 reports it without adding).
    """

    # batch entries the trainer hands to ``training_losses``: all lesions of the crop
    batch_keys = ("label_all",)

    def __init__(
        self,
        embed_dim: int,
        patch_size: int,
        anatomy_prompt: bool = True,
        anatomy_chans: int = 1,
        semantic_prompt: bool = True,
        text_vectors: np.ndarray | torch.Tensor | None = None,
        levels: Sequence[int] | None = None,
        depth: int | None = None,
        align_dim: int = 128,
        adapter_hidden: int | None = None,
        mix: float = 0.2,
        init_temperature: float = 10.0,
        max_temperature: float = 100.0,
        target_pooling: str = "fraction",
        focal_gamma: float = 2.0,
        align_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.align_weight = float(align_weight)
        if target_pooling not in ("fraction", "max"):
            raise ValueError(f"target_pooling must be 'fraction' or 'max', got {target_pooling!r}")
        self.patch_size = patch_size
        self.anatomy_chans = anatomy_chans
        self.anatomy_embed = None
        if anatomy_prompt:
            self.anatomy_embed = nn.Conv3d(anatomy_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
            nn.init.zeros_(self.anatomy_embed.weight)
            nn.init.zeros_(self.anatomy_embed.bias)
        self.semantic_prompt = semantic_prompt
        self.levels: tuple[int, ...] = ()
        self.mix = mix
        self.max_temperature = max_temperature
        self.target_pooling = target_pooling
        self.focal_gamma = focal_gamma
        self.last_alignment_logits: list[torch.Tensor] = []
        self._anatomy_context: torch.Tensor | None = None
        if semantic_prompt:
            if text_vectors is None:
                from .text_prompts import get_text_vectors

                text_vectors = get_text_vectors("packaged", organ="organ")
            vectors = torch.as_tensor(np.asarray(text_vectors), dtype=torch.float32)
            if vectors.ndim != 2 or vectors.shape[0] != 2:
                raise ValueError(
                    f"text_vectors must be (2, text_dim) rows (normal, lesion), got {tuple(vectors.shape)}"
                )
            if levels is None:
                if depth is None:
                    raise ValueError("give the alignment levels or the encoder depth")
                levels = default_alignment_levels(depth)
            self.levels = tuple(int(b) for b in levels)
            if depth is not None and any(not 0 <= b < depth for b in self.levels):
                raise ValueError(f"alignment levels {self.levels} outside the encoder's blocks 0..{depth - 1}")
            hidden = adapter_hidden or max(embed_dim // 4, 16)
            self.register_buffer("text_vectors", vectors)
            self.text_proj = nn.Linear(vectors.shape[1], align_dim)
            self.align = nn.ModuleDict({str(b): AlignmentLevel(embed_dim, hidden, align_dim) for b in self.levels})
            self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(max=self.max_temperature)

    @contextlib.contextmanager
    def use_anatomy(self, anatomy: torch.Tensor | None) -> Iterator[None]:
        """Anatomy mask for every ``encode`` inside the block, for callers that do not pass ``anatomy=`` themselves
        (e.g. ``training_rounds`` / ``evaluation_clicks``). An explicit ``encode(..., anatomy=...)`` wins."""
        previous, self._anatomy_context = self._anatomy_context, anatomy
        try:
            yield
        finally:
            self._anatomy_context = previous

    def _anatomy_tokens(self, anatomy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if anatomy.ndim == 4:
            anatomy = anatomy[:, None]
        expected = (self.anatomy_chans,) + tuple(s * self.patch_size for s in x.shape[1:4])
        if tuple(anatomy.shape[1:]) != expected:
            raise ValueError(f"anatomy mask must be (B, {', '.join(map(str, expected))}), got {tuple(anatomy.shape)}")
        if anatomy.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"anatomy batch {anatomy.shape[0]} does not match the images' {x.shape[0]}")
        tokens = self.anatomy_embed(anatomy.to(device=x.device, dtype=self.anatomy_embed.weight.dtype))
        return tokens.permute(0, 2, 3, 4, 1).to(x.dtype)

    def alignment_logits(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """tau * cosine(projected tokens, projected text vectors): (B, X, Y, Z, C) -> (B, 2, X, Y, Z)."""
        feats = F.normalize(self.align[str(level)].proj(x), dim=-1)
        text = F.normalize(self.text_proj(self.text_vectors.to(feats.dtype)), dim=-1)
        logits = torch.einsum("bxyzc,kc->bkxyz", feats, text)
        return self.temperature.to(logits.dtype) * logits

    def make_block_hook(self, anatomy: torch.Tensor | None = None, **_extension_inputs):
        """Hook for ``SGPSAM.encode``: anatomy tokens at index -1, alignment after each level's block."""
        anatomy = anatomy if anatomy is not None else self._anatomy_context
        if anatomy is not None and self.anatomy_embed is None:
            raise ValueError("an anatomy mask was given but this TAGS extension has no anatomy branch")
        self.last_alignment_logits = []
        maps = self.last_alignment_logits

        def hook(index: int, x: torch.Tensor) -> torch.Tensor:
            if index == -1 and anatomy is not None:
                return x + self._anatomy_tokens(anatomy, x)
            if self.semantic_prompt and str(index) in self.align:
                x = x + self.mix * self.align[str(index)].adapter(x)
                maps.append(self.alignment_logits(index, x))
            return x

        return hook

    def token_targets(self, targets: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """(B, 1, S, S, S) binary crop target -> (B, 1, *grid) token-grid target (see ``target_pooling``)."""
        targets = (targets > 0.5).float()
        if self.target_pooling == "max":
            return F.adaptive_max_pool3d(targets, tuple(grid))
        return F.adaptive_avg_pool3d(targets, tuple(grid))

    def alignment_loss(self, targets: torch.Tensor, logits: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Mean over levels of (focal + Dice)/2 between the alignment maps and the token-grid target.

        Args:
            targets: (B, 1, S, S, S) binary lesion masks of the crop last encoded.
            logits: alignment maps to score (default: ``last_alignment_logits`` of the last ``encode``).
        """
        logits = self.last_alignment_logits if logits is None else list(logits)
        if not logits:
            raise RuntimeError("no alignment maps: run encode() first (and build with semantic_prompt=True)")
        token_target = self.token_targets(targets.to(logits[0].device), logits[0].shape[2:])
        losses = [binary_focal_dice(level, token_target, self.focal_gamma) for level in logits]
        return torch.stack(losses).mean()

    def training_losses(self, targets: torch.Tensor, batch: dict) -> list[tuple[str, float, torch.Tensor]]:
        """The alignment loss of the last ``encode`` as one weighted training term (none without alignment maps).

        It is scored on every lesion of the crop (``batch["label_all"]``, the instance target when absent): "lesion
        vs normal tissue" is semantic, not one instance.
        """
        if not self.semantic_prompt or not self.last_alignment_logits:
            return []
        lesions = batch.get("label_all")
        return [("alignment_loss", self.align_weight, self.alignment_loss(targets if lesions is None else lesions))]


def add_tags(model: nn.Module, **kwargs) -> TAGSExtension:
    """Create the TAGS extension for ``model.image_encoder`` and register it as ``model.extensions["tags"]``."""
    encoder = model.image_encoder
    kwargs.setdefault("depth", len(encoder.blocks))
    extension = TAGSExtension(encoder.patch_embed.proj.out_channels, encoder.patch_size, **kwargs)
    model.extensions["tags"] = extension
    return extension


def tags_alignment_loss(network: nn.Module, targets: torch.Tensor) -> torch.Tensor | None:
    """Alignment loss of ``network``'s TAGS extension after its last ``encode`` (None if it has none/no maps).

    ``network`` may be wrapped (DDP ``.module``). Training adds it through ``TAGSExtension.training_losses``.
    """
    network = getattr(network, "module", network)
    extensions = getattr(network, "extensions", None)
    if extensions is None or "tags" not in extensions:
        return None
    tags = extensions["tags"]
    if not tags.semantic_prompt or not tags.last_alignment_logits:
        return None
    return tags.alignment_loss(targets)


@dataclass(frozen=True)
class TAGSConfig:
    """TAGS as a network extension: ``build_sgp_sam(..., extensions=[TAGSConfig()])`` (see ``TAGSExtension``).

    Args:
        anatomy_prompt: the anatomy branch (organ mask via ``encode(images, anatomy=mask)``).
        semantic_prompt: the text-aligned adapters and alignment maps.
        text_source: "packaged" (shipped MiniLM vectors), "minilm" or an .npz path; for CLIP, write an .npz with
            ``python -m scripts.baselines.text_prompts --source clip --clip-weights-path ...`` and pass its path.
        text_organ: organ word of the prompt ensembles (packaged: liver, brain, kidney, pancreas, organ).
        levels: blocks after which alignment runs (default: quarters of the depth, e.g. 2, 5, 8, 11).
        align_dim: width of the joint token/text space.
        mix: weight of the mixed-back alignment adapter (TAGS: 0.2).
        align_weight: weight of the alignment loss in training.
    """

    anatomy_prompt: bool = True
    semantic_prompt: bool = True
    text_source: str = "packaged"
    text_organ: str = "organ"
    levels: Sequence[int] | None = None
    align_dim: int = 128
    mix: float = 0.2
    align_weight: float = 1.0

    def __call__(self, model: nn.Module) -> TAGSExtension:
        from .text_prompts import get_text_vectors

        return add_tags(
            model,
            anatomy_prompt=self.anatomy_prompt,
            semantic_prompt=self.semantic_prompt,
            text_vectors=get_text_vectors(self.text_source, organ=self.text_organ) if self.semantic_prompt else None,
            levels=self.levels,
            align_dim=self.align_dim,
            mix=self.mix,
            align_weight=self.align_weight,
        )
