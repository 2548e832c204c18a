"""A slow, obviously-right oracle of BlockCopy's semantics, for tests only.

It runs the unchanged model densely on every frame, and after *every* op whose result is a feature map
of the clip (batch N, spatial size H/s x W/s) it keeps the fresh result only inside the executed blocks
and takes that op's previous result elsewhere. So every layer's features in a non-executed block are
those of its last execution (feature transfer), an executed block's convolution sees current values
where its neighbour executed and stored ones elsewhere (block padding), global ops see the dense state,
and real padding is only at the image border. Test frames must be non-square so that no weight tensor
looks like a feature map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _MaskEveryOp(TorchFunctionMode):
    def __init__(self, oracle, grid):
        super().__init__()
        self.oracle, self.grid, self.count = oracle, grid, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.oracle.is_feature_map(out):
            return out
        i, self.count = self.count, self.count + 1
        return self.oracle.merge(i, out, self.grid)


class DenseEmulation:
    """``oracle(x, grid)`` has the block-sparse engine's semantics, computed densely."""

    def __init__(self, model, block_size: int):
        self.model, self.block_size = model, block_size
        self.previous: list[torch.Tensor] = []
        self.previous_input = None

    def is_feature_map(self, out) -> bool:
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != self.n:
            return False
        h, w = out.shape[-2:]
        if h > self.height:  # upsampled beyond the frame
            return h % self.height == 0 and w % self.width == 0 and h // self.height == w // self.width
        if h <= 1 or self.height % h or self.width % w or self.height // h != self.width // w:
            return False
        return self.block_size % (self.height // h) == 0

    def merge(self, i: int, out: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if self.first:
            self.previous.append(out.clone())
            return out
        mask = F.interpolate(grid.float(), size=out.shape[-2:], mode="nearest").bool()
        merged = torch.where(mask, out, self.previous[i])
        self.previous[i] = merged.clone()
        return merged

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, grid: torch.Tensor):
        self.n, _, self.height, self.width = x.shape
        self.first = self.previous_input is None
        if not self.first:
            mask = F.interpolate(grid.float(), size=x.shape[-2:], mode="nearest").bool()
            x = torch.where(mask, x, self.previous_input)
        self.previous_input = x.clone()
        with _MaskEveryOp(self, grid):
            return self.model(x)
