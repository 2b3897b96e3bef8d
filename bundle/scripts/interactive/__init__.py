"""Interactive 3D lesion segmentation engine shared by the bundle's inference and the MONAI Label app."""

from .engine import ClickError, InteractiveSegmenter, SegmentationResult, parse_click_list

__all__ = ["ClickError", "InteractiveSegmenter", "SegmentationResult", "parse_click_list"]
