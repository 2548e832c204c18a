"""Non-learning policies, each executing (on average) the target fraction tau of the blocks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import BlockPolicy
from .observation import PolicyObservation


def blocks_for_target(target: float, num_blocks: int) -> int:
    """round(tau * B) with halves rounded up: how many blocks a fixed-cost policy executes."""
    return min(num_blocks, math.floor(target * num_blocks + 0.5))


def top_k_grid(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N, 1, Gh, Gw) bool grid marking the k highest scores of every stream."""
    flat = scores.flatten(1)
    picked = torch.zeros_like(flat, dtype=torch.bool)
    picked.scatter_(1, flat.topk(k, dim=1).indices, True)
    return picked.view_as(scores)


class AllPolicy(BlockPolicy):
    """Executes every block (dense execution; tau is ignored)."""

    def _select(self, obs: PolicyObservation, grid_shape: tuple[int, int]) -> torch.Tensor:
        return torch.ones(obs.num_streams, 1, *grid_shape, dtype=torch.bool, device=obs.frame.device)


class NonePolicy(BlockPolicy):
    """Executes no block: the output stays that of the clip's first, fully executed frame."""

    def _select(self, obs: PolicyObservation, grid_shape: tuple[int, int]) -> torch.Tensor:
        return torch.zeros(obs.num_streams, 1, *grid_shape, dtype=torch.bool, device=obs.frame.device)


class RandomPolicy(BlockPolicy):
    """Executes exactly ``blocks_for_target(tau, B)`` uniformly random blocks per stream."""

    def _select(self, obs: PolicyObservation, grid_shape: tuple[int, int]) -> torch.Tensor:
        scores = torch.rand(obs.num_streams, 1, *grid_shape, device=obs.frame.device)
        return top_k_grid(scores, blocks_for_target(self.target, scores[0].numel()))


class ResidualPolicy(BlockPolicy):
    """Executes the ``blocks_for_target(tau, B)`` blocks per stream that changed most since last executed.

    A block's change is the mean absolute difference between the frame I_t and the frame state
    H_{t-1} over its pixels and channels: a block-level version of the norm gate of
    Skip-Convolutions, at a fixed cost instead of a fixed threshold.
    """

    def _select(self, obs: PolicyObservation, grid_shape: tuple[int, int]) -> torch.Tensor:
        change = (obs.frame - obs.frame_state).abs().mean(dim=1, keepdim=True)
        scores = F.avg_pool2d(change, self.block_size)
        return top_k_grid(scores, blocks_for_target(self.target, scores[0].numel()))


class LowFpsPolicy(BlockPolicy):
    """Executes the whole frame every k-th frame and nothing in between, k = round(1 / tau).

    Frames are counted within a clip: the caller's full execution of the first frame is frame 0, the
    first ``select`` after ``reset`` is frame 1, and frame t is executed when t % k == 0. A clip of
    T frames thus executes frames 0, k, 2k, ..., ceil(T / k) frames in all. k is recomputed from the
    current tau at every frame (halves rounded up); tau = 0 never executes.
    """

    def __init__(self, block_size: int, target: float) -> None:
        super().__init__(block_size, target)
        self._frame_index = 0

    @property
    def period(self) -> int | None:
        """k, the distance between executed frames; None when nothing is ever executed."""
        inverse = 1.0 / self.target if self.target > 0 else math.inf
        return None if math.isinf(inverse) else math.floor(inverse + 0.5)

    def reset(self) -> None:
        """Restart the frame count: the next ``select`` is frame 1 of a new clip."""
        super().reset()
        self._frame_index = 0

    def _select(self, obs: PolicyObservation, grid_shape: tuple[int, int]) -> torch.Tensor:
        self._frame_index += 1
        period = self.period
        execute = period is not None and self._frame_index % period == 0
        return torch.full(
            (obs.num_streams, 1, *grid_shape), execute, dtype=torch.bool, device=obs.frame.device
        )
