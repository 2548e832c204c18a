"""What a block policy sees at frame t: the state S_t = {I_t, H_{t-1}, O_{t-1}, A_{t-1}}."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def block_grid_shape(height: int, width: int, block_size: int) -> tuple[int, int]:
    """The block grid ``(Gh, Gw) = (H // block_size, W // block_size)`` of an ``H x W`` frame.

    Raises:
        ValueError: when ``block_size`` is not positive or does not divide ``H`` and ``W``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    if height % block_size or width % block_size:
        raise ValueError(
            f"frame size {height}x{width} (HxW) is not divisible by the block size {block_size}; "
            "pad or crop the frame to a multiple of the block size"
        )
    return height // block_size, width // block_size


@dataclass(frozen=True)
class PolicyObservation:
    """The inputs of a block policy for one frame of N independent streams.

    Attributes:
        frame: I_t, (N, 3, H, W) float RGB in [0, 1].
        frame_state: H_{t-1}, (N, 3, H, W): every block holds the pixels of the frame at that block's
            last execution.
        prev_output: O_{t-1}, (N, C_out, H', W') per-class probability masks at any resolution.
        prev_grid: A_{t-1}, (N, 1, Gh, Gw) bool, the previous execution grid.
    """

    frame: torch.Tensor
    frame_state: torch.Tensor
    prev_output: torch.Tensor
    prev_grid: torch.Tensor

    def __post_init__(self) -> None:
        if self.frame.dim() != 4 or self.frame.shape[1] != 3:
            raise ValueError(f"frame must be (N, 3, H, W), got {tuple(self.frame.shape)}")
        if not self.frame.is_floating_point():
            raise ValueError(f"frame must be a float tensor in [0, 1], got {self.frame.dtype}")
        if self.frame_state.shape != self.frame.shape:
            raise ValueError(
                f"frame_state must have the frame's shape {tuple(self.frame.shape)}, "
                f"got {tuple(self.frame_state.shape)}"
            )
        streams = self.frame.shape[0]
        if self.prev_output.dim() != 4 or self.prev_output.shape[0] != streams:
            raise ValueError(
                f"prev_output must be (N={streams}, C_out, H', W'), got {tuple(self.prev_output.shape)}"
            )
        if self.prev_grid.dtype != torch.bool:
            raise ValueError(f"prev_grid must be a bool tensor, got {self.prev_grid.dtype}")
        if self.prev_grid.dim() != 4 or self.prev_grid.shape[:2] != (streams, 1):
            raise ValueError(f"prev_grid must be (N={streams}, 1, Gh, Gw), got {tuple(self.prev_grid.shape)}")

    @property
    def num_streams(self) -> int:
        """N, the number of streams."""
        return self.frame.shape[0]

    def grid_shape(self, block_size: int) -> tuple[int, int]:
        """The block grid ``(Gh, Gw)`` of this frame; checks that ``prev_grid`` has that shape."""
        grid = block_grid_shape(self.frame.shape[2], self.frame.shape[3], block_size)
        if tuple(self.prev_grid.shape[2:]) != grid:
            raise ValueError(
                f"prev_grid is {tuple(self.prev_grid.shape[2:])} blocks but a {tuple(self.frame.shape[2:])} "
                f"frame with {block_size}-px blocks has a {grid} grid"
            )
        return grid
