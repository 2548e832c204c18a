"""Moving tiles between dense per-layer state and batches of tiles (reference, pure PyTorch).

A layer's *state* is a dense (N, C, Gh * T, Gw * T) tensor; its *tiles* are a (K, C, T, T) batch,
tile k covering block (stream[k], row[k], col[k]) of the grid. These are the engine's hot operations;
``kernels/`` holds their CUDA versions, which must match these exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .grid import TileIndex

# How a gathered halo is filled outside the image: zeros (convolution), -inf (max pooling), or the
# border pixel repeated (interpolation clamps coordinates), or any mode F.pad knows.
BORDER_MODES = ("constant", "replicate", "reflect", "circular")


def extract_tiles(frames: torch.Tensor, index: TileIndex, tile_size: int) -> torch.Tensor:
    """Cut the executed blocks out of dense (N, C, H, W) maps: returns (K, C, T, T)."""
    return gather_tiles(frames, index, tile_size)


def scatter_tiles(state: torch.Tensor, tiles: torch.Tensor, index: TileIndex) -> None:
    """Write (K, C, T, T) tiles into their blocks of the dense (N, C, Gh*T, Gw*T) ``state``, in place."""
    n, c, h, w = state.shape
    t = tiles.shape[-1]
    blocks = state.view(n, c, h // t, t, w // t, t)
    blocks[index.stream, :, index.row, :, index.col, :] = tiles.to(state.dtype)


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
        border: F.pad mode used outside the image.
        value: fill value for ``border="constant"``.

    Returns:
        (K, C, T + top + bottom, T + left + right).
    """
    left, right, top, bottom = halo
    if any(halo):
        state = F.pad(state, (left, right, top, bottom), mode=border,
                      value=value if border == "constant" else None)
    steps_y = torch.arange(tile_size + top + bottom, device=state.device)
    steps_x = torch.arange(tile_size + left + right, device=state.device)
    rows = (index.row * tile_size)[:, None] + steps_y  # (K, Th) in padded coordinates
    cols = (index.col * tile_size)[:, None] + steps_x  # (K, Tw)
    tiles = state[index.stream[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (K, Th, Tw, C)
    return tiles.permute(0, 3, 1, 2).contiguous()
