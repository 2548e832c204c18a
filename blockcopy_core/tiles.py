"""Moving tiles between dense per-layer state and batches of tiles.

A layer's *state* is a dense (N, C, Gh * T, Gw * T) tensor; its *tiles* are a (K, C, T, T) batch,
tile k covering block (stream[k], row[k], col[k]) of the grid. These are the engine's hot operations.

On CUDA tensors (float16, bfloat16, float32, float64; NCHW- or channels_last-contiguous state) they run
the kernels of ``kernels/`` (see :mod:`blockcopy_core.cuda_kernels`); elsewhere, or with
``BLOCKCOPY_DISABLE_CUDA_KERNELS=1``, the pure-PyTorch ``*_reference`` functions below, which define
the semantics and are the kernels' test oracle. On the CPU the moves copy whole windows, with the C++
kernels of ``kernels/cpu_tiles.cpp`` (:mod:`blockcopy_core.cpu_kernels`) or, without a compiler, one
PyTorch copy per tile. Both paths return gathered tiles in the state's memory
order (channels_last when the state is channels_last, for fast cuDNN convolutions on them).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import cpu_kernels, cuda_kernels
from .errors import InvalidInputError
from .grid import TileIndex

# How a gathered halo is filled outside the image: zeros (convolution), -inf (max pooling), or the
# border pixel repeated (interpolation clamps coordinates), or any mode F.pad knows.
BORDER_MODES = ("constant", "replicate", "reflect", "circular")

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_reference_only = False


@contextlib.contextmanager
def reference_moves():
    """Within this context every tile move runs its pure-PyTorch ``*_reference`` form: plain indexing
    ops that ``make_fx`` can trace and inductor can fuse (the CUDA kernels and the CPU per-tile loops
    are opaque to a tracer, and the loops read the tile index on the host)."""
    global _reference_only
    previous, _reference_only = _reference_only, True
    try:
        yield
    finally:
        _reference_only = previous


def reference_only() -> bool:
    """True inside :func:`reference_moves`."""
    return _reference_only


def extract_tiles(frames: torch.Tensor, index: TileIndex, tile_size: int) -> torch.Tensor:
    """Cut the executed blocks out of dense (N, C, H, W) maps: returns (K, C, T, T)."""
    return gather_tiles(frames, index, tile_size)


def scatter_tiles(state: torch.Tensor, tiles: torch.Tensor, index: TileIndex) -> None:
    """Write (K, C, T, T) tiles into their blocks of the dense (N, C, Gh*T, Gw*T) ``state``, in place."""
    kernels = _kernels(state)
    if kernels is None or tiles.device != state.device:
        if state.device.type == "cpu" and tiles.device == state.device and not _reference_only:
            _scatter_tiles_cpu(state, tiles, index)
        else:
            scatter_tiles_reference(state, tiles, index)
        return
    tiles = tiles.to(state.dtype).contiguous(memory_format=memory_format_of(state))
    kernels.scatter_tiles(state, tiles, *_index_tensors(index, state.device))


def gather_tiles(state: torch.Tensor, index: TileIndex, tile_size: int,
                 halo: tuple[int, int, int, int] = (0, 0, 0, 0), border: str = "constant",
                 value: float = 0.0) -> torch.Tensor:
    """Read the executed blocks of dense ``state`` with a halo around each.

    Args:
        state: (N, C, Gh*T, Gw*T) dense map.
        index: K executed blocks.
        tile_size: T, the block size at this map's resolution.
        halo: (left, right, top, bottom) pixels added around each tile; they come from the
            neighbouring blocks of ``state``, and outside the image from ``border``/``value``.
        border: F.pad mode used outside the image ("reflect" needs a halo smaller than the map,
            "circular" one no larger).
        value: fill value for ``border="constant"``.

    Returns:
        (K, C, T + top + bottom, T + left + right), in ``state``'s memory order.
    """
    _check_halo(state, halo, border)
    kernels = _kernels(state)
    if kernels is None:
        if state.device.type == "cpu" and (border in ("constant", "replicate") or not any(halo)) \
                and not _reference_only:
            return _gather_tiles_cpu(state, index, tile_size, halo, border, value)
        return gather_tiles_reference(state, index, tile_size, halo, border, value)
    return kernels.gather_tiles(state, *_index_tensors(index, state.device), tile_size, *halo, border,
                                float(value))


def update_and_gather(state: torch.Tensor, tiles: torch.Tensor, index: TileIndex,
                      halo: tuple[int, int, int, int] = (0, 0, 0, 0), border: str = "constant",
                      value: float = 0.0, tile_map: torch.Tensor | None = None) -> torch.Tensor:
    """``scatter_tiles(state, tiles, index)``, then ``gather_tiles`` of the same blocks with ``halo``.

    On CUDA with a channels_last state this is one pass (measured about 1.3x faster than the two
    calls; for NCHW states the two kernels run, the fused one being slower there): tile interiors come
    straight from ``tiles``, halo pixels from the tile of their block when that block is executed and
    from ``state`` otherwise. On the CPU the C++ kernels copy each tile row into the state and into the
    grown tile in one pass, then read only the halo rings from the state.

    Args:
        state: (N, C, Gh*T, Gw*T) dense map, updated in place.
        tiles: (K, C, T, T) fresh tiles of the K executed blocks.
        tile_map: :func:`block_tile_map` of ``index``; the same (N, Gh, Gw) map serves every layer of
            a frame (all share the block grid), so build it once per frame. Built here when None.

    Returns:
        (K, C, T + top + bottom, T + left + right), in ``state``'s memory order.
    """
    _check_halo(state, halo, border)
    t = tiles.shape[-1]
    kernels = _kernels(state)
    aligned = tiles.device == state.device and state.shape[-2] % t == 0 and state.shape[-1] % t == 0
    fused = kernels is not None and aligned and memory_format_of(state) == torch.channels_last
    if not fused:
        cpu = _cpu_kernels(state) if state.device.type == "cpu" and aligned and not _reference_only else None
        if cpu is not None and (border in ("constant", "replicate") or not any(halo)):
            return _update_and_gather_cpu(cpu, state, tiles, index, halo, border, value)
        scatter_tiles(state, tiles, index)
        return gather_tiles(state, index, t, halo, border, value)
    if tile_map is None:
        tile_map = block_tile_map(index, (state.shape[0], state.shape[2] // t, state.shape[3] // t))
    tiles = tiles.to(state.dtype).contiguous(memory_format=memory_format_of(state))
    return kernels.update_and_gather(state, tiles, *_index_tensors(index, state.device), tile_map, *halo,
                                     border, float(value))


def block_tile_map(index: TileIndex, grid_shape: tuple[int, int, int]) -> torch.Tensor:
    """(N, Gh, Gw) int32 map from each block to its tile number in ``index``, -1 where not executed."""
    device = index.stream.device
    numbers = torch.full(grid_shape, -1, dtype=torch.int32, device=device)
    numbers[index.stream, index.row, index.col] = torch.arange(len(index), dtype=torch.int32, device=device)
    return numbers


def scatter_tiles_reference(state: torch.Tensor, tiles: torch.Tensor, index: TileIndex) -> None:
    """Pure-PyTorch :func:`scatter_tiles`: one advanced-index assignment into ``state`` itself (not a view
    of it), which inductor turns into an in-place scatter when it compiles a traced frame (on a view it
    copied the whole state twice)."""
    t = tiles.shape[-1]
    steps = torch.arange(t, device=state.device)
    rows = (index.row * t)[:, None, None] + steps[:, None]  # (K, T, 1)
    cols = (index.col * t)[:, None, None] + steps  # (K, 1, T)
    state[index.stream[:, None, None], :, rows, cols] = tiles.to(state.dtype).permute(0, 2, 3, 1)


def gather_tiles_reference(state: torch.Tensor, index: TileIndex, tile_size: int,
                           halo: tuple[int, int, int, int] = (0, 0, 0, 0), border: str = "constant",
                           value: float = 0.0) -> torch.Tensor:
    """Pure-PyTorch :func:`gather_tiles` (pads a copy of the whole state)."""
    memory_format = memory_format_of(state)
    left, right, top, bottom = halo
    if any(halo):
        state = F.pad(state, (left, right, top, bottom), mode=border,
                      value=value if border == "constant" else None)
    steps_y = torch.arange(tile_size + top + bottom, device=state.device)
    steps_x = torch.arange(tile_size + left + right, device=state.device)
    rows = (index.row * tile_size)[:, None] + steps_y  # (K, Th) in padded coordinates
    cols = (index.col * tile_size)[:, None] + steps_x  # (K, Tw)
    tiles = state[index.stream[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (K, Th, Tw, C)
    return tiles.permute(0, 3, 1, 2).contiguous(memory_format=memory_format)


def _scatter_tiles_cpu(state: torch.Tensor, tiles: torch.Tensor, index: TileIndex) -> None:
    """:func:`scatter_tiles_reference` as block copies, one C++ call for all tiles (or, without the CPU
    kernels, one copy per tile): on the CPU, advanced-index assignment computes an offset per element and
    took longer than the tiles' convolutions."""
    t = tiles.shape[-1]
    tiles = tiles.to(state.dtype)
    kernels = _cpu_kernels(state)
    if kernels is not None:
        kernels.scatter_windows(state, tiles.contiguous(memory_format=memory_format_of(state)),
                                *_index_tensors(index, state.device))
        return
    for k, (stream, row, col) in enumerate(index.triples()):
        state[stream, :, row * t:(row + 1) * t, col * t:(col + 1) * t].copy_(tiles[k])


def _gather_tiles_cpu(state: torch.Tensor, index: TileIndex, tile_size: int, halo: tuple[int, int, int, int],
                      border: str, value: float) -> torch.Tensor:
    """:func:`gather_tiles_reference` for ``constant`` and ``replicate`` borders as one window copy per
    tile (one C++ call for all, or a copy per tile without the CPU kernels): no padded copy of the whole
    map, no per-element index arithmetic."""
    left, right, top, bottom = halo
    tile_h, tile_w = tile_size + top + bottom, tile_size + left + right
    out = torch.empty(len(index), state.shape[1], tile_h, tile_w, dtype=state.dtype, device=state.device,
                      memory_format=memory_format_of(state))
    kernels = _cpu_kernels(state)
    if kernels is not None:
        kernels.gather_windows(state, out, *_index_tensors(index, state.device), tile_size, top, left, tile_h,
                               tile_w, 0, 0, border == "replicate", float(value))
        return out
    for k, (stream, row, col) in enumerate(index.triples()):
        _copy_window(out[k], state[stream], row * tile_size - top, col * tile_size - left, border, value)
    return out


def _update_and_gather_cpu(kernels, state: torch.Tensor, tiles: torch.Tensor, index: TileIndex,
                           halo: tuple[int, int, int, int], border: str, value: float) -> torch.Tensor:
    """:func:`update_and_gather` by the C++ ``kernels`` (``constant`` and ``replicate`` borders)."""
    left, right, top, bottom = halo
    t = tiles.shape[-1]
    memory_format = memory_format_of(state)
    tiles = tiles.to(state.dtype).contiguous(memory_format=memory_format)
    out = torch.empty(len(index), state.shape[1], t + top + bottom, t + left + right, dtype=state.dtype,
                      device=state.device, memory_format=memory_format)
    kernels.update_gather_windows(state, tiles, out, *_index_tensors(index, state.device), left, right, top, bottom,
                                  border == "replicate", float(value))
    return out


def _cpu_kernels(state: torch.Tensor):
    """The CPU kernel module when it serves ``state`` (see :mod:`blockcopy_core.cpu_kernels`), else None."""
    if state.dtype not in _KERNEL_DTYPES or state.dim() != 4 \
            or not state.is_contiguous(memory_format=memory_format_of(state)):
        return None
    return cpu_kernels.load()


def _copy_window(out: torch.Tensor, frame: torch.Tensor, y0: int, x0: int, border: str, value: float) -> None:
    """Copy the (C, h, w) window of ``frame`` (C, H, W) at (y0, x0) into ``out``. The part of a window
    outside the image is filled with ``value`` or, for ``replicate``, by padding that window alone (a
    replicated border depends only on the edge pixels inside the window)."""
    height, width = frame.shape[-2:]
    h, w = out.shape[-2:]
    in_y0, in_y1 = min(max(y0, 0), height), max(min(y0 + h, height), 0)
    in_x0, in_x1 = min(max(x0, 0), width), max(min(x0 + w, width), 0)
    pad_top, pad_left = in_y0 - y0, in_x0 - x0
    pad_bottom, pad_right = y0 + h - in_y1, x0 + w - in_x1
    window = frame[:, in_y0:in_y1, in_x0:in_x1]
    if not (pad_top or pad_bottom or pad_left or pad_right):
        out.copy_(window)
    elif border == "constant" or not window.numel():
        out.fill_(value)
        out[:, pad_top:pad_top + in_y1 - in_y0, pad_left:pad_left + in_x1 - in_x0].copy_(window)
    else:
        out.copy_(F.pad(window[None], (pad_left, pad_right, pad_top, pad_bottom), mode="replicate")[0])


def gather_tap_windows(state: torch.Tensor, index: TileIndex, tile_size: int, kernel: tuple[int, int],
                       dilation: tuple[int, int], before: tuple[int, int]) -> torch.Tensor:
    """What a stride-1 convolution reads for each executed tile, one T x T window per kernel tap.

    Tap (a, b) of a kernel with dilation (d_h, d_w) and leading padding (p_h, p_w) reads, for the tile
    at (row, col), the T x T window starting at (row*T - p_h + a*d_h, col*T - p_w + b*d_w). The windows
    are laid side by side, tap (a, b) at rows a*T and columns b*T, zero outside the image, so that the
    convolution with dilation T and no padding of the result gives the tile's outputs. A halo gather
    reads (T + d_h(k_h-1)) x (T + d_w(k_w-1)) pixels instead: far more where the dilation exceeds the
    tile (DeepLab's ASPP: dilation 36 on 16-px tiles, 88x88 against 48x48).

    Returns:
        (K, C, k_h*T, k_w*T), in ``state``'s memory order.
    """
    (k_h, k_w), (d_h, d_w), (p_h, p_w), t = kernel, dilation, before, tile_size
    if _reference_only:
        return gather_tap_windows_reference(state, index, tile_size, kernel, dilation, before)
    if state.device.type != "cpu":  # slices of the halo gather (the CUDA kernels): exact, nothing saved
        halo = (p_w, d_w * (k_w - 1) - p_w, p_h, d_h * (k_h - 1) - p_h)
        grown = gather_tiles(state, index, t, halo)
        rows = [grown[..., a * d_h:a * d_h + t, :] for a in range(k_h)]
        return torch.cat([torch.cat([r[..., b * d_w:b * d_w + t] for b in range(k_w)], dim=-1) for r in rows],
                         dim=-2).contiguous(memory_format=memory_format_of(state))
    out = torch.empty(len(index), state.shape[1], k_h * t, k_w * t, dtype=state.dtype, device=state.device,
                      memory_format=memory_format_of(state))
    kernels = _cpu_kernels(state)
    if kernels is not None:
        tile_index = _index_tensors(index, state.device)
        for a in range(k_h):
            for b in range(k_w):
                kernels.gather_windows(state, out, *tile_index, t, p_h - a * d_h, p_w - b * d_w, t, t, a * t, b * t,
                                       False, 0.0)
        return out
    for k, (stream, row, col) in enumerate(index.triples()):
        for a in range(k_h):
            for b in range(k_w):
                _copy_window(out[k, :, a * t:(a + 1) * t, b * t:(b + 1) * t], state[stream],
                             row * t - p_h + a * d_h, col * t - p_w + b * d_w, "constant", 0.0)
    return out


def gather_tap_windows_reference(state: torch.Tensor, index: TileIndex, tile_size: int, kernel: tuple[int, int],
                                 dilation: tuple[int, int], before: tuple[int, int]) -> torch.Tensor:
    """Pure-PyTorch :func:`gather_tap_windows`: one indexing op reading only the taps' windows (zero outside
    the image by a mask, not by padding a copy of the state), which inductor compiles into one gather.
    Slicing a halo gather instead made a compiled DeepLabV3 frame slower than the eager engine on the CPU."""
    (k_h, k_w), (d_h, d_w), (p_h, p_w), t = kernel, dilation, before, tile_size
    height, width = state.shape[-2:]
    device = state.device
    steps = torch.arange(t, device=device)
    # tap a's window starts at row * T - p_h + a * d_h; laid out at rows a * T .. (a + 1) * T
    rows = ((index.row * t - p_h)[:, None, None] + (torch.arange(k_h, device=device) * d_h)[:, None]
            + steps).reshape(len(index), k_h * t)
    cols = ((index.col * t - p_w)[:, None, None] + (torch.arange(k_w, device=device) * d_w)[:, None]
            + steps).reshape(len(index), k_w * t)
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    windows = state[index.stream[:, None, None], :, rows.clamp(0, height - 1)[:, :, None],
                    cols.clamp(0, width - 1)[:, None, :]]  # (K, k_h*T, k_w*T, C)
    windows = torch.where(inside[..., None], windows, torch.zeros((), dtype=state.dtype, device=device))
    return windows.permute(0, 3, 1, 2).contiguous(memory_format=memory_format_of(state))


def memory_format_of(state: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels_last-contiguous state (not also NCHW-contiguous), else NCHW."""
    if not state.is_contiguous() and state.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _kernels(state: torch.Tensor):
    """The CUDA kernel module when it serves ``state``, else None (use the reference)."""
    if _reference_only or not state.is_cuda or state.dtype not in _KERNEL_DTYPES or state.dim() != 4:
        return None
    if not (state.is_contiguous() or state.is_contiguous(memory_format=torch.channels_last)):
        return None
    return cuda_kernels.load() if cuda_kernels.available() else None


def _index_tensors(index: TileIndex, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """stream, row, col as int64 on ``device``; strided views (columns of nonzero()) are kept as is."""
    return tuple(t if t.device == device and t.dtype == torch.int64 else t.to(device, torch.int64)
                 for t in (index.stream, index.row, index.col))


def _check_halo(state: torch.Tensor, halo: tuple[int, int, int, int], border: str) -> None:
    if border not in BORDER_MODES:
        raise InvalidInputError(f"border must be one of {BORDER_MODES}, got {border!r}")
    if len(halo) != 4 or min(halo) < 0:
        raise InvalidInputError(f"halo must be 4 non-negative ints (left, right, top, bottom), got {halo}")
    h, w = state.shape[-2:]
    most_x, most_y = max(halo[0], halo[1]), max(halo[2], halo[3])
    if border == "reflect" and (most_x >= w or most_y >= h):
        raise InvalidInputError(f"a reflect halo {halo} must be smaller than the {h}x{w} map")
    if border == "circular" and (most_x > w or most_y > h):
        raise InvalidInputError(f"a circular halo {halo} must not exceed the {h}x{w} map")
