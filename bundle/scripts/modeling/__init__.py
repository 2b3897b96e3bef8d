"""SGP-SAM network: SAM-Med3D-compatible backbone + Self-Gated Prompting Module (one file per component)."""

from .build import PRESETS, ClickConfig, NetworkConfig, SGPMConfig, build_network, build_sgp_sam
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D
from .sgp_sam import BACKBONE_PREFIXES, SGPSAM
from .sgpm import SelfGatedPromptingModule

__all__ = [
    "BACKBONE_PREFIXES",
    "PRESETS",
    "SGPSAM",
    "ClickConfig",
    "ImageEncoderViT3D",
    "MaskDecoder3D",
    "NetworkConfig",
    "PromptEncoder3D",
    "SGPMConfig",
    "SelfGatedPromptingModule",
    "build_network",
    "build_sgp_sam",
]
