"""Functional ops that models may call and that the block-sparse engine understands.

Each op here is a plain PyTorch function that dispatches through ``__torch_function__``, so the
engine's activation type can intercept it and run it per block with the right halo.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function_unary


def resize_bilinear_tf(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """Bilinear upsampling by an integer factor with TensorFlow's legacy coordinates.

    TensorFlow's ``ResizeBilinear`` with ``align_corners=False, half_pixel_centers=False`` (the TF1
    default, used by many converted detectors) samples output pixel ``o`` at source coordinate
    ``o / scale_factor`` and clamps the right/bottom neighbour at the border. No PyTorch mode matches
    it: ``F.interpolate(align_corners=False)`` uses half-pixel centres.

    Args:
        x: (N, C, H, W) feature map.
        scale_factor: integer upsampling factor >= 1.

    Returns:
        (N, C, H * scale_factor, W * scale_factor).
    """
    if has_torch_function_unary(x):
        return handle_torch_function(resize_bilinear_tf, (x,), x, scale_factor)
    if int(scale_factor) != scale_factor or scale_factor < 1:
        raise ValueError(f"resize_bilinear_tf needs an integer scale_factor >= 1, got {scale_factor}")
    scale_factor = int(scale_factor)
    height, width = x.shape[-2:]
    # With one replicated row/column appended, align_corners=True from (H + 1) to (f * H + 1) samples
    # exactly at o / f; the extra last output row/column is dropped.
    padded = F.pad(x, (0, 1, 0, 1), mode="replicate")
    out = F.interpolate(padded, size=(height * scale_factor + 1, width * scale_factor + 1),
                        mode="bilinear", align_corners=True)
    return out[..., : height * scale_factor, : width * scale_factor]
