"""The interface shared by all block policies."""
from __future__ import annotations

import torch
from torch import nn

from .observation import PolicyObservation


def check_target(target: float) -> float:
    """tau as a float; raises ValueError unless 0 <= tau <= 1."""
    target = float(target)
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target fraction tau must be in [0, 1], got {target}")
    return target


class BlockPolicy(nn.Module):
    """Chooses, for every frame after a clip's first, which blocks the task network executes.

    Protocol per frame: ``grid = select(obs)``, run the task network on ``grid``, compute the block
    information gain, then ``observe(information_gain)``. The first frame of a clip is executed
    completely by the caller and goes through neither call. ``reset()`` starts a new clip.

    Subclasses implement ``_select`` and may extend ``_observe`` and ``reset``.

    Args:
        block_size: block side in pixels.
        target: tau, the target fraction of executed blocks in [0, 1]; settable at run time.
    """

    def __init__(self, block_size: int, target: float) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size}")
        self.block_size = block_size
        self.target = target
        self._last_grid: torch.Tensor | None = None

    @classmethod
    def config_settings(cls, config, output_channels: int) -> dict:
        """Constructor arguments beyond block size and target taken from a
        :class:`~blockcopy_core.config.BlockCopyConfig` (none for fixed policies)."""
        return {}

    @property
    def target(self) -> float:
        """tau, the target fraction of executed blocks."""
        return self._target

    @target.setter
    def target(self, value: float) -> None:
        self._target = check_target(value)

    def select(self, obs: PolicyObservation) -> torch.Tensor:
        """The blocks to execute at frame t.

        Args:
            obs: the state; its frame is (N, 3, H, W) with H, W multiples of ``block_size``.

        Returns:
            (N, 1, H // block_size, W // block_size) bool grid, True = execute.
        """
        grid_shape = obs.grid_shape(self.block_size)
        grid = self._select(obs, grid_shape)
        self._last_grid = grid
        return grid

    def observe(self, information_gain: torch.Tensor) -> dict:
        """Feedback for the grid last returned by ``select``.

        Args:
            information_gain: (N, 1, Gh, Gw) float block information gain of that frame.

        Returns:
            Statistics of the frame as 0-dim detached tensors (no host synchronisation), plus the
            bool ``updated`` (whether learned weights changed).
        """
        if self._last_grid is None:
            raise RuntimeError("observe() needs a preceding select() whose grid it gives feedback on")
        grid = self._last_grid
        if information_gain.shape != grid.shape:
            raise ValueError(
                f"information_gain must have the selected grid's shape {tuple(grid.shape)}, "
                f"got {tuple(information_gain.shape)}"
            )
        if not information_gain.is_floating_point():
            raise ValueError(f"information_gain must be a float tensor, got {information_gain.dtype}")
        self._last_grid = None
        return self._observe(information_gain.detach(), grid)

    def reset(self) -> None:
        """Start a new clip: forget per-clip state (a selection awaiting feedback), keep learned weights."""
        self._last_grid = None

    def _select(self, obs: PolicyObservation, grid_shape: tuple[int, int]) -> torch.Tensor:
        """The (N, 1, Gh, Gw) bool grid for ``obs``; ``grid_shape`` is (Gh, Gw)."""
        raise NotImplementedError

    def _observe(self, information_gain: torch.Tensor, grid: torch.Tensor) -> dict:
        """Statistics of a frame; ``information_gain`` (N, 1, Gh, Gw), ``grid`` the executed bool grid."""
        return {
            "executed_fraction": grid.float().mean(),
            "information_gain": information_gain.mean(),
            "updated": False,
        }

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, target={self.target}"
