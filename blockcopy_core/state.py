"""Per-layer dense state: the block-sparse engine's memory of every op that needs spatial context."""
from __future__ import annotations

import torch

from .activation import plain
from .grid import TileIndex
from .tiles import gather_tap_windows, gather_tiles, scatter_tiles, update_and_gather
from .timing import OverheadTimer


class LayerState:
    """The dense input map of one spatial op call site, kept across the frames of a clip.

    Each executed block writes its fresh input tile here; blocks that are not executed keep the values
    of their last execution. Reading a tile *with its halo* from this map therefore gives block padding:
    current features where the neighbour executed this frame, stored ones where it did not, and the
    op's own border fill outside the image.
    """

    def __init__(self, op: str, module_path: str, timer: OverheadTimer):
        self.op = op
        self.module_path = module_path
        self.timer = timer  # the engine's, shared by all sites
        self.dense: torch.Tensor | None = None  # (N, C, H_l, W_l)

    def store(self, dense: torch.Tensor) -> torch.Tensor:
        """Replace the whole map by a dense (N, C, H_l, W_l) input (a fully executed frame); returns the
        stored map."""
        with self.timer:
            if self.dense is None or self.dense.shape != dense.shape or self.dense.dtype != dense.dtype:
                self.dense = plain(dense).detach().clone()
            else:
                self.dense.copy_(plain(dense))
        return self.dense

    def update(self, tiles: torch.Tensor, index: TileIndex) -> None:
        """Write the executed (K, C, T, T) input tiles into the map."""
        with self.timer:
            scatter_tiles(self.dense, tiles, index)

    def update_and_gather(self, tiles: torch.Tensor, index: TileIndex, halo: tuple[int, int, int, int],
                          border: str = "constant", value: float = 0.0,
                          tile_map: torch.Tensor | None = None) -> torch.Tensor:
        """``update`` then ``gather`` of the same blocks (one fused pass where the kernels have one)."""
        with self.timer:
            return update_and_gather(self.dense, tiles, index, halo, border, value, tile_map)

    def gather_taps(self, index: TileIndex, tile_size: int, kernel: tuple[int, int], dilation: tuple[int, int],
                    before: tuple[int, int]) -> torch.Tensor:
        """The window of each kernel tap of a stride-1 convolution, per executed tile (see
        :func:`blockcopy_core.tiles.gather_tap_windows`): (K, C, k_h*T, k_w*T)."""
        with self.timer:
            return gather_tap_windows(self.dense, index, tile_size, kernel, dilation, before)

    def gather(self, index: TileIndex, tile_size: int, halo: tuple[int, int, int, int],
               border: str = "constant", value: float = 0.0) -> torch.Tensor:
        """The executed tiles grown by ``halo`` (left, right, top, bottom): (K, C, T+t+b, T+l+r)."""
        with self.timer:
            return gather_tiles(self.dense, index, tile_size, halo, border, value)
