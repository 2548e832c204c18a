"""The tensor type that carries a model's activations through a block-sparse forward.

Inside :class:`~blockcopy_core.engine.BlockSparseModel` the model's input is an ``Activation``, so every
torch op that touches an activation is routed (through ``__torch_function__``) to the op handlers of
:mod:`blockcopy_core.ops`, while ops on weights and constants run untouched.

An activation has a *role*:
  - ``"spatial"``: a feature map. On a clip's first (dense) frame it is (N, C, H_l, W_l); on sparse
    frames it is a (K, C, T, T) batch of tiles, one per executed block. ``halo`` is set when the tile
    was grown by ``F.pad`` for the next convolution or pooling. ``spatial_dims`` says where its H and W
    dims are, counted from the end: (-2, -1) for (..., H, W) maps, (-3, -2) for a channels-last
    (N, H, W, C) map after ``permute(0, 2, 3, 1)``, on which position-wise ops (LayerNorm and Linear
    over the last dim, ...) still run; ops with spatial extent need (-2, -1).
  - ``"vector"``: a per-stream value with no spatial extent, e.g. a squeeze-excite descriptor (N, C, 1, 1)
    or (N, C), computed from the dense state of a global op.
"""
from __future__ import annotations

import threading
from typing import Any

import torch

SPATIAL = "spatial"
VECTOR = "vector"
STANDARD_DIMS = (-2, -1)  # the (H, W) dims of an (N, C, H, W) map, counted from the end

_active = threading.local()


class Activation(torch.Tensor):
    """A feature map (or per-stream vector) inside a block-sparse forward; see the module docstring."""

    bc_role: str = SPATIAL
    bc_halo: tuple[int, int, int, int] | None = None
    bc_spatial_dims: tuple[int, int] = STANDARD_DIMS

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        executor = getattr(_active, "executor", None)
        if executor is None:  # outside a block-sparse forward an Activation is a plain tensor
            with torch._C.DisableTorchFunctionSubclass():
                return func(*unwrap(tuple(args)), **unwrap(kwargs or {}))
        return executor.dispatch(func, args, kwargs or {})


def wrap(tensor: torch.Tensor, role: str, halo: tuple[int, int, int, int] | None = None,
         spatial_dims: tuple[int, int] = STANDARD_DIMS) -> Activation:
    """View a plain tensor as an Activation of the given role and layout (no copy)."""
    out = tensor.as_subclass(Activation)
    out.bc_role = role
    out.bc_halo = halo
    out.bc_spatial_dims = spatial_dims
    return out


def spatial_dims(x: Activation) -> tuple[int, int]:
    """Positions (from the front) of the H and W dims of a feature map ``x``."""
    return x.dim() + x.bc_spatial_dims[0], x.dim() + x.bc_spatial_dims[1]


def unwrap(value: Any) -> Any:
    """Plain-tensor views of the Activations in ``value`` (tensors, lists, tuples, dicts)."""
    if isinstance(value, Activation):
        with torch._C.DisableTorchFunctionSubclass():
            return value.as_subclass(torch.Tensor)
    if isinstance(value, (list, tuple)):
        return type(value)(unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    return value


def activations_in(values) -> list[Activation]:
    """The Activations among ``values`` and one level of lists/tuples inside them."""
    found = []
    for value in values:
        if isinstance(value, Activation):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, Activation))
    return found


class active_executor:
    """Context manager routing Activation ops to ``executor`` for the duration of a forward."""

    def __init__(self, executor):
        self.executor = executor

    def __enter__(self):
        self.previous = getattr(_active, "executor", None)
        _active.executor = self.executor

    def __exit__(self, *exc):
        _active.executor = self.previous
