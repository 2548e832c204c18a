"""Op handlers: how each torch op on an Activation runs on a dense frame and on a batch of tiles.

``HANDLERS`` maps an op's short name (``conv2d``, ``add``, ``interpolate``, ...) to its handler
``handler(executor, name, func, args, kwargs)``. An op missing here cannot run block-sparse and raises
:class:`~blockcopy_core.errors.UnsupportedOperationError` naming the op and the module;
:func:`register_op` adds handlers for further ops (e.g. a framework's own functions).
"""
from . import norms, pointwise, reductions, spatial

HANDLERS = {**pointwise.HANDLERS, **norms.HANDLERS, **reductions.HANDLERS, **spatial.HANDLERS}


def register_op(name: str, handler, *, replace: bool = False) -> None:
    """Run the op called ``name`` block-sparse with ``handler``.

    ``name`` is the op's short name: the last part of torch's name for it (``torch.nn.functional.conv2d``
    and ``torch.conv2d`` -> ``conv2d``, ``Tensor.add`` -> ``add``, ``Tensor.__add__`` -> ``__add__``), or,
    for a Python function that supports ``__torch_function__`` through
    ``torch.overrides.handle_torch_function``, the last part of its ``__qualname__``. Only functions that
    reach ``__torch_function__`` with an activation among their
    arguments are routed to handlers.

    ``handler(executor, name, func, args, kwargs)`` is called instead of ``func(*args, **kwargs)`` and
    returns its result. It runs with ``__torch_function__`` dispatch switched off, so the torch ops it
    calls run directly. Activations among ``args``/``kwargs`` are
    :class:`~blockcopy_core.activation.Activation` tensors with ``bc_role`` ``"spatial"`` (a feature map)
    or ``"vector"`` (a per-stream (N, ...) value), ``bc_halo`` (set after ``F.pad``) and
    ``bc_spatial_dims`` (where H and W are, from the end: (-2, -1) for (N, C, H, W) maps). Tensors the
    handler returns must be wrapped again with :func:`blockcopy_core.activation.wrap` (or
    :func:`blockcopy_core.ops.common.wrap_result`) so that the next ops reach their handlers. An op that
    acts on each position separately can simply delegate to
    :func:`blockcopy_core.ops.pointwise.elementwise`. ``executor`` offers:

    - ``dense_phase``: True on dense frames (the clip's first, and frames that execute every block), where
      feature maps are (N, C, H_l, W_l); False on tile frames, where they are (K, C, T_l, T_l) batches of
      tiles, one per executed block (per-stream vectors stay (N, ...)).
    - ``index``: the executed blocks as a :class:`~blockcopy_core.grid.TileIndex` of (K,) ``stream``,
      ``row`` and ``col`` tensors (None on dense frames); ``geometry``: the clip's
      :class:`~blockcopy_core.grid.FrameGeometry`.
    - ``site(name)``: the :class:`~blockcopy_core.state.LayerState` of this call site (call it once per
      call, on every frame): ``store(map)`` on dense frames; ``update(tiles, index)`` or
      ``update_and_gather(tiles, index, halo, border, value, executor.tile_map)`` (tiles grown by a halo
      from the neighbouring blocks) on tile frames; ``dense`` is the (N, C, H_l, W_l) state.
    - ``broadcast_vectors(args, kwargs)``: per-stream vectors indexed to one row per tile;
      ``check_scaled(name, x, out, up, down)``: checks that ``out`` is ``x`` scaled block-aligned;
      ``add_macs(count)``: adds to the frame's MAC count; ``unsupported(name, reason)``: raises
      :class:`~blockcopy_core.errors.UnsupportedOperationError` naming the op and ``module_path``.

    Raises ValueError when ``name`` already has a handler, unless ``replace`` is True.
    """
    if not callable(handler):
        raise TypeError(f"the handler of op {name!r} must be callable, got {type(handler).__name__}")
    if name in HANDLERS and not replace:
        raise ValueError(f"op {name!r} already has a handler ({getattr(HANDLERS[name], '__qualname__', '?')}); "
                         "pass replace=True to replace it")
    HANDLERS[name] = handler


def supported_ops() -> list[str]:
    """Short names of all ops the engine can run block-sparse (registered ones included)."""
    return sorted(HANDLERS)
