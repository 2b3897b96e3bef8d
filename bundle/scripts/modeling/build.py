"""Model presets and the builder used by the bundle configs and the MONAI Label app."""

from __future__ import annotations

from typing import Any, Sequence

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


def build_sgp_sam(
    preset: str = "sam_med3d",
    sgpm: bool = True,
    sgpm_stages: Sequence[int] | None = None,
    sgpm_fuse_depths: dict[int, Sequence[int]] | None = None,
    gate_mode: str = "learned",
    gate_threshold: float = 0.5,
    attention_impl: str = "fast",
    in_chans: int = 1,
    click_map: bool = False,
    refiner: bool = False,
    click_consistent: bool = True,
    multi_click: bool = False,
    adapter: str | None = None,
    adapter_dim: int | None = None,
    adapter_kernel: str | Sequence[int] = "depth",
    fact_rank: int = 32,
    tags: bool = False,
    anatomy_prompt: bool = True,
    semantic_prompt: bool = True,
    text_source: str = "packaged",
    text_organ: str = "organ",
    tags_levels: Sequence[int] | None = None,
    tags_align_dim: int = 128,
    tags_mix: float = 0.2,
    **overrides: Any,
) -> SGPSAM:
    """Build SGP-SAM (or the plain SAM-Med3D backbone with ``sgpm=False``).

    Args:
        preset: "sam_med3d" (released sizes), "small" or "tiny".
        sgpm: add the Self-Gated Prompting Module (False = plain fine-tuning baseline).
        sgpm_stages: encoder block indices after which SGPM stages run (preset default if None).
        sgpm_fuse_depths: {stage block: earlier blocks to fuse}; default: one quarter of the depth earlier.
        gate_mode: "learned" or "open" (ablation: always fuse, no gate).
        gate_threshold: hard-gate threshold at inference.
        attention_impl: "fast" (exact, default) or "naive" padded-window attention.
        click_map: add the dense click-map prompt (``click_map.*``, zero-initialised; ``click_prompt.py``).
        refiner: add the high-resolution mask refiner (``refiner.*``, zero-initialised; ``refine.py``).
        click_consistent: every round's mask agrees with the clicks: clicked voxels take their label and only the
            components holding a foreground click are kept (``scripts.clicks.click_consistent_logits``). No weights;
            False gives the raw network output, as SAM-Med3D returns it.
        multi_click: the decoder gets every click so far each round (SAM-Med3D's ``--multi_click`` training and
            inference option); False feeds only the new click, SAM-Med3D's default and how its weights were trained.
        adapter: None or "ma_sam" (MA-SAM 3D adapters + FacT under ``extensions.ma_sam``).
        adapter_dim: MA-SAM adapter bottleneck (None: embed_dim // 2 = MA-SAM's 384 at 768; 0: no adapters).
        adapter_kernel: "depth" (MA-SAM, 3 along the slice axis Z), "cube" (depthwise 3^3), "cube_full" (full 3^3)
            or an explicit kernel in token-axis order (X, Y, Z).
        fact_rank: FacT rank on q and v (MA-SAM: 32; 0: no FacT).
        tags: add TAGS multi-prompt fusion under ``extensions.tags``.
        anatomy_prompt: TAGS anatomy branch (organ mask via ``encode(images, anatomy=mask)``).
        semantic_prompt: TAGS text-aligned adapters and alignment maps.
        text_source: "packaged" (shipped MiniLM vectors), "minilm" or an .npz path; for CLIP, write an .npz with
            ``python -m scripts.baselines.text_prompts --source clip --clip-weights-path ...`` and pass its path.
        text_organ: organ word of the prompt ensembles (packaged: liver, brain, kidney, pancreas, organ).
        tags_levels: blocks after which alignment runs (default: quarters of the depth, e.g. 2, 5, 8, 11).
        tags_align_dim: width of the joint token/text space.
        tags_mix: weight of the mixed-back alignment adapter (TAGS: 0.2).
        overrides: any preset field (e.g. ``img_size``).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = {**PRESETS[preset], **overrides}
    grid = cfg["img_size"] // cfg["patch_size"]
    encoder = ImageEncoderViT3D(
        img_size=cfg["img_size"],
        patch_size=cfg["patch_size"],
        in_chans=in_chans,
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        out_chans=cfg["out_chans"],
        window_size=cfg["window_size"],
        global_attn_indexes=cfg["global_attn_indexes"],
    )
    encoder.set_attention_impl(attention_impl)
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
    module = None
    if sgpm:
        stages = tuple(sgpm_stages if sgpm_stages is not None else cfg["sgpm_stages"])
        bad = [s for s in stages if not 0 <= s < cfg["depth"]]
        if bad:
            raise ValueError(f"sgpm_stages {bad} outside the encoder's blocks 0..{cfg['depth'] - 1}")
        fuse = {int(k): tuple(v) for k, v in (sgpm_fuse_depths or default_fuse_depths(stages, cfg["depth"])).items()}
        module = SelfGatedPromptingModule(cfg["embed_dim"], stages, fuse, gate_mode=gate_mode, threshold=gate_threshold)
    clicks = None
    if click_map:
        clicks = ClickMapPrompt(cfg["out_chans"], (grid, grid, grid), (cfg["img_size"],) * 3, cfg["mask_in_chans"])
    refine = MaskRefiner(in_chans) if refiner else None
    model = SGPSAM(
        encoder,
        prompt_encoder,
        decoder,
        module,
        clicks,
        refine,
        click_consistent=click_consistent,
        multi_click=multi_click,
    )
    if adapter is not None:
        if adapter != "ma_sam":
            raise ValueError(f"unknown adapter {adapter!r}; choose None or 'ma_sam'")
        from ..baselines.ma_sam import add_ma_sam

        add_ma_sam(model, adapter_dim=adapter_dim, adapter_kernel=adapter_kernel, fact_rank=fact_rank)
    if tags:
        from ..baselines.text_prompts import get_text_vectors
        from ..baselines.tags import add_tags

        add_tags(
            model,
            anatomy_prompt=anatomy_prompt,
            semantic_prompt=semantic_prompt,
            text_vectors=get_text_vectors(text_source, organ=text_organ) if semantic_prompt else None,
            levels=tags_levels,
            align_dim=tags_align_dim,
            mix=tags_mix,
        )
    return model
