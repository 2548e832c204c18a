"""Block grids: which blocks of a frame execute, as masks and as tile indices."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidInputError


@dataclass(frozen=True)
class FrameGeometry:
    """Size of the frames of a clip and of its block grid.

    ``batch`` streams of ``channels x height x width`` frames, cut into square blocks of
    ``block_size`` pixels: a grid of ``grid_height x grid_width`` blocks per stream.
    """

    batch: int
    channels: int
    height: int
    width: int
    block_size: int

    @property
    def grid_height(self) -> int:
        return self.height // self.block_size

    @property
    def grid_width(self) -> int:
        return self.width // self.block_size

    @property
    def blocks_per_frame(self) -> int:
        return self.grid_height * self.grid_width

    @property
    def grid_shape(self) -> tuple[int, int, int, int]:
        """Shape of an execution grid, (N, 1, H // block_size, W // block_size)."""
        return (self.batch, 1, self.grid_height, self.grid_width)

    @classmethod
    def of_frame(cls, frame: torch.Tensor, block_size: int) -> "FrameGeometry":
        """Geometry of a (N, C, H, W) frame batch; a clear error if blocks do not tile it."""
        if not isinstance(frame, torch.Tensor) or frame.dim() != 4:
            shape = tuple(frame.shape) if isinstance(frame, torch.Tensor) else type(frame).__name__
            raise InvalidInputError(f"frames must be a (N, C, H, W) tensor, got {shape}")
        if not frame.is_floating_point():
            raise InvalidInputError(f"frames must be floating point, got {frame.dtype}")
        n, c, h, w = frame.shape
        if h % block_size or w % block_size:
            raise InvalidInputError(
                f"frame size {h}x{w} (HxW) is not divisible by the block size {block_size}; "
                f"resize or pad frames to a multiple of {block_size} (e.g. "
                f"{-(-h // block_size) * block_size}x{-(-w // block_size) * block_size})")
        return cls(n, c, h, w, block_size)

    @classmethod
    def of_feature_maps(cls, maps: list[torch.Tensor], grid: torch.Tensor,
                        block_size: int) -> tuple["FrameGeometry", tuple[int, ...]]:
        """Geometry of the frames behind a set of (N, C_l, H_l, W_l) feature maps, and each map's stride.

        The frame size is the grid's (Gh * block_size, Gw * block_size); every map must be the frame
        scaled down by an integer stride s_l that divides the block size (its blocks are then
        block_size / s_l pixels), e.g. the levels of a feature pyramid fed to a detection head.
        """
        if not isinstance(grid, torch.Tensor) or grid.dim() != 4:
            raise InvalidInputError("feature-map inputs need the (N, 1, Gh, Gw) grid to fix the frame size, got "
                                    f"{tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(grid).__name__}")
        n, _, grid_h, grid_w = grid.shape
        height, width = grid_h * block_size, grid_w * block_size
        strides = []
        for i, fmap in enumerate(maps):
            if not isinstance(fmap, torch.Tensor) or fmap.dim() != 4 or not fmap.is_floating_point():
                what = f"{tuple(fmap.shape)} {fmap.dtype}" if isinstance(fmap, torch.Tensor) else type(fmap).__name__
                raise InvalidInputError(f"input #{i} must be a floating-point (N, C, H, W) feature map, got {what}")
            h, w = fmap.shape[-2:]
            stride = height // h if h else 0
            if fmap.shape[0] != n or not stride or h * stride != height or w * stride != width \
                    or block_size % stride:
                raise InvalidInputError(
                    f"input #{i} of shape {tuple(fmap.shape)} does not fit the grid {tuple(grid.shape)} of "
                    f"{block_size}-px blocks: every input must have N={n} and be the {height}x{width} frame "
                    "scaled by an integer stride that divides the block size")
            strides.append(stride)
        return cls(n, maps[0].shape[1], height, width, block_size), tuple(strides)

    def check_grid(self, grid: torch.Tensor, device: torch.device) -> None:
        """Raise a clear error unless ``grid`` is a bool (N, 1, Gh, Gw) tensor on ``device``."""
        if not isinstance(grid, torch.Tensor):
            raise InvalidInputError(f"grid must be a bool tensor, got {type(grid).__name__}")
        if grid.dtype != torch.bool:
            raise InvalidInputError(f"grid must have dtype torch.bool (True = execute), got {grid.dtype}")
        if tuple(grid.shape) != self.grid_shape:
            raise InvalidInputError(
                f"grid shape {tuple(grid.shape)} does not fit frames of {self.height}x{self.width} with "
                f"{self.block_size}-px blocks and N={self.batch}: expected {self.grid_shape}")
        if grid.device != device:
            raise InvalidInputError(f"grid is on {grid.device} but frames are on {device}")


@dataclass(frozen=True)
class TileIndex:
    """The executed blocks of one time step as K (stream, row, column) triples.

    Tiles are ordered as the True entries of the (N, 1, Gh, Gw) grid in row-major order.
    """

    stream: torch.Tensor  # (K,) int64
    row: torch.Tensor  # (K,) int64
    col: torch.Tensor  # (K,) int64

    @classmethod
    def from_grid(cls, grid: torch.Tensor) -> "TileIndex":
        """Index of the True blocks of a bool (N, 1, Gh, Gw) grid."""
        stream, _, row, col = grid.nonzero(as_tuple=True)
        return cls(stream, row, col)

    def __len__(self) -> int:
        return self.stream.numel()

    def triples(self) -> list[tuple[int, int, int]]:
        """The K (stream, row, column) triples as Python ints (read once per frame, for per-tile loops)."""
        if "_triples" not in self.__dict__:
            object.__setattr__(self, "_triples", list(zip(*(t.tolist() for t in (self.stream, self.row, self.col)))))
        return self.__dict__["_triples"]
