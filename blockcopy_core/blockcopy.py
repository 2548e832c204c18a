"""BlockCopy: a pretrained CNN run block-sparse over video, the blocks chosen online by a policy.

One :meth:`BlockCopy.step` per frame of N streams (method.md sections 1-4):

1. policy: from the state S_t = {I_t, H_{t-1}, O_{t-1}, A_{t-1}} choose the grid A_t (the first frame
   of a clip executes every block and skips the policy);
2. task network: run the block-sparse model (:mod:`blockcopy_core.engine`) on A_t;
3. post-processing: the adapter decodes the dense outputs and paints O_t;
4. information gain: the adapter's IG map between this frame's result and the previous one,
   max-pooled per block;
5. update: the policy observes the block IG (REINFORCE: rewards now, a weight update every few frames).

Each stage is timed (the paper's Table 3 split) and counted in :class:`RunStatistics`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .adapters import OutputAdapter
from .engine import BlockSparseModel, FrameStats, convert
from .information_gain import pool_to_blocks
from .macs import count_macs
from .policy import BlockPolicy, PolicyObservation, build_policy

STAGES = ("policy", "network", "sparse_overhead", "postprocess", "information_gain", "update")
"""Timed stages of a step, in order: policy forward (select); the task network on the executed tiles;
the engine's own work around it (tile gathers and scatters, state writes, tile indexing); adapter
decoding and O_t painting; IG map and block pooling; policy observe (rewards, and backward + optimiser
step on update frames). The engine's work can be timed apart only on frames that run eagerly (CPU, or
CUDA without CUDA graphs): on a CUDA-graph frame it stays inside ``network`` and the frame has no
``sparse_overhead`` entry."""


@dataclass
class StepResult:
    """What :meth:`BlockCopy.step` returns for one frame of N streams.

    Attributes:
        outputs: the model's output structure, dense; blocks not executed hold their last values.
        result: the adapter's decoding of ``outputs`` (e.g. per-stream detection dicts).
        grid: (N, 1, Gh, Gw) bool, the executed blocks A_t.
        full_frame: whether this was a clip's first frame (all blocks, no policy).
        information_gain: (N, 1, Gh, Gw) block IG, or None on a full frame.
        ig_map: (N, H / s, W / s) IG map before pooling, or None on a full frame.
        frame_stats: the engine's counts for this frame.
        policy_macs: multiply-accumulates of the policy network on this frame (0 without one).
        policy_stats: what the policy's ``observe`` returned (0-dim tensors), or None.
        seconds: wall time of each stage of :data:`STAGES` that ran (and could be timed).
    """

    outputs: Any
    result: Any
    grid: torch.Tensor
    full_frame: bool
    information_gain: torch.Tensor | None
    ig_map: torch.Tensor | None
    frame_stats: FrameStats
    policy_macs: int
    policy_stats: dict | None
    seconds: dict[str, float]


@dataclass
class RunStatistics:
    """Totals over the frames of a clip (or since :meth:`BlockCopy.reset_statistics`), all streams.

    Attributes:
        frames: time steps counted (each covers N streams).
        full_frames: those that were a clip's first frame.
        executed_blocks, total_blocks: block counts summed over frames and streams.
        policy_executed_blocks, policy_total_blocks: the same over the frames the policy chose.
        policy_selected_blocks: the blocks the policy selected on those frames (on CUDA the engine
            executes a few more, rounding up to its buckets).
        network_macs: task network MACs, summed.
        policy_macs: policy network MACs, summed.
        seconds: wall time per stage of :data:`STAGES`, summed.
        untimed_overhead_frames: frames whose engine work could not be timed apart from ``network``.
    """

    frames: int = 0
    full_frames: int = 0
    executed_blocks: int = 0
    total_blocks: int = 0
    policy_executed_blocks: int = 0
    policy_total_blocks: int = 0
    policy_selected_blocks: int = 0
    network_macs: int = 0
    policy_macs: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    untimed_overhead_frames: int = 0

    def add(self, step: StepResult) -> None:
        """Count one step."""
        stats = step.frame_stats
        self.frames += 1
        self.full_frames += int(step.full_frame)
        self.executed_blocks += stats.executed_blocks
        self.total_blocks += stats.total_blocks
        if not step.full_frame:
            self.policy_executed_blocks += stats.executed_blocks
            self.policy_total_blocks += stats.total_blocks
            self.policy_selected_blocks += (stats.executed_blocks if stats.selected_blocks is None
                                            else stats.selected_blocks)
        self.network_macs += stats.macs
        self.policy_macs += step.policy_macs
        for stage, seconds in step.seconds.items():
            self.seconds[stage] += seconds
        self.untimed_overhead_frames += "sparse_overhead" not in step.seconds

    @property
    def executed_fraction(self) -> float:
        """Executed blocks / all blocks over the counted frames (NaN before any frame)."""
        return self.executed_blocks / self.total_blocks if self.total_blocks else float("nan")

    @property
    def policy_executed_fraction(self) -> float:
        """Executed fraction over the frames the policy chose (the quantity tau targets)."""
        return self.policy_executed_blocks / self.policy_total_blocks if self.policy_total_blocks \
            else float("nan")

    @property
    def policy_selected_fraction(self) -> float:
        """Fraction of blocks the policy selected (before any bucket rounding) over its frames."""
        return self.policy_selected_blocks / self.policy_total_blocks if self.policy_total_blocks \
            else float("nan")

    def gmacs_per_frame(self, include_policy: bool = True) -> float:
        """Average GMACs per time step (all N streams), optionally with the policy's."""
        macs = self.network_macs + (self.policy_macs if include_policy else 0)
        return macs / 1e9 / self.frames if self.frames else float("nan")

    def ms_per_frame(self) -> dict[str, float]:
        """Average wall time per time step of each stage, and ``total``, in milliseconds.

        ``sparse_overhead`` is NaN when some frames could not time it apart (CUDA graphs): their engine
        work is then inside ``network``; ``total`` is right either way.
        """
        if not self.frames:
            return {stage: float("nan") for stage in (*STAGES, "total")}
        per_stage = {stage: 1e3 * seconds / self.frames for stage, seconds in self.seconds.items()}
        total = sum(per_stage.values())
        if self.untimed_overhead_frames:
            per_stage["sparse_overhead"] = float("nan")
        return {**per_stage, "total": total}

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary."""
        return {
            "frames": self.frames,
            "full_frames": self.full_frames,
            "executed_fraction": self.executed_fraction,
            "policy_executed_fraction": self.policy_executed_fraction,
            "policy_selected_fraction": self.policy_selected_fraction,
            "gmacs_per_frame": self.gmacs_per_frame(),
            "network_gmacs_per_frame": self.gmacs_per_frame(include_policy=False),
            "ms_per_frame": self.ms_per_frame(),
        }


class BlockCopy:
    """A video model that executes only the blocks an online policy selects.

    ``BlockCopy(model, block_size, policy, target, adapter)`` wraps a pretrained fully convolutional
    ``model`` (eval mode) for block-sparse execution and pairs it with a block policy. Feed the frames
    of N streams in order with :meth:`step` (or call the object); :meth:`reset` starts new clips. The
    first frame after a reset executes every block.

    Args:
        model: the task network (an ``nn.Module``, or a :class:`BlockSparseModel` from ``convert``).
        block_size: block side in pixels; must divide the frame size and be a multiple of every layer's
            stride (64 for CenterNet at 768x576).
        policy: a name of :data:`blockcopy_core.policy.POLICIES` (``rl``, ``random``, ``residual``,
            ``lowfps``, ``all``, ``none``) or a :class:`BlockPolicy`.
        target: tau, the target fraction of executed blocks (ignored when ``policy`` is an object).
        adapter: turns the model's outputs into results, IG and O_t (see :mod:`blockcopy_core.adapters`).
        sync_timing: make the stage times exact: synchronise CUDA around each stage, and time the
            engine's own work apart from the task network where the frame runs eagerly (see
            :data:`STAGES`). Costs a little throughput on a GPU; without it ``sparse_overhead`` is not
            reported.
        **policy_kwargs: passed to the policy's constructor; ``rl`` gets ``output_channels`` from the
            adapter unless given.
    """

    def __init__(self, model: nn.Module, block_size: int, policy: str | BlockPolicy = "rl",
                 target: float = 0.3, adapter: OutputAdapter | None = None, sync_timing: bool = True,
                 **policy_kwargs) -> None:
        if adapter is None:
            raise ValueError("BlockCopy needs an adapter (e.g. CenterNetAdapter) to turn the model's "
                             "outputs into information gain and policy inputs")
        self.sparse: BlockSparseModel = model if isinstance(model, BlockSparseModel) else convert(model,
                                                                                                  block_size)
        if self.sparse.block_size != block_size:
            raise ValueError(f"the converted model uses {self.sparse.block_size}-px blocks, not {block_size}")
        self.block_size = block_size
        self.adapter = adapter
        if isinstance(policy, BlockPolicy):
            if policy_kwargs:
                raise ValueError("policy_kwargs apply only when the policy is given by name")
            self.policy = policy
        else:
            if policy == "rl":
                policy_kwargs.setdefault("output_channels", adapter.output_channels)
            self.policy = build_policy(policy, block_size, target, **policy_kwargs)
        if self.policy.block_size != block_size:
            raise ValueError(f"the policy uses {self.policy.block_size}-px blocks, not {block_size}")
        parameter = next(self.sparse.model.parameters(), None)
        if parameter is not None:
            self.policy.to(parameter.device)
        self.sync_timing = sync_timing
        self.sparse.time_overhead = sync_timing
        self._policy_macs: dict[tuple, int] = {}
        self.reset()

    @property
    def target(self) -> float:
        """tau, the target fraction of executed blocks; settable between frames."""
        return self.policy.target

    @target.setter
    def target(self, value: float) -> None:
        self.policy.target = value

    @property
    def statistics(self) -> RunStatistics:
        """Totals since the last :meth:`reset` or :meth:`reset_statistics`."""
        return self._statistics

    def reset(self) -> None:
        """Start a new clip on every stream: the next frame executes all blocks. Learned weights stay."""
        self.sparse.reset()
        self.policy.reset()
        self._prev_result: Any = None
        self._prev_masks: torch.Tensor | None = None
        self._prev_grid: torch.Tensor | None = None
        self.reset_statistics()

    def reset_statistics(self) -> None:
        """Restart the counts of :attr:`statistics` without starting a new clip."""
        self._statistics = RunStatistics()

    def train(self, mode: bool = True) -> "BlockCopy":
        """Let the policy learn online (the default) or, with ``mode=False``, freeze it."""
        self.policy.train(mode)
        return self

    def eval(self) -> "BlockCopy":
        """Freeze the policy: it still selects blocks but no longer learns."""
        return self.train(False)

    def state_dict(self) -> dict[str, Any]:
        """The policy's state (for ``rl``: network, optimiser, cost average); the task model is not in it."""
        return self.policy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a policy saved with :meth:`state_dict`; call :meth:`reset` before the next clip."""
        self.policy.load_state_dict(state)

    def __call__(self, frames: torch.Tensor) -> StepResult:
        return self.step(frames)

    def step(self, frames: torch.Tensor) -> StepResult:
        """Process the next frame of each stream.

        Args:
            frames: (N, 3, H, W) float frames as the model takes them (e.g. RGB 0..255 for CenterNet),
                H and W multiples of ``block_size``; N constant within a clip.

        Returns:
            The frame's :class:`StepResult`.
        """
        seconds: dict[str, float] = {}
        frame_size = (frames.shape[-2], frames.shape[-1])
        full_frame = self._prev_result is None
        policy_macs = 0
        if full_frame:
            grid = self._full_grid(frames)
        else:
            observation = PolicyObservation(
                frame=self.adapter.policy_frame(frames),
                frame_state=self.adapter.policy_frame(self.sparse.frame_state),
                prev_output=self._prev_masks,
                prev_grid=self._prev_grid,
            )
            policy_macs = self._count_policy_macs(observation)
            with self._timed("policy", seconds, frames):
                grid = self.policy.select(observation)
        with self._timed("network", seconds, frames):
            outputs = self.sparse(frames, grid)
        frame_stats = self.sparse.last_stats
        if frame_stats.overhead_seconds is not None:
            seconds["sparse_overhead"] = frame_stats.overhead_seconds
            seconds["network"] -= frame_stats.overhead_seconds
        with self._timed("postprocess", seconds, frames):
            result = self.adapter.decode(outputs, frame_size)
            masks = self.adapter.output_masks(result, frame_size)
        ig_map = block_ig = policy_stats = None
        if not full_frame:
            with self._timed("information_gain", seconds, frames):
                ig_map = self.adapter.information_gain(result, self._prev_result, frame_size)
                block_ig = pool_to_blocks(ig_map, self._pool_size(ig_map, frame_size))
            with self._timed("update", seconds, frames):
                policy_stats = self.policy.observe(block_ig)
        self._prev_result, self._prev_masks, self._prev_grid = result, masks, grid
        step = StepResult(outputs, result, grid, full_frame, block_ig, ig_map, frame_stats, policy_macs,
                          policy_stats, seconds)
        self._statistics.add(step)
        return step

    def _full_grid(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dim() != 4:
            raise ValueError(f"frames must be (N, C, H, W), got {tuple(frames.shape)}")
        rows, cols = frames.shape[-2] // self.block_size, frames.shape[-1] // self.block_size
        return torch.ones(frames.shape[0], 1, rows, cols, dtype=torch.bool, device=frames.device)

    def _pool_size(self, ig_map: torch.Tensor, frame_size: tuple[int, int]) -> int:
        """Block side in IG-map cells; checks that the map tiles the frame at an integer stride."""
        height, width = frame_size
        rows, cols = ig_map.shape[-2:]
        stride = height // rows if rows else 0
        if not stride or rows * stride != height or cols * stride != width or self.block_size % stride:
            raise ValueError(f"the adapter's {rows}x{cols} IG map does not cover {height}x{width} frames "
                             f"at an integer stride dividing the block size {self.block_size}")
        return self.block_size // stride

    def _count_policy_macs(self, observation: PolicyObservation) -> int:
        """MACs of the policy network on this observation (0 without one), counted once per input shape."""
        net = getattr(self.policy, "net", None)
        if not isinstance(net, nn.Module):
            return 0
        key = (tuple(observation.frame.shape), tuple(observation.prev_output.shape))
        if key not in self._policy_macs:
            was_training = net.training
            net.eval()  # the counting pass must not update BatchNorm running statistics
            try:
                self._policy_macs[key] = count_macs(net, observation.frame, observation.frame_state,
                                                    observation.prev_output, observation.prev_grid)
            finally:
                net.train(was_training)
        return self._policy_macs[key]

    @contextmanager
    def _timed(self, stage: str, seconds: dict[str, float], frames: torch.Tensor) -> Iterator[None]:
        sync = self.sync_timing and frames.is_cuda
        if sync:
            torch.cuda.synchronize(frames.device)
        start = time.perf_counter()
        yield
        if sync:
            torch.cuda.synchronize(frames.device)
        seconds[stage] = time.perf_counter() - start
