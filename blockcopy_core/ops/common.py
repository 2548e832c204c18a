"""Argument binding and result wrapping shared by the op handlers."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..activation import SPATIAL, STANDARD_DIMS, VECTOR, Activation, activations_in, spatial_dims, unwrap, wrap

REQUIRED = object()


def bind(args: Sequence, kwargs: dict, names: Sequence[str], defaults: Sequence[Any]) -> list:
    """Positional-or-keyword argument values in ``names`` order, defaults filled in."""
    values = list(args) + [REQUIRED] * (len(names) - len(args))
    for i, name in enumerate(names):
        if name in kwargs:
            values[i] = kwargs[name]
        elif values[i] is REQUIRED:
            values[i] = defaults[i]
    return values


def pair(value) -> tuple[int, int]:
    """(height, width) of an int-or-pair op argument."""
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def call(func, args, kwargs):
    """Run ``func`` on the plain-tensor views of its arguments."""
    return func(*unwrap(tuple(args)), **unwrap(kwargs))


def with_input(args: Sequence, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` of an op with its input (the first argument) replaced by ``x``."""
    if args:
        return (x, *args[1:]), kwargs
    return (), {**kwargs, "input": x}


def wrap_result(result, role: str, halo=None, layout: tuple[int, int] = STANDARD_DIMS):
    """Wrap every tensor in an op's result as an Activation of ``role`` (``layout``: its spatial dims)."""
    if isinstance(result, torch.Tensor):
        return wrap(result, role, halo, layout)
    if isinstance(result, (list, tuple)) and not hasattr(result, "_fields"):
        return type(result)(wrap_result(r, role, halo, layout) for r in result)
    return result


def spatial_args(args, kwargs) -> list[Activation]:
    return [a for a in activations_in(list(args) + list(kwargs.values())) if a.bc_role == SPATIAL]


def result_role(args, kwargs) -> str:
    """An op result is spatial when any activation input is, else a per-stream vector."""
    return SPATIAL if spatial_args(args, kwargs) else VECTOR


def position_dims(x: Activation) -> set[int]:
    """The dims of ``x`` that index blocks or positions: batch and (for feature maps) H and W."""
    return {0, *spatial_dims(x)} if x.bc_role == SPATIAL else {0}


def require_standard_layout(ex, name: str, x: Activation) -> None:
    """Ops with spatial extent cut and pad tiles in the last two dims: they need (..., H, W) maps."""
    if x.bc_role == SPATIAL and x.bc_spatial_dims != STANDARD_DIMS:
        ex.unsupported(name, f"it needs a (N, C, H, W) feature map, but its {tuple(x.shape)} input has its "
                             f"H and W in dims {spatial_dims(x)} (e.g. channels-last after a permute); "
                             "permute it back first")


def normalize_dims(dims, ndim: int) -> tuple[int, ...]:
    if dims is None:
        return tuple(range(ndim))
    if isinstance(dims, int):
        dims = (dims,)
    return tuple(sorted(d % ndim for d in dims))
