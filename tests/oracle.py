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
from torch.utils._pytree import tree_leaves


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


def rel_error(actual, expected) -> float:
    """Largest |actual - expected| relative to the largest |expected|, over the leaves of two outputs,
    computed in at least float32 (fp16/bf16 outputs) and in float64 for float64 ones."""
    errors = []
    for a, e in zip(tree_leaves(actual), tree_leaves(expected)):
        dtype = torch.promote_types(e.dtype, torch.float32)
        a, e = a.to(dtype), e.to(dtype)
        errors.append(((a - e).abs().max() / e.abs().max().clamp_min(1e-12)).item())
    return max(errors)


def check_against_oracle_and_dense(model, n: int, height: int, width: int, block: int, rtol: float,
                                   dense_when_full: bool = False) -> None:
    """The engine on N streams of a changing video: two frames with random grids against the oracle,
    then an all-blocks frame (on tiles unless ``dense_when_full``) against the plain model."""
    import blockcopy_core as bc

    sparse, oracle = bc.convert(model, block, dense_when_full=dense_when_full), DenseEmulation(model, block)
    full = torch.ones(n, 1, height // block, width // block, dtype=torch.bool)
    x = torch.randn(n, 3, height, width)
    sparse(x, full)
    oracle(x, full)
    for _ in range(2):
        x = x + 0.5 * torch.randn_like(x)
        grid = torch.rand(full.shape) < 0.5
        assert rel_error(sparse(x, grid), oracle(x, grid)) <= rtol
    x = torch.randn_like(x)
    assert rel_error(sparse(x, full), model(x)) <= rtol
