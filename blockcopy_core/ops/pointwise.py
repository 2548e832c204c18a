"""Ops that act on each spatial position on its own: they run unchanged on dense maps and on tiles."""
from __future__ import annotations

import numbers

import torch

from ..activation import SPATIAL, STANDARD_DIMS, VECTOR, Activation, spatial_dims
from ..macs import linear_macs
from .common import (bind, call, normalize_dims, position_dims, require_standard_layout, result_role,
                     spatial_args, wrap_result)

_ELEMENTWISE = """
add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ rsub subtract
mul mul_ __mul__ __rmul__ __imul__ multiply div div_ __truediv__ __rtruediv__ __itruediv__ divide
true_divide __neg__ neg neg_ __pow__ __rpow__ __ipow__ pow pow_ abs abs_ exp exp_ log log_ sqrt sqrt_
rsqrt rsqrt_ square reciprocal sign floor ceil round erf maximum minimum where lerp addcmul addcdiv
clamp clamp_ clip clip_ clamp_min clamp_min_ clamp_max clamp_max_ nan_to_num masked_fill masked_fill_
__eq__ __ne__ __lt__ __le__ __gt__ __ge__ eq ne lt le gt ge __and__ __or__ __invert__ logical_and
logical_or logical_not
relu relu_ relu6 hardtanh hardtanh_ hardswish hardswish_ hardsigmoid hardsigmoid_ silu silu_ gelu
leaky_relu leaky_relu_ elu elu_ selu celu mish sigmoid sigmoid_ tanh tanh_ softplus threshold
threshold_ prelu logsigmoid
to type type_as float half bfloat16 double contiguous clone detach detach_ cpu cuda requires_grad_
zeros_like ones_like empty_like full_like copy_ fill_ zero_
""".split()

# Ops returning metadata (shapes, dtypes, ...) rather than tensors.
_METADATA = """
size shape dim ndim ndimension dtype device is_contiguous numel nelement requires_grad is_cuda layout
stride element_size is_floating_point is_complex get_device __len__ data_ptr storage_offset grad_fn
is_leaf _version __hash__ __repr__ __format__ __reduce_ex__ names is_sparse is_quantized is_meta
""".split()


def elementwise(ex, name, func, args, kwargs):
    spatial = spatial_args(args, kwargs)
    halos = {a.bc_halo for a in spatial}
    layouts = {a.bc_spatial_dims for a in spatial}
    if len(halos) > 1:
        ex.unsupported(name, "it combines feature maps padded differently by F.pad")
    if len(layouts) > 1:
        ex.unsupported(name, "it combines feature maps of different layouts (e.g. channels-last and "
                             "(N, C, H, W))")
    if spatial:
        args, kwargs = ex.broadcast_vectors(args, kwargs)
    return wrap_result(call(func, args, kwargs), SPATIAL if spatial else VECTOR,
                       halos.pop() if halos else None, layouts.pop() if layouts else STANDARD_DIMS)


def metadata(ex, name, func, args, kwargs):
    return call(func, args, kwargs)


def batch_norm(ex, name, func, args, kwargs):
    (training,) = bind(args[5:], {k: v for k, v in kwargs.items() if k == "training"}, ["training"], [False])
    if training:
        ex.unsupported(name, "BatchNorm in training mode normalises with statistics of the batch of tiles; "
                             "call .eval() on the model")
    x = args[0] if args else kwargs["input"]
    if 1 in position_dims(x):
        ex.unsupported(name, f"its channel dim (1) is a spatial dim of the {tuple(x.shape)} map "
                             "(channels-last); permute it back to (N, C, H, W) first")
    return elementwise(ex, name, func, args, kwargs)


def layer_norm(ex, name, func, args, kwargs):
    """LayerNorm is position-wise when it normalises trailing channel dims only (channels-last maps)."""
    x, shape = bind(args, kwargs, ["input", "normalized_shape"], [None, None])
    count = 1 if isinstance(shape, int) else len(shape)
    if set(range(x.dim() - count, x.dim())) & position_dims(x):
        ex.unsupported(name, f"it normalises the last {count} dims of a {tuple(x.shape)} map, which include "
                             "its batch or spatial dims; LayerNorm keeps positions apart only over channel "
                             "dims, e.g. on a channels-last map after permute(0, 2, 3, 1)")
    return elementwise(ex, name, func, args, kwargs)


def dropout(ex, name, func, args, kwargs):
    _, p, training = bind(args, kwargs, ["input", "p", "training"], [None, 0.5, True])
    if training and p > 0:
        ex.unsupported(name, "dropout is active (training mode); call .eval() on the model")
    return elementwise(ex, name, func, args, kwargs)


def _check_channel_dim(ex, name, x: Activation, dim):
    """Ops along one dim are position-wise along any dim but the batch and the spatial dims."""
    if dim is None:
        ex.unsupported(name, "no dim given: it would act across all dims, spatial positions included")
    d = dim % x.dim()
    if d == 0:
        ex.unsupported(name, "it acts across the batch dim")
    if d in position_dims(x):
        ex.unsupported(name, f"it acts along dim {dim}, a spatial dim; only channel dims keep positions apart")


def concatenate(ex, name, func, args, kwargs):
    tensors, dim = bind(args, kwargs, ["tensors", "dim"], [None, 0])
    acts = [t for t in tensors if isinstance(t, Activation)]
    _check_channel_dim(ex, name, acts[0], dim)
    if len({(a.bc_halo, a.bc_role, a.bc_spatial_dims) for a in acts}) > 1:
        ex.unsupported(name, "it concatenates maps of different kinds (padded/unpadded, map/vector, layouts)")
    return wrap_result(call(func, args, kwargs), acts[0].bc_role, acts[0].bc_halo, acts[0].bc_spatial_dims)


def split_along(ex, name, func, args, kwargs):
    names = {"chunk": ["input", "chunks", "dim"], "unbind": ["input", "dim"]}.get(
        name, ["input", "split_size_or_sections", "dim"])
    values = bind(args, kwargs, names, [None] * (len(names) - 1) + [0])
    x = args[0] if args else kwargs.get(names[0])
    _check_channel_dim(ex, name, x, values[-1])
    return wrap_result(call(func, args, kwargs), x.bc_role, x.bc_halo, x.bc_spatial_dims)


def channel_op(ex, name, func, args, kwargs):
    """softmax / log_softmax / channel reductions: position-wise when taken along channel dims."""
    x, dim = bind(args, kwargs, ["input", "dim"], [None, None])
    if dim is None:
        ex.unsupported(name, "no dim given: it would act across all dims, spatial positions included")
    for d in normalize_dims(dim, x.dim()):
        _check_channel_dim(ex, name, x, d)
    return elementwise(ex, name, func, args, kwargs)


def reshape_like(ex, name, func, args, kwargs):
    """view / reshape / flatten / squeeze / ...: allowed while positions and the batch dim stay put.

    (N, C, H, W) maps may reshape the dims before (H, W) (e.g. a channel shuffle), channels-last maps the
    channel dims after W."""
    x = args[0]
    out = call(func, args, kwargs)
    same_batch = out.dim() >= 1 and out.shape[0] == x.shape[0]
    if x.bc_role == VECTOR:
        if not same_batch:
            ex.unsupported(name, "it reshapes across the batch dim")
        return wrap_result(out, VECTOR)
    if x.bc_spatial_dims == STANDARD_DIMS:
        kept, layout = same_batch and out.dim() >= 3 and out.shape[-2:] == x.shape[-2:], STANDARD_DIMS
    else:
        w = spatial_dims(x)[1]
        kept, layout = out.shape[:w + 1] == x.shape[:w + 1], tuple(d - out.dim() for d in spatial_dims(x))
    if not kept:
        ex.unsupported(name, f"it reshapes a feature map {tuple(x.shape)} to {tuple(out.shape)}, mixing "
                             "spatial positions (or the batch of blocks)")
    return wrap_result(out, SPATIAL, x.bc_halo, layout)


def permute_like(ex, name, func, args, kwargs):
    x = args[0]
    nd = x.dim()
    if name == "permute":
        dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else \
            (args[1] if len(args) > 1 else kwargs["dims"])
        perm = [d % nd for d in dims]
    else:
        d0, d1 = bind(args[1:], kwargs, ["dim0", "dim1"], [0, 1]) if name != "t" else (0, 1)
        perm = list(range(nd))
        perm[d0 % nd], perm[d1 % nd] = perm[d1 % nd], perm[d0 % nd]
    if perm[0] != 0:
        ex.unsupported(name, f"it moves the batch dim (permutation {perm})")
    if x.bc_role == VECTOR:
        return wrap_result(call(func, args, kwargs), VECTOR)
    # H and W may move (e.g. to channels-last) but W must stay after H: swapping them would transpose
    # each tile while the tile keeps its place in the grid.
    h, w = (perm.index(d) for d in spatial_dims(x))
    if h > w:
        ex.unsupported(name, f"it swaps the H and W dims (permutation {perm}), transposing the map")
    return wrap_result(call(func, args, kwargs), SPATIAL, x.bc_halo, (h - nd, w - nd))


def getitem(ex, name, func, args, kwargs):
    """Indexing keeps positions apart when the batch dim stays whole and H and W are either whole or
    sampled block-aligned, ``x[..., a::s, b::s]`` with 0 <= a, b < s and s dividing the tile size
    (space-to-depth, e.g. YOLOX's Focus stem); channel dims may be indexed freely."""
    x, key = args
    key = key if isinstance(key, tuple) else (key,)

    def refuse(why):
        ex.unsupported(name, f"indexing with {key!r} {why}")

    indexed = sum(k is not None and k is not Ellipsis for k in key)
    if indexed > x.dim():  # torch's own IndexError
        return call(func, args, kwargs)
    entries = []  # one per input dim (Ellipsis expanded, trailing dims added), plus the new dims (None)
    for k in key:
        entries.extend([slice(None)] * (x.dim() - indexed) if k is Ellipsis else [k])
    if not any(k is Ellipsis for k in key):
        entries.extend([slice(None)] * (x.dim() - indexed))
    advanced = [k for k in entries if isinstance(k, (torch.Tensor, list))]
    if advanced and (len(advanced) > 1 or any(isinstance(k, numbers.Integral) for k in entries)
                     or (isinstance(advanced[0], torch.Tensor) and advanced[0].dim() != 1)):
        refuse("combines advanced indices, which may move dims; only one 1-D index tensor or list (and no "
               "int index) is supported")
    positions = position_dims(x)
    kept = {}  # batch and spatial dims -> (their dim in the result, their slice)
    in_dim = out_dim = 0
    for k in entries:
        if in_dim in positions and k is not None:
            if not isinstance(k, slice):
                refuse(f"picks single entries of dim {in_dim}, the batch dim or a spatial dim")
            kept[in_dim] = (out_dim, k)
        out_dim += not isinstance(k, numbers.Integral)
        in_dim += k is not None
    if kept[0][1] != slice(None):
        refuse("selects among the batch of blocks; the batch dim must stay whole")
    if x.bc_role == VECTOR:
        return wrap_result(call(func, args, kwargs), VECTOR)
    h, w = spatial_dims(x)
    samples = [kept[h][1], kept[w][1]]
    step = samples[0].step or 1
    if any(s.stop is not None or (s.step or 1) != step or not 0 <= (s.start or 0) < step for s in samples):
        refuse("crops or samples the spatial dims; only whole H and W or space-to-depth sampling "
               "x[..., a::s, b::s] with 0 <= a, b < s keep blocks apart")
    if step > 1:
        require_standard_layout(ex, name, x)
        if x.bc_halo is not None:
            refuse("samples a map padded by F.pad")
        tile = x.shape[h] * ex.geometry.block_size / ex.geometry.height if ex.dense_phase else x.shape[h]
        if tile % step:
            refuse(f"samples one pixel in {step} along H and W, which is not block-aligned: this map's "
                   f"tiles are {tile:g} px, not a multiple of {step}; use a block size that makes them one")
    out = call(func, args, kwargs)
    if step > 1:
        ex.check_scaled(name, x, out, down=(step, step))
    return wrap_result(out, SPATIAL, x.bc_halo, (kept[h][0] - out_dim, kept[w][0] - out_dim))


def linear(ex, name, func, args, kwargs):
    x = args[0] if args else kwargs["input"]
    if x.bc_role == SPATIAL and x.bc_spatial_dims[1] == -1:
        ex.unsupported(name, "a Linear layer on a (N, C, H, W) feature map mixes positions along its last "
                             "(width) axis; only channels-last maps (after permute(0, 2, 3, 1)) and pooled "
                             "per-stream vectors may go through Linear layers")
    out = call(func, args, kwargs)
    ex.add_macs(linear_macs(out, x))
    return wrap_result(out, result_role(args, kwargs), x.bc_halo, x.bc_spatial_dims)


HANDLERS = {name: elementwise for name in _ELEMENTWISE}
HANDLERS.update({name: metadata for name in _METADATA})
HANDLERS.update({
    "batch_norm": batch_norm,
    "layer_norm": layer_norm,
    "dropout": dropout, "dropout2d": dropout, "alpha_dropout": dropout, "feature_alpha_dropout": dropout,
    "cat": concatenate, "concat": concatenate, "concatenate": concatenate,
    "chunk": split_along, "split": split_along, "split_with_sizes": split_along, "unbind": split_along,
    "tensor_split": split_along,
    "softmax": channel_op, "log_softmax": channel_op, "sum": channel_op, "amax": channel_op,
    "amin": channel_op, "argmax": channel_op, "argmin": channel_op,
    "view": reshape_like, "reshape": reshape_like, "flatten": reshape_like, "unflatten": reshape_like,
    "squeeze": reshape_like, "unsqueeze": reshape_like, "expand": reshape_like, "expand_as": reshape_like,
    "view_as": reshape_like, "reshape_as": reshape_like,
    "permute": permute_like, "transpose": permute_like, "swapaxes": permute_like, "t": permute_like,
    "__getitem__": getitem,
    "linear": linear,
})
