"""Vector norms and L2 normalisation along channels (``F.normalize``, ``torch.linalg.vector_norm``,
``torch.norm`` / ``Tensor.norm`` / ``torch.linalg.norm``): taken over channel dims they act on each
position separately, so they run unchanged on dense maps and on tiles. Over the batch or a spatial dim
they would mix blocks and are refused."""
from __future__ import annotations

from ..activation import SPATIAL
from .common import bind, normalize_dims, position_dims
from .pointwise import elementwise

_INPUT_NAMES = ("input", "self", "x", "A")
# Where the reduced dims are, and their default: all of these take (input, p or ord, dim, ...), and only
# F.normalize has a default dim (1, the channels of an (N, C, H, W) map).
_DEFAULT_DIM = {"normalize": 1, "norm": None, "vector_norm": None}


def channel_norm(ex, name, func, args, kwargs):
    x = args[0] if args else next(kwargs[k] for k in _INPUT_NAMES if k in kwargs)
    (dim,) = bind(args[2:], kwargs, ["dim"], [_DEFAULT_DIM[name]])
    if dim is None:
        ex.unsupported(name, "no dim given: the norm would be taken over all dims, spatial positions included; "
                             "pass the channel dim (dim=1 for (N, C, H, W) maps)")
    positions = position_dims(x)
    for d in normalize_dims(dim, x.dim()):
        if d == 0:
            ex.unsupported(name, f"it takes the norm over dim {d}, across the batch (of blocks)")
        if x.bc_role == SPATIAL and d in positions:
            ex.unsupported(name, f"it takes the norm over dim {d}, a spatial dim of the {tuple(x.shape)} "
                                 "map, which mixes blocks; only norms over channel dims keep positions apart")
    return elementwise(ex, name, func, args, kwargs)


HANDLERS = {name: channel_norm for name in _DEFAULT_DIM}
