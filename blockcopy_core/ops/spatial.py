"""Ops with spatial extent: convolutions, pooling, padding and upsampling.

On a dense frame they run unchanged (and their input is stored as the layer's state). On tiles, an op
that reads beyond its tile gathers the tile with a halo from the layer's state and runs with zero
padding: a window op with extent e, stride s and leading padding p needs p pixels before the tile and
e - s - p after it, and then yields exactly the T / s output pixels of the tile. Ops that stay inside
their tile (1x1 convolutions, nearest upsampling) need no state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..activation import SPATIAL, VECTOR, plain, wrap
from ..macs import conv_macs, conv_transpose_macs
from ..tiles import memory_format_of
from .common import bind, call, pair, require_standard_layout, with_input

Halo = tuple[int, int, int, int]  # left, right, top, bottom


def _same_padding(kernel, dilation):
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    return [(t // 2, t - t // 2) for t in total]


def _dense_padding(padding, kernel, dilation) -> list[tuple[int, int]]:
    """[(top, bottom), (left, right)] of a conv/pool padding argument."""
    if padding == "valid":
        return [(0, 0), (0, 0)]
    if padding == "same":
        return _same_padding(kernel, dilation)
    ph, pw = pair(padding)
    return [(ph, ph), (pw, pw)]


def _window_halo(kernel, stride, dilation, padding) -> Halo:
    """Halo (left, right, top, bottom) a window op needs around a tile to produce its output tile."""
    after = []
    for k, s, d, (before, _) in zip(kernel, stride, dilation, padding):
        after.append(max(d * (k - 1) + 1 - s - before, 0))
    return (padding[1][0], after[1], padding[0][0], after[0])


def _run_window(ex, name, x, run_dense, run_tiles, kernel, stride, dilation, padding,
                border="constant", value=0.0, run_taps=None):
    """Run a conv/pool-like op on ``x`` (dense map or tiles): ``run_dense(map)`` with the op's own
    padding, ``run_tiles(tiles)`` with zero padding; ``run_taps(windows, T)`` (convolutions) on the
    windows of :func:`blockcopy_core.tiles.gather_tap_windows` where those are smaller than the halo'd
    tiles."""
    require_standard_layout(ex, name, x)
    if x.bc_halo is not None:  # grown by F.pad: the op itself must not pad again
        if any(p for pp in padding for p in pp):
            ex.unsupported(name, "it pads a map that F.pad already padded")
        out = run_tiles(plain(x))
        ex.check_scaled(name, x, out, down=stride)
        return out
    halo = _window_halo(kernel, stride, dilation, padding)
    if ex.dense_phase:
        # The op reads the stored copy (same values): in a compiled dense frame the producer of x then
        # writes the layer's state directly, instead of x and then a copy of it.
        out = run_dense(ex.site(name).store(x) if any(halo) else plain(x))
        ex.check_scaled(name, x, out, down=stride)
        return out
    tiles = plain(x)
    if any(halo):
        site, t = ex.site(name), tiles.shape[-1]
        if run_taps is not None and _taps_pay(tiles, kernel, stride, halo):
            site.update(tiles, ex.index)
            return run_taps(site.gather_taps(ex.index, t, kernel, dilation, (padding[0][0], padding[1][0])), t)
        tiles = site.update_and_gather(tiles, ex.index, halo, border, value, ex.tile_map)
    return run_tiles(tiles)


def _taps_pay(tiles, kernel, stride, halo: Halo) -> bool:
    """Whether a stride-1 convolution reads fewer pixels per tile as one window per tap than as a halo'd
    tile (dilation beyond the tile size). On the CPU only, eager or compiled: there the gathers' copies
    dominate the overhead (DeepLabV3, 512x1024, 13 of 32 blocks, one thread: eager frame 4.45 -> 3.62 s,
    compiled 5.12 -> 4.47 s), while on CUDA the fused halo gather is one bandwidth-bound kernel."""
    t = tiles.shape[-1]
    left, right, top, bottom = halo
    return tiles.device.type == "cpu" and tuple(stride) == (1, 1) \
        and kernel[0] * kernel[1] * t * t < (t + top + bottom) * (t + left + right)


def _conv_tiles(tiles, weight, bias, stride, dilation, groups):
    """A convolution of halo-grown tiles (no padding). A 3-channel half-precision channels_last input
    (the RGB frame) is given a zero fourth channel, with zero weights: the same sums, but cuDNN has no
    fast kernel for 3-channel tiles of these sizes (on an H200, ResNet's 7x7 stem on 160 fp16 tiles
    of 133x133: 0.33 ms with 3 channels, 0.09 ms with 4)."""
    if tiles.is_cuda and groups == 1 and tiles.shape[1] == 3 and tiles.dtype in (torch.float16, torch.bfloat16) \
            and tiles.is_contiguous(memory_format=torch.channels_last):
        tiles = F.pad(tiles, (0, 0, 0, 0, 0, 1)).contiguous(memory_format=torch.channels_last)
        weight = F.pad(weight, (0, 0, 0, 0, 0, 1)).contiguous(memory_format=torch.channels_last)
    return F.conv2d(tiles, weight, bias, stride, 0, dilation, groups)


def conv2d(ex, name, func, args, kwargs):
    x, weight, bias, stride, padding, dilation, groups = bind(
        args, kwargs, ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
        [None, None, None, 1, 0, 1, 1])
    kernel, stride, dilation = tuple(weight.shape[-2:]), pair(stride), pair(dilation)
    pads = _dense_padding(padding, kernel, dilation)
    if x.bc_role == VECTOR:
        if kernel != (1, 1) or any(p for pp in pads for p in pp):
            ex.unsupported(name, "a spatial kernel is applied to a pooled per-stream vector")
        out = call(func, args, kwargs)
    else:
        out = _run_window(
            ex, name, x, lambda t: call(func, *with_input(args, kwargs, t)),
            lambda t: _conv_tiles(t, weight, bias, stride, dilation, groups),
            kernel, stride, dilation, pads,
            run_taps=lambda windows, t: F.conv2d(windows, weight, bias, 1, 0, (t, t), groups))
    ex.add_macs(conv_macs(out, weight))
    return wrap(out, x.bc_role)


def conv_transpose2d(ex, name, func, args, kwargs):
    x, weight, bias, stride, padding, output_padding, groups, dilation = bind(
        args, kwargs, ["input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"],
        [None, None, None, 1, 0, 0, 1, 1])
    if x.bc_role != SPATIAL or x.bc_halo is not None:
        ex.unsupported(name, "transposed convolution needs an unpadded feature map")
    require_standard_layout(ex, name, x)
    kernel, stride, padding, dilation = tuple(weight.shape[-2:]), pair(stride), pair(padding), pair(dilation)
    if ex.dense_phase:
        out = call(func, args, kwargs)
        ex.check_scaled(name, x, out, up=stride)
        ex.site(name).store(x)
        ex.add_macs(conv_transpose_macs(x, weight))
        return wrap(out, SPATIAL)
    # Output pixel o = s*i - p + d*j reads input i in [o/s - (d(k-1) - p)/s, (o + p)/s]: a tile's outputs
    # need `before` inputs ahead of the tile and `after` behind it; the full (padding 0) result of the
    # grown tile is then cropped from s*before + p.
    before = [max(math.floor((d * (k - 1) - p) / s), 0) for k, s, p, d in zip(kernel, stride, padding, dilation)]
    after = [(s - 1 + p) // s for s, p in zip(stride, padding)]
    tiles = plain(x)
    t = tiles.shape[-1]
    grown = ex.site(name).update_and_gather(tiles, ex.index, (before[1], after[1], before[0], after[0]),
                                            tile_map=ex.tile_map)
    full = F.conv_transpose2d(grown, weight, bias, stride, 0, 0, groups, dilation)
    start = [s * b + p for s, b, p in zip(stride, before, padding)]
    size = [s * t for s in stride]
    if any(st + sz > f for st, sz, f in zip(start, size, full.shape[-2:])):
        ex.unsupported(name, f"kernel {kernel} with stride {stride} leaves gaps between tiles")
    ex.add_macs(conv_transpose_macs(grown, weight))
    out = full[..., start[0]:start[0] + size[0], start[1]:start[1] + size[1]]
    return wrap(out.contiguous(memory_format=memory_format_of(grown)), SPATIAL)


def max_pool2d(ex, name, func, args, kwargs):
    x, kernel, stride, padding, dilation, ceil_mode, return_indices = bind(
        args, kwargs, ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"],
        [None, None, None, 0, 1, False, False])
    if return_indices:
        ex.unsupported(name, "pooling indices refer to dense positions")
    kernel = pair(kernel)
    stride = pair(stride) if stride not in (None, []) else kernel
    dilation = pair(dilation)
    out = _run_window(ex, name, x, lambda t: call(func, *with_input(args, kwargs, t)),
                      lambda t: F.max_pool2d(t, kernel, stride, 0, dilation),
                      kernel, stride, dilation, _dense_padding(padding, kernel, dilation),
                      border="constant", value=float("-inf"))
    return wrap(out, SPATIAL)


def _pooled_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output length of a pooling window (torch's rule: a ceil_mode window must start inside the input
    or its leading padding)."""
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def avg_pool2d(ex, name, func, args, kwargs):
    x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override = bind(
        args, kwargs, ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                       "divisor_override"], [None, None, None, 0, False, True, None])
    kernel = pair(kernel)
    stride = pair(stride) if stride not in (None, []) else kernel
    pads = _dense_padding(padding, kernel, (1, 1))
    if ceil_mode and ex.dense_phase:
        # Windows are whole (and count_include_pad moot without padding) unless ceil_mode adds a last
        # one that hangs over the bottom/right border, averaged over the pixels it covers there only.
        size = tuple(x.shape[-2:])
        floor, ceil = ([_pooled_size(n, k, s, p, c) for n, k, s, (p, _) in zip(size, kernel, stride, pads)]
                       for c in (False, True))
        if floor != ceil:
            ex.unsupported(name, f"ceil_mode=True pools the {size[0]}x{size[1]} map to {ceil[0]}x{ceil[1]} "
                                 f"instead of {floor[0]}x{floor[1]}: its last window overhangs the border and "
                                 "averages fewer pixels there than a tile's halo holds; only ceil_mode that "
                                 "leaves the output size unchanged is supported")
    if not count_include_pad and any(p for pp in pads for p in pp):
        ex.unsupported(name, "count_include_pad=False divides by a border-dependent count")
    out = _run_window(ex, name, x, lambda t: call(func, *with_input(args, kwargs, t)),
                      lambda t: F.avg_pool2d(t, kernel, stride, 0, divisor_override=divisor_override),
                      kernel, stride, (1, 1), pads)
    return wrap(out, SPATIAL)


def pad(ex, name, func, args, kwargs):
    x, pads, mode, value = bind(args, kwargs, ["input", "pad", "mode", "value"], [None, None, "constant", None])
    pads = tuple(pads) + (0,) * (4 - len(pads))
    if x.bc_role != SPATIAL or x.bc_halo is not None or len(pads) != 4 or min(pads) < 0:
        ex.unsupported(name, f"padding {tuple(pads)} of a {'padded ' if x.bc_halo else ''}map; only "
                             "non-negative (left, right, top, bottom) padding of a feature map before a "
                             "convolution or pooling is supported")
    require_standard_layout(ex, name, x)
    if ex.dense_phase:
        ex.site(name).store(x)
        return wrap(call(func, args, kwargs), SPATIAL, pads)
    grown = ex.site(name).update_and_gather(plain(x), ex.index, pads, mode,
                                            0.0 if value is None else value, ex.tile_map)
    return wrap(grown, SPATIAL, pads)


def _upsample(ex, name, x, run_dense, run, factor, halo_px: Halo, border="replicate"):
    """Upsample tiles by an integer ``factor``: ``run`` on the tile grown by ``halo_px``, then crop."""
    require_standard_layout(ex, name, x)
    if ex.dense_phase:
        out = run_dense()
        ex.check_scaled(name, x, out, up=(factor, factor))
        if any(halo_px):
            ex.site(name).store(x)
        return wrap(out, SPATIAL)
    tiles = plain(x)
    t = tiles.shape[-1]
    if any(halo_px):
        tiles = ex.site(name).update_and_gather(tiles, ex.index, halo_px, border, tile_map=ex.tile_map)
    out = run(tiles)
    left, _, top, _ = halo_px
    out = out[..., top * factor:(top + t) * factor, left * factor:(left + t) * factor]
    return wrap(out.contiguous(memory_format=memory_format_of(tiles)), SPATIAL)


def _integer_factor(ex, name, x, size, scale_factor) -> int:
    in_h, in_w = x.shape[-2:]
    if size is not None:
        out_h, out_w = pair(size)
        factors = (out_h / in_h, out_w / in_w)
    else:
        factors = pair(scale_factor) if not isinstance(scale_factor, float) else (scale_factor, scale_factor)
    if factors[0] != factors[1] or factors[0] < 1 or int(factors[0]) != factors[0]:
        ex.unsupported(name, f"resizing by {factors} is not block-aligned; only upsampling by the same "
                             "integer factor in both dims is supported")
    return int(factors[0])


_RESIZE_HALO = {"nearest": 0, "nearest-exact": 0, "bilinear": 1, "bicubic": 2}


def _broadcast_vector(ex, name, func, args, kwargs, x, size):
    """Resizing a pooled (N, C, 1, 1) vector to a map's ``size`` repeats it at every position, whatever
    the mode (e.g. DeepLabV3's ASPP pooling branch): (N, C, H_l, W_l) on dense frames; on tiles ``size``
    is the tile's, and each (C, T_l, T_l) tile gets its own stream's vector."""
    if x.dim() != 4 or tuple(x.shape[-2:]) != (1, 1) or size is None:
        ex.unsupported(name, f"it resizes a per-stream vector of shape {tuple(x.shape)}; only a pooled "
                             "(N, C, 1, 1) vector resized to a feature map's size (size=x.shape[-2:]) is "
                             "supported")
    size = pair(size)
    ex.engine._check_stride(name, ex.module_path, size, ex.geometry, ex.dense_phase)
    if ex.dense_phase:
        return wrap(call(func, args, kwargs), SPATIAL)
    vectors = plain(x)[ex.index.stream]  # (K, C, 1, 1)
    return wrap(vectors.expand(-1, -1, *size).contiguous(), SPATIAL)


def interpolate(ex, name, func, args, kwargs):
    x, size, scale_factor, mode, align_corners, _, antialias = bind(
        args, kwargs, ["input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                       "antialias"], [None, None, None, "nearest", None, None, False])
    if x.bc_role == VECTOR:
        return _broadcast_vector(ex, name, func, args, kwargs, x, size)
    if x.bc_halo is not None:
        ex.unsupported(name, "it resizes a padded map")
    if mode not in _RESIZE_HALO or align_corners or antialias:
        ex.unsupported(name, f"mode={mode!r}, align_corners={align_corners}, antialias={antialias}: only "
                             "nearest, bilinear and bicubic upsampling with align_corners=False are "
                             "translation-invariant")
    factor = _integer_factor(ex, name, x, size, scale_factor)
    h = _RESIZE_HALO[mode]
    run = lambda t: F.interpolate(t, scale_factor=factor, mode=mode,
                                  align_corners=False if h else None)
    return _upsample(ex, name, x, lambda: call(func, args, kwargs), run, factor, (h, h, h, h))


def resize_bilinear_tf(ex, name, func, args, kwargs):
    x, scale_factor = bind(args, kwargs, ["x", "scale_factor"], [None, None])
    if x.bc_role != SPATIAL or x.bc_halo is not None:
        ex.unsupported(name, "it resizes a padded map or a per-stream vector")
    factor = _integer_factor(ex, name, x, None, scale_factor)
    run = lambda t: func(t, factor)
    return _upsample(ex, name, x, lambda: call(func, args, kwargs), run, factor, (0, 1, 0, 1))


HANDLERS = {
    "conv2d": conv2d,
    "conv_transpose2d": conv_transpose2d,
    "max_pool2d": max_pool2d,
    "avg_pool2d": avg_pool2d,
    "pad": pad,
    "interpolate": interpolate,
    "upsample": interpolate,
    "resize_bilinear_tf": resize_bilinear_tf,
}
