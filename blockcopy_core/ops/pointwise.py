"""Ops that act on each spatial position on its own: they run unchanged on dense maps and on tiles."""
from __future__ import annotations

from ..activation import SPATIAL, VECTOR, Activation
from ..macs import linear_macs
from .common import bind, call, normalize_dims, result_role, spatial_args, wrap_result

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
    if len(halos) > 1:
        ex.unsupported(name, "it combines feature maps padded differently by F.pad")
    if spatial:
        args, kwargs = ex.broadcast_vectors(args, kwargs)
    return wrap_result(call(func, args, kwargs), SPATIAL if spatial else VECTOR,
                       halos.pop() if halos else None)


def metadata(ex, name, func, args, kwargs):
    return call(func, args, kwargs)


def batch_norm(ex, name, func, args, kwargs):
    (training,) = bind(args[5:], {k: v for k, v in kwargs.items() if k == "training"}, ["training"], [False])
    if training:
        ex.unsupported(name, "BatchNorm in training mode normalises with statistics of the batch of tiles; "
                             "call .eval() on the model")
    return elementwise(ex, name, func, args, kwargs)


def dropout(ex, name, func, args, kwargs):
    _, p, training = bind(args, kwargs, ["input", "p", "training"], [None, 0.5, True])
    if training and p > 0:
        ex.unsupported(name, "dropout is active (training mode); call .eval() on the model")
    return elementwise(ex, name, func, args, kwargs)


def _check_channel_dim(ex, name, x: Activation, dim, default=None):
    """Ops along one dim are position-wise only along channels (dim 1); vectors: any dim but 0."""
    if dim is None:
        dim = default
    if dim is None:
        ex.unsupported(name, "no dim given: it would act across all dims, spatial positions included")
    d = dim % x.dim()
    if x.bc_role == SPATIAL and d != 1:
        ex.unsupported(name, f"it acts along dim {dim}; only the channel dim (1) keeps positions apart")
    if x.bc_role == VECTOR and d == 0:
        ex.unsupported(name, "it acts across the batch dim")


def concatenate(ex, name, func, args, kwargs):
    tensors, dim = bind(args, kwargs, ["tensors", "dim"], [None, 0])
    acts = [t for t in tensors if isinstance(t, Activation)]
    _check_channel_dim(ex, name, acts[0], dim)
    if len({a.bc_halo for a in acts}) > 1 or len({a.bc_role for a in acts}) > 1:
        ex.unsupported(name, "it concatenates maps of different kinds (padded/unpadded, map/vector)")
    return wrap_result(call(func, args, kwargs), acts[0].bc_role, acts[0].bc_halo)


def split_along(ex, name, func, args, kwargs):
    names = {"chunk": ["input", "chunks", "dim"], "unbind": ["input", "dim"]}.get(
        name, ["input", "split_size_or_sections", "dim"])
    values = bind(args, kwargs, names, [None] * (len(names) - 1) + [0])
    x = args[0] if args else kwargs.get(names[0])
    _check_channel_dim(ex, name, x, values[-1])
    return wrap_result(call(func, args, kwargs), x.bc_role, x.bc_halo)


def channel_op(ex, name, func, args, kwargs):
    """softmax / log_softmax / channel reductions: position-wise when taken along channels."""
    x, dim = bind(args, kwargs, ["input", "dim"], [None, None])
    if dim is None:
        ex.unsupported(name, "no dim given: it would act across all dims, spatial positions included")
    dims = normalize_dims(dim, x.dim())
    if len(dims) != 1:
        ex.unsupported(name, f"it reduces dims {dims} together; only the channel dim (1) keeps positions apart")
    _check_channel_dim(ex, name, x, dims[0])
    return elementwise(ex, name, func, args, kwargs)


def reshape_like(ex, name, func, args, kwargs):
    """view / reshape / flatten / squeeze / ...: allowed while positions and the batch dim stay put."""
    x = args[0]
    out = call(func, args, kwargs)
    same_batch = out.dim() >= 1 and out.shape[0] == x.shape[0]
    if x.bc_role == SPATIAL and not (same_batch and out.dim() >= 3 and out.shape[-2:] == x.shape[-2:]):
        ex.unsupported(name, f"it reshapes a feature map {tuple(x.shape)} to {tuple(out.shape)}, mixing "
                             "spatial positions (or the batch of blocks)")
    if x.bc_role == VECTOR and not same_batch:
        ex.unsupported(name, "it reshapes across the batch dim")
    return wrap_result(out, x.bc_role, x.bc_halo)


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
    fixed = [0, nd - 2, nd - 1] if x.bc_role == SPATIAL else [0]
    if any(perm[d] != d for d in fixed):
        ex.unsupported(name, f"it moves the batch or spatial dims (permutation {perm})")
    return wrap_result(call(func, args, kwargs), x.bc_role, x.bc_halo)


def getitem(ex, name, func, args, kwargs):
    x, key = args
    key = key if isinstance(key, tuple) else (key,)
    full = slice(None)

    def is_full(k):
        return isinstance(k, slice) and k == full

    spatial_ok = x.bc_role != SPATIAL or (len(key) <= x.dim() and all(is_full(k) for k in key[2:])
                                          and x.dim() - len(key) >= 0 and Ellipsis not in key)
    if not key or not is_full(key[0]) or not spatial_ok:
        ex.unsupported(name, f"indexing with {key!r} selects blocks or spatial positions; only channel "
                             "indexing x[:, c0:c1] is position-wise")
    return wrap_result(call(func, args, kwargs), x.bc_role, x.bc_halo)


def linear(ex, name, func, args, kwargs):
    x = args[0] if args else kwargs["input"]
    if x.bc_role == SPATIAL:
        ex.unsupported(name, "a Linear layer on a feature map mixes positions along its last (width) axis; "
                             "only pooled per-stream vectors may go through Linear layers")
    out = call(func, args, kwargs)
    ex.add_macs(linear_macs(out, x))
    return wrap_result(out, result_role(args, kwargs))


HANDLERS = {name: elementwise for name in _ELEMENTWISE}
HANDLERS.update({name: metadata for name in _METADATA})
HANDLERS.update({
    "batch_norm": batch_norm,
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
