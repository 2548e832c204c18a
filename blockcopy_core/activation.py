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
_tracing = threading.local()  # .tracer: the FX tracer while a frame body is traced (see compiled.py)


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
    out = _view_as(tensor, Activation)
    out.bc_role = role
    out.bc_halo = halo
    out.bc_spatial_dims = spatial_dims
    return out


def spatial_dims(x: Activation) -> tuple[int, int]:
    """Positions (from the front) of the H and W dims of a feature map ``x``."""
    return x.dim() + x.bc_spatial_dims[0], x.dim() + x.bc_spatial_dims[1]


def plain(x: torch.Tensor) -> torch.Tensor:
    """A plain-tensor view of an Activation (no copy)."""
    with torch._C.DisableTorchFunctionSubclass():
        return _view_as(x, torch.Tensor)


def _view_as(tensor: torch.Tensor, cls: type) -> torch.Tensor:
    """``tensor.as_subclass(cls)``; while a forward is traced to an FX graph the new Python object is
    given the traced value of ``tensor`` (the tracer follows tensors by object, and as_subclass makes a
    new one without an op it could record)."""
    out = tensor.as_subclass(cls)
    tracer = getattr(_tracing, "tracer", None)
    if tracer is not None:
        from torch.fx.experimental import proxy_tensor
        proxy = proxy_tensor.get_proxy_slot(tensor, tracer, None)
        if proxy is not None:
            proxy_tensor.set_proxy_slot(out, tracer, proxy)
    return out


def trace_with(tracer) -> None:
    """Follow Activations in ``tracer`` (``make_fx``'s proxy tracer) from now on; None stops."""
    _tracing.tracer = tracer


def unwrap(value: Any) -> Any:
    """Plain-tensor views of the Activations in ``value`` (tensors, lists, tuples, dicts)."""
    if isinstance(value, Activation):
        return plain(value)
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
