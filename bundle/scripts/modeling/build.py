"""Model presets and the builder used by the bundle configs and the MONAI Label app.

``PRESETS`` is the registry of network sizes (as segment-anything's model registry). A network is described by a
:class:`NetworkConfig`: the preset's sizes, the SGPM settings (:class:`SGPMConfig`, or None for the plain
SAM-Med3D backbone) and the click-interaction switches (:class:`ClickConfig`). :func:`build_network` builds it;
:func:`build_sgp_sam` is the short form the configs and the app call, e.g.
``build_sgp_sam("tiny", sgpm=True, click_map=True, img_size=64)``.

Optional extensions (the baselines' adapters and prompts, ``scripts.baselines``) are callables that add themselves
to the built model under ``model.extensions``; they are applied in order after the backbone and SGPM exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Sequence

from .click_prompt import ClickMapPrompt
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D
from .refine import MaskRefiner
from .sgp_sam import SGPSAM
from .sgpm import SelfGatedPromptingModule

PRESETS: dict[str, dict[str, Any]] = {
    # The released SAM-Med3D / SAM-Med3D-turbo sizes (registry name vit_b_ori).
    "sam_med3d": dict(
        img_size=128,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        out_chans=384,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
        mask_in_chans=16,
        decoder_depth=2,
        decoder_heads=8,
        decoder_mlp_dim=2048,
        iou_head_hidden_dim=256,
        sgpm_stages=(5, 8),
    ),
    # Same architecture (8^3 grid, padded 14^3 windows, 32^3 low-res masks), small widths: tests and CPU demos.
    "tiny": dict(
        img_size=64,
        patch_size=8,
        embed_dim=96,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        out_chans=96,
        window_size=14,
        global_attn_indexes=(1, 3),
        mask_in_chans=16,
        decoder_depth=2,
        decoder_heads=4,
        decoder_mlp_dim=256,
        iou_head_hidden_dim=64,
        sgpm_stages=(1, 2),
    ),
    # Between the two: the transfer study's pretraining preset (fits a CPU/GPU budget, 128^3 crops).
    "small": dict(
        img_size=128,
        patch_size=16,
        embed_dim=192,
        depth=6,
        num_heads=6,
        mlp_ratio=4.0,
        out_chans=192,
        window_size=14,
        global_attn_indexes=(2, 5),
        mask_in_chans=16,
        decoder_depth=2,
        decoder_heads=8,
        decoder_mlp_dim=768,
        iou_head_hidden_dim=128,
        sgpm_stages=(2, 4),
    ),
}


def default_fuse_depths(stage_blocks: Sequence[int], depth: int) -> dict[int, tuple[int, ...]]:
    """Each stage fuses the block output one quarter of the encoder earlier (block 5 <- 2, 8 <- 5 at depth 12)."""
    step = max(depth // 4, 1)
    return {b: ((b - step,) if b - step >= 0 else ()) for b in stage_blocks}


@dataclass(frozen=True)
class SGPMConfig:
    """The Self-Gated Prompting Module (docs/method.md, "SGPM").

    Args:
        gate_mode: "learned", "open" (ablation: always fuse, no gate) or "closed" (ablation: SGPM off).
        gate_threshold: hard-gate threshold at inference.
        fuse_depths: {stage block: earlier blocks to fuse}; default: one quarter of the depth earlier. The stage
            blocks themselves are a preset size (``sgpm_stages``).
    """

    gate_mode: str = "learned"
    gate_threshold: float = 0.5
    fuse_depths: Mapping[int, Sequence[int]] | None = None


@dataclass(frozen=True)
class ClickConfig:
    """How the network takes clicks and returns masks; all off/raw reproduces SAM-Med3D.

    Args:
        click_map: add the dense click-map prompt (``click_map.*``, zero-initialised; ``click_prompt.py``).
        refiner: add the high-resolution mask refiner (``refiner.*``, zero-initialised; ``refine.py``).
        refiner_context: the refiner's reach, ``"local"`` or ``"crop"`` (``MaskRefiner``'s ``context``).
        refiner_geodesic: the refiner also takes geodesic distance maps of the clicks (``MaskRefiner``'s
            ``geodesic``; ``geodesic.py``).
        click_consistent: every round's mask agrees with the clicks: clicked voxels take their label and only the
            components holding a foreground click are kept (``scripts.clicks.click_consistent_logits``). No weights;
            False gives the raw network output, as SAM-Med3D returns it.
        multi_click: the decoder gets every click so far each round (SAM-Med3D's ``--multi_click`` training and
            inference option); False feeds only the new click, SAM-Med3D's default and how its weights were trained.
    """

    click_map: bool = False
    refiner: bool = False
    refiner_context: str = "local"
    refiner_geodesic: bool = False
    click_consistent: bool = True
    multi_click: bool = False


@dataclass(frozen=True)
class NetworkConfig:
    """A whole network: preset sizes, SGPM (None: the plain backbone), click switches and input channels."""

    sizes: Mapping[str, Any] = field(default_factory=lambda: dict(PRESETS["sam_med3d"]))
    sgpm: SGPMConfig | None = SGPMConfig()
    clicks: ClickConfig = ClickConfig()
    in_chans: int = 1

    @classmethod
    def from_preset(
        cls, preset: str = "sam_med3d", sgpm: bool | Mapping | SGPMConfig | None = True, **options: Any
    ) -> "NetworkConfig":
        """The config of ``preset`` with ``options``: fields of :class:`ClickConfig` and :class:`SGPMConfig`,
        ``in_chans``, or preset sizes to override (e.g. ``img_size``, ``sgpm_stages``).

        ``sgpm``: True/False, None, an :class:`SGPMConfig` or a dict of its fields (as the bundle configs write it).
        """
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        overrides = {k: v for k, v in _take(options, PRESETS[preset]).items() if v is not None}  # None: the preset's
        sizes = {**PRESETS[preset], **overrides}
        clicks = ClickConfig(**_take(options, _field_names(ClickConfig)))
        sgpm_options = _take(options, _field_names(SGPMConfig))
        in_chans = int(options.pop("in_chans", 1))
        if options:
            raise TypeError(f"unknown network options {sorted(options)}")
        if isinstance(sgpm, SGPMConfig):
            sgpm = replace(sgpm, **sgpm_options)
        elif isinstance(sgpm, Mapping):
            sgpm = SGPMConfig(**{**sgpm, **sgpm_options})
        else:
            sgpm = SGPMConfig(**sgpm_options) if sgpm else None
        return cls(sizes, sgpm, clicks, in_chans)


def _field_names(config: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(config))


def _take(options: dict[str, Any], names) -> dict[str, Any]:
    """Remove and return the entries of ``options`` named in ``names``."""
    return {name: options.pop(name) for name in list(options) if name in names}


def build_sgp_sam(
    preset: str = "sam_med3d",
    sgpm: bool | Mapping | SGPMConfig | None = True,
    extensions: Sequence[Callable[[SGPSAM], Any]] = (),
    **options: Any,
) -> SGPSAM:
    """Build SGP-SAM (or the plain SAM-Med3D backbone with ``sgpm=False``) from a preset.

    Args:
        preset: "sam_med3d" (released sizes), "small" or "tiny".
        sgpm: add the Self-Gated Prompting Module (False/None = plain fine-tuning baseline); a dict or
            :class:`SGPMConfig` sets its options.
        extensions: callables ``extension(model)`` applied in order, e.g. ``scripts.baselines.ma_sam.MASAMConfig()``.
        options: see :meth:`NetworkConfig.from_preset` (click switches, SGPM fields, ``in_chans``, preset sizes).
    """
    return build_network(NetworkConfig.from_preset(preset, sgpm, **options), extensions)


def build_network(config: NetworkConfig, extensions: Sequence[Callable[[SGPSAM], Any]] = ()) -> SGPSAM:
    """Build the network ``config`` describes, then apply ``extensions`` in order."""
    cfg = config.sizes
    grid = cfg["img_size"] // cfg["patch_size"]
    encoder = ImageEncoderViT3D(
        img_size=cfg["img_size"],
        patch_size=cfg["patch_size"],
        in_chans=config.in_chans,
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        out_chans=cfg["out_chans"],
        window_size=cfg["window_size"],
        global_attn_indexes=cfg["global_attn_indexes"],
    )
    prompt_encoder = PromptEncoder3D(
        embed_dim=cfg["out_chans"],
        image_embedding_size=(grid, grid, grid),
        input_image_size=(cfg["img_size"],) * 3,
        mask_in_chans=cfg["mask_in_chans"],
    )
    decoder = MaskDecoder3D(
        transformer_dim=cfg["out_chans"],
        transformer_depth=cfg["decoder_depth"],
        transformer_heads=cfg["decoder_heads"],
        transformer_mlp_dim=cfg["decoder_mlp_dim"],
        iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
    )
    module = None if config.sgpm is None else _build_sgpm(config.sgpm, cfg)
    clicks = None
    if config.clicks.click_map:
        clicks = ClickMapPrompt(cfg["out_chans"], (grid, grid, grid), (cfg["img_size"],) * 3, cfg["mask_in_chans"])
    refine = None
    if config.clicks.refiner:
        refine = MaskRefiner(
            config.in_chans, context=config.clicks.refiner_context, geodesic=config.clicks.refiner_geodesic
        )
    model = SGPSAM(
        encoder,
        prompt_encoder,
        decoder,
        module,
        clicks,
        refine,
        click_consistent=config.clicks.click_consistent,
        multi_click=config.clicks.multi_click,
    )
    for extend in extensions:
        extend(model)
    # what the model file records (scripts.model_file), so the saved weights rebuild exactly this network
    model.network_config, model.extension_configs = config, tuple(extensions)
    return model


def _build_sgpm(sgpm: SGPMConfig, sizes: Mapping[str, Any]) -> SelfGatedPromptingModule:
    stages = tuple(sizes["sgpm_stages"])
    bad = [s for s in stages if not 0 <= s < sizes["depth"]]
    if bad:
        raise ValueError(f"sgpm_stages {bad} outside the encoder's blocks 0..{sizes['depth'] - 1}")
    fuse = {int(k): tuple(v) for k, v in (sgpm.fuse_depths or default_fuse_depths(stages, sizes["depth"])).items()}
    return SelfGatedPromptingModule(
        sizes["embed_dim"], stages, fuse, gate_mode=sgpm.gate_mode, threshold=sgpm.gate_threshold
    )
