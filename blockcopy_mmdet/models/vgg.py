"""VGG without its fourth max pooling: one stride-8 feature map, as Pedestron's MGAN uses it."""
from __future__ import annotations

import torch
from mmcv.cnn import VGG
from mmdet.registry import MODELS


@MODELS.register_module()
class VGGStride8(VGG):
    """MMCV's VGG run without pool4 (Pedestron's ``VGG`` backbone of MGAN).

    The layers are MMCV's, so the parameter names are Pedestron's and torchvision's (``features.<i>.``,
    VGG-16: convs at 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28). The fourth stage's max pooling
    (``features.23`` in VGG-16) stays in ``features`` to keep those indices but is skipped, so the fifth
    stage runs at stride 8; the fifth stage's own pooling is not built.

    Args:
        depth: 11, 13, 16 or 19.
        frozen_stages: stages whose parameters are frozen in training mode (-1: none).
        ceil_mode: the poolings' ``ceil_mode``; Pedestron's True (it only matters for inputs whose sides
            are not multiples of 8).

    Shapes: (N, 3, H, W) -> a one-tuple of (N, 512, ceil(H / 8), ceil(W / 8)).
    """

    def __init__(self, depth: int = 16, frozen_stages: int = -1, ceil_mode: bool = True) -> None:
        super().__init__(depth, out_indices=(4,), frozen_stages=frozen_stages, ceil_mode=ceil_mode,
                         with_last_pool=False)
        self.skipped_pool = self.range_sub_modules[3][1] - 1  # the last layer of the fourth stage

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        for index, layer in enumerate(self.features):
            if index != self.skipped_pool:
                x = layer(x)
        return (x,)

    def train(self, mode: bool = True) -> VGGStride8:
        super().train(mode)
        return self  # MMCV's VGG.train returns None, which breaks ``model.eval()`` chains
