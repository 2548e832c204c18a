"""Counting multiply-accumulates (MACs): the cost measure of the method (GMACs per frame).

Counted: convolutions, transposed convolutions and linear layers, which hold nearly all of a CNN's
arithmetic. The block-sparse engine counts what it executes with the same formulas (see
``BlockSparseModel.last_stats``), so the two numbers are comparable.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


def conv_macs(output: torch.Tensor, weight: torch.Tensor) -> int:
    """A convolution: every output value costs (C_in / groups) * kh * kw MACs."""
    return output.numel() * weight.shape[1] * weight.shape[2] * weight.shape[3]


def conv_transpose_macs(input: torch.Tensor, weight: torch.Tensor) -> int:
    """A transposed convolution: every input value is spread over (C_out / groups) * kh * kw outputs."""
    return input.numel() * weight.shape[1] * weight.shape[2] * weight.shape[3]


def linear_macs(output: torch.Tensor, input: torch.Tensor) -> int:
    return output.numel() * input.shape[-1]


class _MacCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.nn.functional.conv2d:
            self.macs += conv_macs(out, args[1] if len(args) > 1 else kwargs["weight"])
        elif func is torch.nn.functional.conv_transpose2d:
            self.macs += conv_transpose_macs(args[0], args[1] if len(args) > 1 else kwargs["weight"])
        elif func is torch.nn.functional.linear:
            self.macs += linear_macs(out, args[0])
        return out


@torch.no_grad()
def count_macs(model: torch.nn.Module, *inputs, **kwargs) -> int:
    """MACs of one dense forward ``model(*inputs, **kwargs)`` (all images of the batch together)."""
    counter = _MacCounter()
    with counter:
        model(*inputs, **kwargs)
    return counter.macs
