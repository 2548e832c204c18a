"""Ops that need the whole image: global pooling and GroupNorm, computed from the layer's dense state."""
from __future__ import annotations

import torch

from ..activation import SPATIAL, VECTOR, plain, spatial_dims, wrap
from .common import bind, call, normalize_dims, position_dims, require_standard_layout
from .pointwise import channel_op, elementwise


def _dense_input(ex, name, x):
    """The dense (N, C, H_l, W_l) map behind ``x``: the map itself on a dense frame, else its state."""
    if x.bc_halo is not None:
        ex.unsupported(name, "it follows F.pad; only a convolution or pooling may consume a padded map")
    require_standard_layout(ex, name, x)
    site = ex.site(name)
    if ex.dense_phase:
        site.store(x)
    else:
        site.update(x, ex.index)
    return site.dense


def _global(ex, name, x, reduce):
    """A per-stream vector from the dense map: (N, C, 1, 1) or (N, C)."""
    return wrap(reduce(_dense_input(ex, name, x)), VECTOR)


def mean(ex, name, func, args, kwargs):
    x, dim, keepdim = bind(args, kwargs, ["input", "dim", "keepdim"], [None, None, False])
    if x.bc_role != SPATIAL:
        return elementwise(ex, name, func, args, kwargs)
    dims = normalize_dims(dim, x.dim())
    if not set(dims) & position_dims(x):
        return channel_op(ex, name, func, args, kwargs)
    if dims != spatial_dims(x):
        ex.unsupported(name, f"a mean over dims {dims} mixes blocks; only a global mean over (H, W) or a "
                             "mean over channels is supported")
    return _global(ex, name, x, lambda d: d.mean(dim=(-2, -1), keepdim=keepdim))


def adaptive_pool(ex, name, func, args, kwargs):
    x, output_size = bind(args, kwargs, ["input", "output_size"], [None, None])
    if x.bc_role != SPATIAL:
        return elementwise(ex, name, func, args, kwargs)
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if size not in ((1, 1), (1,)):
        ex.unsupported(name, f"adaptive pooling to {output_size} is not block-aligned; only global pooling "
                             "(output size 1) is supported")
    if name == "adaptive_max_pool2d":
        return _global(ex, name, x, lambda d: d.amax(dim=(-2, -1), keepdim=True))
    return _global(ex, name, x, lambda d: d.mean(dim=(-2, -1), keepdim=True))


def group_norm(ex, name, func, args, kwargs):
    x, groups, weight, bias, eps = bind(args, kwargs, ["input", "num_groups", "weight", "bias", "eps"],
                                        [None, None, None, None, 1e-5])
    if x.bc_role != SPATIAL:
        return elementwise(ex, name, func, args, kwargs)
    dense = _dense_input(ex, name, x)
    if ex.dense_phase:
        return wrap(call(func, args, kwargs), SPATIAL)
    c = dense.shape[1]
    var, mu = _group_statistics(dense, groups)  # (N, G)
    # per channel (N, C, 1, 1), so that the tiles are normalised in their own memory layout
    inv_std, mu = (t.repeat_interleave(c // groups, dim=1)[:, :, None, None] for t in (torch.rsqrt(var + eps), mu))
    tiles = plain(x)
    stream = ex.index.stream
    out = ((tiles.to(mu.dtype) - mu[stream]) * inv_std[stream]).to(tiles.dtype)
    if weight is not None:
        out = out * weight.view(1, c, 1, 1)
    if bias is not None:
        out = out + bias.view(1, c, 1, 1)
    return wrap(out, SPATIAL)


def _group_statistics(dense: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean of each group of channels of a dense (N, C, H, W) map: (N, G) each, in fp32
    (fp64 for fp64 maps). Each channel's mean and variance (two passes) are reduced over a view of the
    map as it lies in memory, (N, H*W, C) for channels_last: grouping the channels first meant a
    transposed copy of the whole map there (one core, a 256-channel 128x256 map: 139 against 44 ms per
    call channels_last, 48 against 40 ms NCHW). The groups then combine their channels by the law of
    total variance (equal counts per channel): var_g = mean_c(var_c) + mean_c((mean_c - mean_g)^2)."""
    n, c = dense.shape[:2]
    compute = torch.promote_types(dense.dtype, torch.float32)  # fp16/bf16 statistics in fp32, fp64 in fp64
    if dense.is_contiguous() or not dense.is_contiguous(memory_format=torch.channels_last):
        flat, dim = dense.reshape(n, c, -1).to(compute), 2
    else:
        flat, dim = dense.permute(0, 2, 3, 1).reshape(n, -1, c).to(compute), 1
    mu = flat.mean(dim=dim)
    var = (flat - mu.unsqueeze(dim)).square().mean(dim=dim)
    var, mu = var.view(n, groups, c // groups), mu.view(n, groups, c // groups)
    group_mu = mu.mean(dim=-1, keepdim=True)
    return (var + (mu - group_mu).square()).mean(dim=-1), group_mu.squeeze(-1)


HANDLERS = {
    "mean": mean,
    "adaptive_avg_pool2d": adaptive_pool,
    "adaptive_max_pool2d": adaptive_pool,
    "group_norm": group_norm,
}
