"""Argument binding and result wrapping shared by the op handlers."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..activation import SPATIAL, VECTOR, Activation, activations_in, unwrap, wrap

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


def wrap_result(result, role: str, halo=None):
    """Wrap every tensor in an op's result as an Activation of ``role``."""
    if isinstance(result, torch.Tensor):
        return wrap(result, role, halo)
    if isinstance(result, (list, tuple)) and not hasattr(result, "_fields"):
        return type(result)(wrap_result(r, role, halo) for r in result)
    return result


def spatial_args(args, kwargs) -> list[Activation]:
    return [a for a in activations_in(list(args) + list(kwargs.values())) if a.bc_role == SPATIAL]


def result_role(args, kwargs) -> str:
    """An op result is spatial when any activation input is, else a per-stream vector."""
    return SPATIAL if spatial_args(args, kwargs) else VECTOR


def normalize_dims(dims, ndim: int) -> tuple[int, ...]:
    if dims is None:
        return tuple(range(ndim))
    if isinstance(dims, int):
        dims = (dims,)
    return tuple(sorted(d % ndim for d in dims))
