"""Compiled frame programs: a bucket's whole sparse forward as one graph that inductor optimises.

Eagerly, the engine runs each op of the model as its own kernel: a convolution, then BatchNorm, the
activation, the residual add, the state write and the next op's halo gather, each reading and writing
the tile batch again. A compiled dense model fuses all the elementwise work into a few kernels, and
the eager engine cannot catch up with it by tuning.

Here the engine's frame body (tile index, input cuts, the model on the tiles with every state write and
halo gather, output scatters) is traced once per bucket with ``make_fx`` into an FX graph of aten ops,
with the clip's state tensors as explicit, mutated inputs and the tile moves in their pure-PyTorch
indexing form (:func:`blockcopy_core.tiles.reference_moves`), and that graph is compiled by inductor.
Inductor then fuses each op's epilogue (BatchNorm, activation, residual add) with the state write and
the next halo gather into one kernel, writing the states in place. The result is called like the eager
body and, on CUDA, captured in the bucket's CUDA graph as before.

A program depends on the model's weights (read when it runs, never copied), the frame geometry, the
input format, the bucket and the layout of the states; it does not hold the clip's tensors, so one
program serves every clip of that shape.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from . import activation, tiles


@dataclass
class FrameProgram:
    """A compiled frame body: ``run(*inputs, *state)`` does what the eager body did on ``inputs`` with
    the clip's ``state`` tensors (written in place); ``macs`` is the MAC count it executes."""

    run: Callable[..., object]
    macs: int
    compile_seconds: float


def compile_frame(body: Callable[..., int], bind_state: Callable[[list], list], inputs: Sequence[torch.Tensor],
                  state: Sequence[torch.Tensor]) -> FrameProgram:
    """Trace ``body(*inputs)`` and compile it with inductor.

    Args:
        body: the eager frame body; it reads and writes the engine's state in place and returns its MACs.
        bind_state: installs a list of state tensors in the engine and returns the ones it replaced.
        inputs: example inputs of ``body`` (its static buffers).
        state: the engine's current state tensors, in ``bind_state`` order.

    The trace runs ``body`` on copies of ``inputs`` and ``state``, so the clip is left untouched.
    """
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    started = time.perf_counter()
    count = len(inputs)
    macs = []

    def program(*args):
        previous = bind_state(list(args[count:]))
        activation.trace_with(get_proxy_mode().tracer)
        try:
            macs.append(body(*args[:count]))
        finally:
            activation.trace_with(None)
            bind_state(previous)

    with _one_trace, tiles.reference_moves():
        compiled = _trace_and_compile(program, [t.clone() for t in list(inputs) + list(state)])
    if inputs and inputs[0].is_cuda:
        torch.cuda.synchronize(inputs[0].device)
    return FrameProgram(compiled, int(macs[-1]), time.perf_counter() - started)


def compile_function(fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
    """``fn`` traced on ``args`` and compiled by inductor: a callable taking arguments of the same structure
    (pytrees whose tensors have the examples' shapes, and equal non-tensor leaves) and returning what
    ``fn`` returns. ``fn`` must read nothing on the host and run under ``torch.no_grad`` (its tensors are
    traced as graph inputs, its control flow is fixed by the examples)."""
    leaves, in_spec = pytree.tree_flatten(args)
    tensor_at = [isinstance(leaf, torch.Tensor) for leaf in leaves]
    constants = [None if is_tensor else leaf for leaf, is_tensor in zip(leaves, tensor_at)]
    out_specs = []

    def flat(*tensors):
        inputs = iter(tensors)
        call = [next(inputs) if is_tensor else constant for is_tensor, constant in zip(tensor_at, constants)]
        outputs, out_spec = pytree.tree_flatten(fn(*pytree.tree_unflatten(call, in_spec)))
        out_specs.append(out_spec)
        return outputs

    compiled = _trace_and_compile(flat, [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)])
    out_spec = out_specs[-1]

    def run(*call_args):
        call, spec = pytree.tree_flatten(call_args)
        if spec != in_spec or [isinstance(leaf, torch.Tensor) for leaf in call] != tensor_at or any(
                not is_tensor and leaf != constant for leaf, is_tensor, constant in zip(call, tensor_at, constants)):
            raise ValueError(f"{getattr(fn, '__name__', fn)!r} was compiled for arguments of another structure")
        return pytree.tree_unflatten(list(compiled(*(leaf for leaf in call if isinstance(leaf, torch.Tensor)))),
                                     out_spec)

    return run


def _trace_and_compile(fn: Callable[..., Any], examples: list[torch.Tensor]) -> Callable[..., Any]:
    """``fn(*examples)`` traced by ``make_fx`` into a graph of aten ops and compiled by inductor."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad(), _one_trace:
        graph = make_fx(fn, tracing_mode="real")(*examples)
        # freezing needs the parameter bookkeeping of torch.compile's front end, which a traced graph
        # does not have (its weights are graph constants)
        with inductor_config.patch(freezing=False):
            return compile_fx(graph, examples)


# tracing swaps module-level switches (reference tile moves, the tracer); reentrant, since a frame's
# trace holds it around the reference moves and the trace itself
_one_trace = threading.RLock()
