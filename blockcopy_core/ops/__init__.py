"""Op handlers: how each torch op on an Activation runs on a dense frame and on a batch of tiles.

``HANDLERS`` maps an op's short name (``conv2d``, ``add``, ``interpolate``, ...) to its handler
``handler(executor, name, func, args, kwargs)``. An op missing here cannot run block-sparse and raises
:class:`~blockcopy_core.errors.UnsupportedOperationError` naming the op and the module.
"""
from . import pointwise, reductions, spatial

HANDLERS = {**pointwise.HANDLERS, **reductions.HANDLERS, **spatial.HANDLERS}


def supported_ops() -> list[str]:
    """Short names of all ops the engine can run block-sparse."""
    return sorted(HANDLERS)
