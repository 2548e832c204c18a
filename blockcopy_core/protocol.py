"""The evaluation protocol of BlockCopy on video, shared by the main job and the framework plugins.

* :class:`DenseRunner`: the unchanged model on every full frame, with BlockCopy's ``step`` /
  ``statistics`` interface: the reference every block-sparse run is compared with.
* :func:`run_clips`: frames of clips through a runner, each clip starting with a full frame, with a
  progress bar; yields every step so the caller can score it.
* :func:`warm_up`: the policy's training before evaluation (method.md section 4: the policy is first
  trained on training clips, then keeps learning online): a number of clips drawn in epochs of random
  order (:func:`warmup_order`);
* :func:`without_nan`: results made fit for JSON; :func:`format_statistics`: a run's statistics in one line.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from .adapters import OutputAdapter
from .captured_loop import captured_function
from .compiled import agreement_tolerance, relative_error
from .blockcopy import RunStatistics, StepResult
from .engine import FrameStats
from .graphs import graphed, graphed_by_shape
from .macs import count_macs

Prepare = Callable[[torch.Tensor], torch.Tensor]
"""Turns a frame as the clip holds it into the runner's input (e.g. add the stream axis, move to the GPU)."""


class Runner(Protocol):
    """What the protocol drives: :class:`~blockcopy_core.BlockCopy` or :class:`DenseRunner`."""

    statistics: RunStatistics

    def step(self, frames: torch.Tensor) -> StepResult: ...

    def reset(self) -> None: ...

    def reset_statistics(self) -> None: ...


class DenseRunner:
    """The unchanged model on every full frame, with BlockCopy's ``step``/``statistics`` interface.

    On CUDA the model runs as one CUDA graph, as the block-sparse runs do, so that their times compare.
    With ``compile=True`` it runs under ``torch.compile`` instead (:func:`compile_dense`: inductor with
    freezing, on CUDA in a CUDA graph): the dense side of a comparison with a block-sparse model
    converted with ``compile=True``. It compiles on the first frame. With ``compile=True`` and an adapter
    whose decoding has fixed shapes (``adapter.capturable``), the decoding is compiled too and, on CUDA,
    replayed as a CUDA graph, as BlockCopy's captured loop (``compile_loop``) decodes.

    Args:
        model: the task network (eval mode).
        adapter: decodes the model's outputs into results.
        block_size: block side in pixels (for the block counts of the statistics).
        compile: run the model compiled.
    """

    def __init__(self, model: torch.nn.Module, adapter: OutputAdapter, block_size: int, *,
                 compile: bool = False) -> None:
        self.model = model
        self.adapter = adapter
        self.block_size = block_size
        self.compile = compile
        self._macs: int | None = None
        self._forward = None
        self._decoders: dict[tuple, Callable[[Any], Any]] = {}  # by frame size and output shapes
        self.reset_statistics()

    def reset(self) -> None:
        """Start a new clip (the dense model keeps no state)."""

    def reset_statistics(self) -> None:
        self.statistics = RunStatistics()

    @torch.no_grad()
    def step(self, frames: torch.Tensor) -> StepResult:
        """One (N, 3, H, W) frame through the model; the result mimics a BlockCopy full frame."""
        size = (frames.shape[-2], frames.shape[-1])
        if self._forward is None:
            self._macs = count_macs(self.model, frames)
            if self.compile:
                self._forward = compile_dense(self.model, frames)
            else:
                self._forward = graphed(self.model, frames) if frames.is_cuda else self.model
        _synchronize(frames)
        start = time.perf_counter()
        outputs = self._forward(frames)
        _synchronize(frames)
        network = time.perf_counter() - start
        result = self._decoder(outputs, size)(outputs)
        _synchronize(frames)
        seconds = {"network": network, "sparse_overhead": 0.0,
                   "postprocess": time.perf_counter() - start - network}
        rows, cols = size[0] // self.block_size, size[1] // self.block_size
        blocks = frames.shape[0] * rows * cols
        grid = torch.ones(frames.shape[0], 1, rows, cols, dtype=torch.bool)
        step = StepResult(outputs, result, grid, True, None, None, FrameStats(blocks, blocks, self._macs), 0,
                          None, seconds)
        self.statistics.add(step)
        return step


    def _decoder(self, outputs: Any, size: tuple[int, int]) -> Callable[[Any], Any]:
        """The decoding of outputs like ``outputs`` of ``size`` frames (compiled and captured where it can)."""
        key = (size, tuple(tuple(t.shape) for t in tree_leaves(outputs)))
        if key not in self._decoders:
            decode = lambda out: self.adapter.decode(out, size)  # noqa: E731
            self._decoders[key] = captured_function(decode, outputs) if (
                self.compile and self.adapter.capturable) else decode
        return self._decoders[key]


def compile_dense(model: torch.nn.Module, example: torch.Tensor, *, rtol: float | None = None):
    """``model`` under ``torch.compile`` for inference (no autograd): inductor with freezing (BatchNorm
    folded into the weights), compiled on ``example``; on CUDA each input shape's compiled program is
    captured once as a CUDA graph (:func:`graphs.graphed_by_shape`), and each call returns copies of the
    outputs (a replay overwrites them). Our own capture rather than mode "reduce-overhead": its CUDA-graph
    trees keep per-call bookkeeping on the host, which showed as 2 ms or more per frame when the frame's
    post-processing is host-bound (Detectron2's RetinaNet and Mask R-CNN on an H200, docs/benchmarks.md).

    Freezing makes the weights constants of the compiled program: later changes to the model's parameters
    or buffers are not seen (compile again after loading other weights).

    The compiled outputs on ``example`` are checked against the eager model's, within ``rtol`` of the
    largest output (default :func:`compiled.agreement_tolerance`: 1e-3 in fp32, 2e-2 in fp16 and in fp32
    on CUDA with TF32 convolutions, measured 3.7e-3 for CenterNet on an H200; 1e-1 in bf16).
    Freezing has given wrong results (CPU, torch 2.14: CenterNet's box head 81 % off while its scale was
    a float attribute, a float multiplied in as another constant): on a mismatch the model is compiled
    again without freezing, with a warning, and if that also disagrees a ``RuntimeError`` says so.
    """
    if rtol is None:
        tf32 = example.is_cuda and example.dtype == torch.float32 and (
            torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
        rtol = agreement_tolerance(example.dtype, tf32)
    with torch.no_grad():
        expected = model(example)
    for freezing in (True, False):
        fast = _compiled_for_inference(model, freezing)
        if example.is_cuda:
            fast = graphed_by_shape(fast)
        error = relative_error(fast(example), expected)
        if error <= rtol:
            return fast
        if freezing:
            warnings.warn(f"torch.compile with freezing computes wrong outputs for this model (relative error "
                          f"{error:.2g} > {rtol:g}); compiling it without freezing", RuntimeWarning, stacklevel=2)
    raise RuntimeError(f"torch.compile computes outputs that differ from the eager model's (relative error "
                       f"{error:.2g} > {rtol:g}); run it without compiling")


def _compiled_for_inference(model: torch.nn.Module, freezing: bool) -> Callable[[Any], object]:
    """``torch.compile(model)`` called without autograd and with inductor's ``freezing`` set as given around
    each call, so that every compilation (lazy: the first call with each input shape) sees it. Passed only
    in ``torch.compile``'s options, freezing is silently ignored (torch 2.11 and 2.14: BatchNorm stayed a
    separate multiply-add, 12 % of a ResNet-50 frame on an H200); it also needs autograd off. The options
    still carry it: they keep the two settings' compiled code apart in dynamo's cache, which is shared by
    every ``torch.compile`` of the same model (without them the unfrozen retry would replay the frozen
    code)."""
    from torch._inductor import config as inductor_config

    compiled = torch.compile(model, options={"freezing": freezing})

    def call(x):
        with torch.no_grad(), inductor_config.patch(freezing=freezing):
            return compiled(x)

    return call


def _synchronize(frames: torch.Tensor) -> None:
    """Wait for the GPU (so that stage times are exact); nothing on the CPU."""
    if frames.is_cuda:
        torch.cuda.synchronize(frames.device)


def run_clips(runner: Runner, clips: Iterable[Iterable[Any]], *, prepare: Prepare | None = None,
              desc: str | None = None, total: int | None = None,
              progress: tqdm | None = None) -> Iterator[tuple[int, int, Any, StepResult]]:
    """Run every frame of every clip through ``runner``; a clip starts with ``runner.reset()``.

    Args:
        runner: a :class:`~blockcopy_core.BlockCopy` or :class:`DenseRunner`.
        clips: clips, each an iterable of frames (tensors, or anything ``prepare`` takes).
        prepare: frame -> the runner's (N, C, H, W) input (default: the frame itself).
        desc, total: label and frame count of the progress bar (tqdm) shown when ``progress`` is None.
        progress: an open tqdm bar to advance instead.

    Yields:
        ``(clip_index, frame_index, frame, step)`` after each frame, indices from 0; the caller can score
        the step, or reset the runner's statistics, before the next frame runs.
    """
    bar = progress if progress is not None else tqdm(desc=desc, total=total, unit="frame", dynamic_ncols=True)
    try:
        for clip_index, clip in enumerate(clips):
            runner.reset()
            for frame_index, frame in enumerate(clip):
                step = runner.step(prepare(frame) if prepare is not None else frame)
                bar.update()
                yield clip_index, frame_index, frame, step
    finally:
        if progress is None:
            bar.close()


def warmup_order(available: int, num_clips: int, seed: int = 0) -> list[int]:
    """Indices of the ``num_clips`` training clips a warm-up runs, out of ``available``: epochs of random
    permutations (from a generator seeded with ``seed``), repeated until ``num_clips`` are drawn."""
    if num_clips < 0:
        raise ValueError(f"num_clips must be >= 0, got {num_clips}")
    if num_clips and not available:
        raise ValueError("a warm-up needs at least one training clip")
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < num_clips:
        order += torch.randperm(available, generator=generator).tolist()
    return order[:num_clips]


def warm_up(runner: Runner, clips: Sequence[Sequence[Any]], num_clips: int, *, seed: int = 0,
            prepare: Prepare | None = None, desc: str = "policy warm-up") -> None:
    """Train the runner's policy on ``num_clips`` clips before evaluation.

    The clips are drawn in epochs (:func:`warmup_order`); each clip starts with a full frame. Afterwards
    the runner starts a new clip and its statistics restart, so evaluation counts only
    its own frames. Learned weights stay.
    """
    chosen = [clips[index] for index in warmup_order(len(clips), num_clips, seed)]
    for _ in run_clips(runner, chosen, prepare=prepare, desc=desc, total=sum(len(clip) for clip in chosen)):
        pass
    runner.reset()
    runner.reset_statistics()


def format_statistics(summary: dict[str, Any]) -> str:
    """One line from :meth:`RunStatistics.as_dict` (after :func:`without_nan`): executed (and selected)
    fraction, GMACs per frame (network + policy) and ms per frame of each stage."""
    times = ", ".join(f"{stage} {'n/a' if ms is None else f'{ms:.2f}'}"
                      for stage, ms in summary["ms_per_frame"].items())
    selected = summary["policy_selected_fraction"]
    return (f"executed {summary['executed_fraction']:.3f}" + ("" if selected is None else f" (selected {selected:.3f})")
            + f", GMACs/frame {summary['gmacs_per_frame']:.3f} (network {summary['network_gmacs_per_frame']:.3f} + "
            f"policy {summary['policy_gmacs_per_frame']:.3f}), ms/frame: {times}")


def without_nan(value: Any) -> Any:
    """``value`` (nested dicts and lists) with every NaN float replaced by None: plain JSON has no NaN, and
    a results file should say "not measured" rather than hold an invalid number."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nan(item) for item in value]
    return value
