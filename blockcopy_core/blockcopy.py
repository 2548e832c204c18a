"""BlockCopy: a pretrained CNN run block-sparse over video, the blocks chosen online by a policy.

Per frame of N streams (method.md sections 1-4), either one :meth:`BlockCopy.step`, or, when a framework
runs its own model parts, :meth:`BlockCopy.select` before them and :meth:`BlockCopy.observe` after:

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

from .adapters import OutputAdapter, ig_pool_size
from .config import BlockCopyConfig
from .engine import BlockSparseModel, FrameStats, convert
from .errors import ConfigError, InvalidInputError, ProtocolError
from .captured_loop import CapturedLoop, loop_key
from .graphs import clone_tensors
from .information_gain import pool_to_blocks
from .macs import count_macs
from .policy import BlockPolicy, PolicyObservation, ReinforcePolicy, policy_from_config

STAGES = ("policy", "network", "sparse_overhead", "postprocess", "information_gain", "update", "compile")
"""Timed stages of a step, in order: policy forward (select); the task network on the executed tiles;
the engine's own work around it (tile gathers and scatters, state writes, tile indexing); adapter
decoding and O_t painting; IG map and block pooling; policy observe (rewards, and backward + optimiser
step on update frames). With select/observe, ``network`` is the caller's work between the two calls
(unless the caller reports its own split) and ``postprocess`` the O_t painting. The engine's work can be
timed apart only on frames that run eagerly (CPU, or
CUDA without CUDA graphs): on a CUDA-graph frame it stays inside ``network`` and the frame has no
``sparse_overhead`` entry. ``compile`` is the part of ``network`` that the engine spent compiling frame
programs (``compile=True``, a bucket's first use without ``warmup``), moved out of it."""


def _split_compile(seconds: dict[str, float], frame_stats: FrameStats) -> None:
    """Move the time the engine spent compiling during the frame out of ``network`` into ``compile``: a
    one-off cost, not the network's speed (once per stage dict)."""
    if frame_stats.compile_seconds and "network" in seconds and "compile" not in seconds:
        seconds["compile"] = min(frame_stats.compile_seconds, seconds["network"])
        seconds["network"] -= seconds["compile"]


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

    @classmethod
    def total(cls, parts: "list[RunStatistics]") -> "RunStatistics":
        """The sums of several counts (e.g. those of the processes of a multi-GPU run)."""
        total = cls()
        for part in parts:
            for name, value in vars(part).items():
                if isinstance(value, dict):
                    for stage, seconds in value.items():
                        total.seconds[stage] = total.seconds.get(stage, 0.0) + seconds
                else:
                    setattr(total, name, getattr(total, name) + value)
        return total

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
            "policy_gmacs_per_frame": self.policy_macs / 1e9 / self.frames if self.frames else float("nan"),
            "ms_per_frame": self.ms_per_frame(),
        }


@dataclass
class _Selection:
    """What :meth:`BlockCopy.select` hands to :meth:`BlockCopy.observe` for one frame."""

    grid: torch.Tensor
    full_frame: bool
    frame_size: tuple[int, int]
    policy_macs: int
    seconds: dict[str, float]
    engine_stats: FrameStats | None
    selected_at: float
    frames: torch.Tensor
    captured: bool = False  # chosen by the captured loop's graphs: observe replays the rest of them


class BlockCopy(nn.Module):
    """A video model that executes only the blocks an online policy selects.

    ``BlockCopy(model, adapter, config)`` converts a pretrained fully convolutional ``model`` (eval mode)
    for block-sparse execution, or takes an already converted one, and pairs it with the block policy
    the config names. Frames of N streams come in order; :meth:`reset` starts new clips, and the first
    frame after it executes every block.

    Two ways to drive it:

    * ``step(frames)`` (or calling the object): policy, block-sparse model, the adapter's ``decode``,
      information gain and policy update in one call.
    * For frameworks that run their own model parts (a two-stage detector: backbone and RPN block-sparse,
      ROI heads dense, post-processing with per-image sizes): ``grid = select(frames)``; run the
      block-sparse parts with ``grid`` (``self.sparse(frames, grid)``, or a larger model containing
      it) and the rest densely; then ``observe(result)`` with the task result of the frame, in the form
      the adapter's ``information_gain`` and ``output_masks`` take.

    BlockCopy is an ``nn.Module`` whose only child is the policy: ``state_dict()`` holds the policy
    (network, optimiser, cost average) and ``.to()`` moves it. The task model is the caller's: it is not
    in BlockCopy's ``state_dict`` and not moved with it (frameworks keep it in their own model). Online
    learning is its own switch, :attr:`online_learning`: ``.train()`` and ``.eval()`` (which frameworks
    call before testing) do not change it. The policy's optimiser holds only the policy network's
    parameters; to keep a task optimiser off the policy, build it from :func:`task_parameters`.

    Args:
        model: the task network (an ``nn.Module`` in eval mode, or a :class:`BlockSparseModel`).
        adapter: turns the model's outputs into results, IG and O_t, and the frames the model takes into
            the RGB frames the policy takes (see :mod:`blockcopy_core.adapters`).
        config: the settings (:class:`BlockCopyConfig`); keyword ``overrides`` change single fields.
        policy: a policy name (the same as ``config.policy``), or a :class:`BlockPolicy` object to use
            instead of the one the config names; an object keeps its own target and learning settings.
        policy_options: extra constructor arguments of the named policy (e.g. ``rl``'s ``widths``).
        sync_timing: make the stage times exact: synchronise CUDA around each stage, and time the
            engine's own work apart from the task network where the frame runs eagerly (see
            :data:`STAGES`). Costs a little throughput on a GPU; without it ``sparse_overhead`` is not
            reported.
        **overrides: fields of :class:`BlockCopyConfig` (``block_size=64``, ``target=0.5``, ...). With
            ``capture_loop`` (CUDA only), the policy, O_t, information gain and update replay as CUDA graphs
            (:mod:`blockcopy_core.captured_loop`), captured after the first frame of a clip shape: no host
            synchronisation besides the engine's block count; :meth:`step` also decodes in the graphs
            (``adapter.capturable``), while with :meth:`select`/:meth:`observe` the caller's result is
            first padded to fixed shapes (``adapter.fixed_result``; the policy then sees that result on
            every frame, also eager ones). It needs the ``rl`` policy (a :class:`ReinforcePolicy`) and an
            adapter with ``fixes_results``; ``StepResult.ig_map`` is then None (the block IG is computed
            from the boxes directly). ``compile_loop`` compiles those stages before capturing them.
    """

    def __init__(self, model: nn.Module, adapter: OutputAdapter, config: BlockCopyConfig | None = None, *,
                 policy: str | BlockPolicy | None = None, policy_options: dict[str, Any] | None = None,
                 sync_timing: bool = True, **overrides: Any) -> None:
        super().__init__()
        if not isinstance(adapter, OutputAdapter):
            raise TypeError(f"BlockCopy needs an adapter (an OutputAdapter such as CenterNetAdapter) to turn "
                            f"the model's outputs into information gain and policy inputs, got {adapter!r}")
        if isinstance(policy, str):  # a name is a config setting like the others
            overrides["policy"], policy = policy, None
        config = (config or BlockCopyConfig()).replace(**overrides)
        if isinstance(model, BlockSparseModel):
            if model.block_size != config.block_size:
                raise ConfigError("block_size", config.block_size,
                                  f"the converted model's block size {model.block_size}")
            sparse = model
        else:
            sparse = convert(model, config=config)
        object.__setattr__(self, "_sparse", sparse)  # not a child: the task model belongs to the caller
        self.config = config
        self.adapter = adapter
        if policy is not None:
            learned = {"target", "gamma", "cost_momentum", "lr", "weight_decay", "update_interval", "policy"}
            if policy_options or learned & set(overrides):
                raise ValueError("policy settings (policy_options, target, gamma, lr, ...) apply only when the "
                                 "policy is given by name in the config; a policy object keeps its own")
            if policy.block_size != config.block_size:
                raise ConfigError("block_size", config.block_size, f"the policy's block size {policy.block_size}")
        else:
            policy = policy_from_config(config, adapter.output_channels, **(policy_options or {}))
        self.policy = policy
        parameter = next(sparse.parameters(), None)
        if parameter is not None:
            self.policy.to(parameter.device)
        self.online_learning = config.online_learning
        self.sync_timing = sync_timing
        if config.capture_loop and not (isinstance(policy, ReinforcePolicy) and adapter.fixes_results):
            what = (f"the policy {type(policy).__name__} is not the 'rl' ReinforcePolicy"
                    if not isinstance(policy, ReinforcePolicy) else
                    f"{type(adapter).__name__}'s results do not have fixed shapes (adapter.fixes_results is False)")
            raise ConfigError("capture_loop", True, f"False here: {what}")
        self._loop: CapturedLoop | None = None
        sparse.time_overhead = sync_timing
        self._policy_macs: dict[tuple, int] = {}
        self.reset()
        self.reset_statistics()

    @property
    def sparse(self) -> BlockSparseModel:
        """The block-sparse task model (shares the caller's modules; see :func:`convert`)."""
        return self._sparse

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def target(self) -> float:
        """tau, the target fraction of executed blocks; settable between frames."""
        return self.policy.target

    @target.setter
    def target(self, value: float) -> None:
        self.policy.target = value

    @property
    def online_learning(self) -> bool:
        """Whether the policy keeps learning (REINFORCE updates) while it runs; independent of
        ``.train()``/``.eval()``."""
        return self.policy.training

    @online_learning.setter
    def online_learning(self, value: bool) -> None:
        self.policy.train(bool(value))

    def train(self, mode: bool = True) -> "BlockCopy":
        """Set the module's own mode only: the policy keeps learning or not as :attr:`online_learning`
        says, whatever mode a framework puts its model in."""
        self.training = mode
        return self

    @property
    def statistics(self) -> RunStatistics:
        """Totals since construction or the last :meth:`reset_statistics` (across clips)."""
        return self._statistics

    def reset(self) -> None:
        """Start a new clip on every stream: the next frame executes all blocks. Learned weights and
        statistics stay."""
        self._sparse.reset()
        self.policy.reset()
        self._prev_result: Any = None
        self._prev_masks: torch.Tensor | None = None
        self._prev_grid: torch.Tensor | None = None
        self._selection: _Selection | None = None

    def reset_statistics(self) -> None:
        """Restart the counts of :attr:`statistics` without starting a new clip."""
        self._statistics = RunStatistics()

    def forward(self, frames: torch.Tensor) -> StepResult:
        """:meth:`step`."""
        return self.step(frames)

    def step(self, frames: torch.Tensor) -> StepResult:
        """Process the next frame of each stream: select, block-sparse model, decode, observe.

        Args:
            frames: (N, C, H, W) float frames as the model takes them (the adapter's ``input_format``
                says how they encode RGB), H and W multiples of ``block_size``; N constant within a clip.

        Returns:
            The frame's :class:`StepResult`.
        """
        if self._replays_loop(frames, decodes=True):
            return self._step_captured(frames)
        grid = self.select(frames)
        seconds: dict[str, float] = {}
        outputs = self._run_network(frames, grid, seconds)
        with self._timed("postprocess", seconds, frames.device):
            result = self.adapter.decode(outputs, self._selection.frame_size)
        return self._observe(result, outputs, None, seconds, decoded_by_loop=self.adapter.capturable)

    def _replays_loop(self, frames: torch.Tensor, decodes: bool) -> bool:
        """Whether this frame's policy runs in the captured loop (one that decodes, or one fed results)."""
        loop = self._loop
        return (loop is not None and loop.decodes == decodes and self._prev_result is not None
                and self._selection is None and loop.matches(frames, self.policy.training))

    def _run_network(self, frames: torch.Tensor, grid: torch.Tensor, seconds: dict[str, float]) -> Any:
        """The block-sparse model on ``grid``, timed as ``network`` and ``sparse_overhead``."""
        with self._timed("network", seconds, frames.device):
            outputs = self._sparse(frames, grid)
        overhead = self._sparse.last_stats.overhead_seconds
        if overhead is not None:
            seconds["sparse_overhead"] = overhead
            seconds["network"] -= overhead
        _split_compile(seconds, self._sparse.last_stats)
        return outputs

    def _step_captured(self, frames: torch.Tensor) -> StepResult:
        """:meth:`step` of a policy frame with a captured loop that decodes: the same stages, each a graph
        replay."""
        selection = self._select_captured(frames)
        seconds = selection.seconds
        outputs = self._run_network(frames, selection.grid, seconds)
        with self._timed("postprocess", seconds, frames.device):
            result = clone_tensors(self._loop.postprocess(self._sparse.output_state))
        return self._finish_captured(selection, outputs, result, self._sparse.last_stats, seconds)

    def _select_captured(self, frames: torch.Tensor) -> _Selection:
        """The frame's grid from the captured loop's policy graph (timed as ``policy``)."""
        loop, seconds = self._loop, {}
        with self._timed("policy", seconds, frames.device):
            grid = loop.select(frames, self._sparse.frame_state, self._prev_masks, self._prev_grid,
                               self._prev_result).clone()
        return _Selection(grid, False, (frames.shape[-2], frames.shape[-1]), loop.policy_macs, seconds,
                          self._sparse.last_stats, time.perf_counter(), frames, captured=True)

    def _finish_captured(self, selection: _Selection, outputs: Any, result: Any, frame_stats: FrameStats,
                         seconds: dict[str, float]) -> StepResult:
        """The rest of a captured frame after its postprocessing graph: block IG, rewards and update."""
        loop, device = self._loop, selection.grid.device
        with self._timed("information_gain", seconds, device):
            block_ig = loop.information_gain().clone()
        with self._timed("update", seconds, device):
            policy_stats = loop.update()
        self._prev_result, self._prev_masks, self._prev_grid = loop.prev_result, loop.prev_masks, loop.prev_grid
        step = StepResult(outputs, result, selection.grid, False, block_ig, None, frame_stats, selection.policy_macs,
                          policy_stats, seconds)
        self._statistics.add(step)
        return step

    def _apply(self, fn, recurse=True):
        if getattr(self, "_loop", None) is not None:
            self._loop.drain()
            self.policy.updates_in_flight = None
        self._loop = None  # its graphs read the policy's old tensors
        return super()._apply(fn, recurse)

    def select(self, frames: torch.Tensor) -> torch.Tensor:
        """Choose the blocks to execute on this frame (all of them on a clip's first frame).

        Args:
            frames: (N, C, H, W) frames as the model takes them; H and W multiples of ``block_size``.

        Returns:
            (N, 1, H // block_size, W // block_size) bool grid A_t, True = execute.

        Raises:
            ProtocolError: when the previous ``select`` has not been answered by ``observe``.
            InvalidInputError: frames of the wrong shape or channel count.
        """
        if self._replays_loop(frames, decodes=False):
            self._selection = self._select_captured(frames)
            return self._selection.grid
        if self._loop is not None:
            self._loop.drain()  # the eager loop touches the gradients a captured backward pass may still fill
        if self._selection is not None:
            raise ProtocolError("select() was called twice without observe() in between: call observe(result) "
                                "after running the model on the selected blocks (or reset() to drop the frame)")
        if frames.dim() != 4:
            raise InvalidInputError(f"frames must be (N, C, H, W), got shape {tuple(frames.shape)}")
        frame_size = (frames.shape[-2], frames.shape[-1])
        seconds: dict[str, float] = {}
        policy_macs = 0
        full_frame = self._prev_result is None
        if full_frame:
            self.adapter.input_format.check(frames)
            rows, cols = frame_size[0] // self.block_size, frame_size[1] // self.block_size
            grid = torch.ones(frames.shape[0], 1, rows, cols, dtype=torch.bool, device=frames.device)
        else:
            observation = PolicyObservation(
                frame=self.adapter.policy_frame(frames),
                frame_state=self.adapter.policy_frame(self._sparse.frame_state),
                prev_output=self._prev_masks,
                prev_grid=self._prev_grid,
            )
            policy_macs = self._count_policy_macs(observation)
            with self._timed("policy", seconds, frames.device):
                grid = self.policy.select(observation)
        self._selection = _Selection(grid, full_frame, frame_size, policy_macs, seconds, self._sparse.last_stats,
                                     time.perf_counter(), frames)
        return grid

    def observe(self, result: Any, *, outputs: Any = None, frame_stats: FrameStats | None = None,
                seconds: dict[str, float] | None = None) -> StepResult:
        """Feed back the task result of the frame last given to :meth:`select`.

        Computes O_t, the information gain against the previous result (not on a clip's first frame),
        the policy's rewards (and its weight update every ``update_interval`` frames) and the statistics.

        Args:
            result: the frame's task result, as the adapter's ``information_gain``/``output_masks`` take it
                (e.g. per-stream detection dicts).
            outputs: the model's raw outputs, only passed through to the :class:`StepResult`.
            frame_stats: the engine's counts for the frame (default: those of ``self.sparse``, which must
                have run since ``select``).
            seconds: the caller's own stage times (``network``, ``sparse_overhead``, ``postprocess``); by
                default the time between ``select`` and ``observe`` counts as ``network``.

        Raises:
            ProtocolError: without a preceding ``select``, or when the engine did not run since it.
        """
        return self._observe(result, outputs, frame_stats, seconds, decoded_by_loop=False)

    def _observe(self, result: Any, outputs: Any, frame_stats: FrameStats | None, seconds: dict[str, float] | None,
                 decoded_by_loop: bool) -> StepResult:
        """:meth:`observe`; ``decoded_by_loop``: a captured loop built after this frame decodes ``outputs``
        itself (:meth:`step` with a capturable adapter) rather than taking results."""
        selection = self._selection
        if selection is None:
            raise ProtocolError("observe() needs a preceding select(): call grid = select(frames), run the model "
                                "on the grid, then observe(result)")
        if frame_stats is None:
            frame_stats = self._sparse.last_stats
            if frame_stats is None or frame_stats is selection.engine_stats:
                raise ProtocolError("observe() found no new run of the block-sparse model since select(): run "
                                    "self.sparse(frames, grid) (or pass frame_stats=) before observe()")
        self._selection = None
        device = selection.grid.device
        if seconds is None:
            seconds = {"network": time.perf_counter() - selection.selected_at}
        seconds = {**selection.seconds, **seconds}
        _split_compile(seconds, frame_stats)
        frame_size = selection.frame_size
        if selection.captured:  # O_t of the padded result as a graph replay, then the rest of the loop
            with self._timed("postprocess", seconds, device, accumulate=True):
                self._loop.postprocess(self.adapter.fixed_result(result, frame_size))
            return self._finish_captured(selection, outputs, result, frame_stats, seconds)
        capture = self.config.capture_loop and device.type == "cuda"
        # fed results, the captured loop sees them in fixed shapes: so does every frame, for the same policy inputs
        seen = self.adapter.fixed_result(result, frame_size) if capture and not decoded_by_loop else result
        with self._timed("postprocess", seconds, device, accumulate=True):
            masks = self.adapter.output_masks(seen, frame_size)
        ig_map = block_ig = policy_stats = None
        if not selection.full_frame:
            with self._timed("information_gain", seconds, device):
                ig_map = self.adapter.information_gain(seen, self._prev_result, frame_size)
                block_ig = pool_to_blocks(ig_map, ig_pool_size(ig_map, frame_size, self.block_size))
            with self._timed("update", seconds, device):
                policy_stats = self.policy.observe(block_ig)
        self._prev_result, self._prev_masks, self._prev_grid = seen, masks, selection.grid
        step = StepResult(outputs, result, selection.grid, selection.full_frame, block_ig, ig_map, frame_stats,
                          selection.policy_macs, policy_stats, seconds)
        self._statistics.add(step)
        if capture:
            key = loop_key(self, selection.frames, self._sparse.output_state if decoded_by_loop else seen,
                           decoded_by_loop)
            if self._loop is None or self._loop.key != key:
                self._loop = CapturedLoop(self, selection.frames, seen, masks, decodes=decoded_by_loop,
                                          compile=self.config.compile_loop)
        return step

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
    def _timed(self, stage: str, seconds: dict[str, float], device: torch.device,
               accumulate: bool = False) -> Iterator[None]:
        # the current stream only: the captured loop's backward pass runs beside the next frame on a side
        # stream, and what it delays shows in the stages it overlaps
        stream = torch.cuda.current_stream(device) if self.sync_timing and device.type == "cuda" else None
        if stream is not None:
            stream.synchronize()
        start = time.perf_counter()
        yield
        if stream is not None:
            stream.synchronize()
        elapsed = time.perf_counter() - start
        seconds[stage] = seconds.get(stage, 0.0) + elapsed if accumulate else elapsed


def task_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that belong to no block policy inside it.

    Build a task model's optimiser from these when the model holds a :class:`BlockCopy` (or a policy):
    ``torch.optim.SGD(task_parameters(model), lr=...)``. The policy trains itself with its own optimiser.
    """
    policy_ids = {id(p) for m in module.modules() if isinstance(m, BlockPolicy) for p in m.parameters()}
    return [p for p in module.parameters() if id(p) not in policy_ids]
