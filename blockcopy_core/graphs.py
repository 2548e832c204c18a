"""CUDA graphs per bucket of executed-block counts: the sparse forward without per-op launch overhead.

Eager PyTorch on a modern GPU is launch-bound at these model sizes, so skipping blocks saves nothing
unless the per-frame Python and launch overhead goes. The engine rounds the executed-block count up to
a bucket (a multiple of 1/16 of the grid, the method's own rule), so only a few shapes occur; each
bucket's forward is captured once and then replayed on static input buffers.
"""
from __future__ import annotations

import gc
import warnings
from typing import Any, Callable, Hashable

import torch
import torch.utils._pytree as pytree

Body = Callable[..., int]
_WARMUP_RUNS = 3  # eager runs before a capture (lazy initialisation, cuDNN heuristics), as torch advises


class BucketGraphs:
    """One captured CUDA graph per bucket, all sharing one memory pool (they never run concurrently).

    A body must be idempotent for the same inputs and keep its results in buffers allocated before the
    capture (written in place), since a replay re-runs only the recorded kernels. A bucket whose capture
    fails (an op that cannot be captured) runs eagerly from then on, with a warning.
    """

    def __init__(self):
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph | None, int]] = {}
        self._static: list[torch.Tensor] = []  # input buffers by position, shared by all buckets
        self._pool = None

    def clear(self) -> None:
        self._graphs.clear()
        self._static = []

    def __len__(self) -> int:
        return sum(graph is not None for graph, _ in self._graphs.values())

    def stage(self, *inputs: torch.Tensor) -> None:
        """Copy a frame's inputs into the static buffers the graphs read (by position)."""
        self._static += [torch.empty_like(t) for t in inputs[len(self._static):]]
        for buffer, value in zip(self._static, inputs):
            buffer.copy_(value)

    def run(self, key: Hashable, body: Body, count: int) -> int:
        """Run ``body`` (which returns its MAC count) on the first ``count`` staged inputs through the
        graph of ``key``.

        The first call of a key runs ``body`` eagerly on a side stream (computing this frame) and then
        captures it; later calls replay.
        """
        static = self._static[:count]
        if key in self._graphs:
            graph, macs = self._graphs[key]
            if graph is None:
                return body(*static)
            graph.replay()
            return macs
        macs = _warm_up(body, static)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            graph, _ = _capture(body, static, self._pool)
        except RuntimeError as error:
            warnings.warn(f"blockcopy: capturing the CUDA graph of bucket {key!r} failed ({error}); this "
                          "bucket runs eagerly", RuntimeWarning, stacklevel=3)
            torch.cuda.synchronize()
            graph = None
        self._graphs[key] = (graph, macs)
        return macs


def _warm_up(body: Callable, inputs: list[torch.Tensor]):
    """Run ``body(*inputs)`` eagerly a few times on a side stream (lazy initialisation, cuDNN
    heuristics), as torch advises before a capture; returns the last run's result."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(_WARMUP_RUNS):
            result = body(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    return result


def _capture(body: Callable, inputs: list[torch.Tensor], pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Capture ``body(*inputs)`` as a CUDA graph; returns the graph and what the captured call returned
    (tensors that each replay rewrites)."""
    graph = torch.cuda.CUDAGraph()
    # A garbage collection during the capture could free another graph or CUDA memory, which is not
    # permitted while a stream captures: collect before, and not during.
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            result = body(*inputs)
    finally:
        if collecting:
            gc.enable()
    return graph, result


def graphed(fn: Callable[[Any], object], example: Any) -> Callable[[Any], object]:
    """``fn`` captured once as a CUDA graph for arguments shaped like ``example`` (a CUDA tensor, or a pytree
    of them: lists, tuples, dicts).

    Returns ``call(x)``: copies ``x`` into the graph's input buffers, replays, and returns a copy of
    ``fn``'s output (a tensor or any pytree of tensors). Use it for a dense reference with the launch
    overhead removed, as the engine's buckets have it.
    """
    leaves = pytree.tree_leaves(example)
    if not leaves or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in leaves):
        raise ValueError(f"graphed needs a CUDA example input (a tensor or a pytree of them), got {_describe(example)}")
    static_in = clone_tensors(example)
    _warm_up(fn, [static_in])
    graph, static_out = _capture(fn, [static_in])

    def call(x):
        if _describe(x) != _describe(static_in):
            raise ValueError(f"the graph was captured for {_describe(static_in)}, got {_describe(x)}")
        copy_into(static_in, x)
        graph.replay()
        return clone_tensors(static_out)

    return call


def graphed_by_shape(fn: Callable[[Any], object]) -> Callable[[Any], object]:
    """``fn`` as :func:`graphed` calls, one CUDA graph per shape, dtype and device of the argument
    (captured on the first call with it)."""
    graphs: dict[str, Callable[[Any], object]] = {}

    def call(x):
        key = _describe(x)
        if key not in graphs:
            graphs[key] = graphed(fn, x)
        return graphs[key](x)

    return call


def _describe(tree: Any) -> str:
    """Shapes, dtypes and devices of the tensors of ``tree``, in its structure."""
    return str(pytree.tree_map(lambda t: f"{tuple(t.shape)} {t.dtype} on {t.device}"
                               if isinstance(t, torch.Tensor) else t, tree))


def clone_tensors(tree: Any) -> Any:
    """``tree`` with each tensor cloned."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def copy_into(destination: Any, source: Any) -> None:
    """Copy the tensors of ``source`` into those of ``destination`` (same structure and shapes), skipping
    tensors that are already the destination's."""
    targets, spec = pytree.tree_flatten(destination)
    values, source_spec = pytree.tree_flatten(source)
    if source_spec != spec or any(t.shape != v.shape for t, v in zip(targets, values)):
        raise ValueError("static buffers and the values to copy into them differ in structure or shape")
    for target, value in zip(targets, values):
        if target is not value:
            target.copy_(value)
