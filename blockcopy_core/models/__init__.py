"""Pretrained models rebuilt as ordinary ``nn.Module``s that the block-sparse engine can run."""

from .centernet import (
    COCO_CLASSES,
    PERSON_CLASS,
    CenterNetMobileNetV3,
    decode_detections,
    load_centernet,
)
from .tfjs import TfjsGraph, TfjsNode, load_tfjs_graph

__all__ = [
    "COCO_CLASSES",
    "PERSON_CLASS",
    "CenterNetMobileNetV3",
    "TfjsGraph",
    "TfjsNode",
    "decode_detections",
    "load_centernet",
    "load_tfjs_graph",
]
