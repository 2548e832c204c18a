"""Compiled frame programs: a bucket's whole sparse forward as one graph that inductor optimises.

Eagerly, the engine runs each op of the model as its own kernel: a convolution, then BatchNorm, the
activation, the residual add, the state write and the next op's halo gather, each reading and writing
the tile batch again. A compiled dense model fuses all the elementwise work into a few kernels, and
the eager engine cannot catch up with it by tuning.

Here the engine's frame body (tile index, input cuts, the model on the tiles with every state write and
halo gather, output scatters) is traced once per bucket with ``make_fx`` into an FX graph of aten ops,
with the clip's state tensors as explicit, mutated inputs and the tile moves in their pure-PyTorch
indexing form (:func:`blockcopy_core.tiles.reference_moves`). Each BatchNorm that follows a convolution
is folded into that convolution's weights (:func:`fold_batchnorm`), as inductor's freezing does for the
compiled dense model, and the graph is compiled by inductor (on the CPU with freezing, checked; see
:func:`compile_frame`). Inductor then fuses each op's epilogue
(bias, activation, residual add, BatchNorms that were not folded) with the state write and the next halo
gather into one kernel, writing the states in place. The result is called like the eager body and, on
CUDA, captured in the bucket's CUDA graph as before.

A program depends on the model's weights (read when it runs; folded ones copied once per model, shared by
its programs), the frame geometry, the input format, the bucket and the layout of the states; it does not
hold the clip's tensors, so one program serves every clip of that shape. The engine compiles again after
the weights changed (checked when a clip starts).
"""
from __future__ import annotations

import math
import operator
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
    the clip's ``state`` tensors (written in place); ``macs`` is the MAC count it executes; ``frozen``:
    compiled with inductor's freezing; ``freezing_failed``: freezing was tried and changed the results."""

    run: Callable[..., object]
    macs: int
    compile_seconds: float
    frozen: bool = False
    freezing_failed: bool = False


def agreement_tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    """How far a compiled program may stray from the eager one (:func:`relative_error`): summation order
    in fp32 (1e-3; 2e-2 with TF32 convolutions, PyTorch's CUDA default), rounding at other points in fp16
    (2e-2) and bf16 (1e-1). Wrong compilations (freezing on the CPU) have been off by 80 % and more."""
    if dtype in (torch.float32, torch.float64):
        return 2e-2 if tf32 else 1e-3
    return 1e-1 if dtype == torch.bfloat16 else 2e-2


def compile_frame(body: Callable[..., int], bind_state: Callable[[list], list], inputs: Sequence[torch.Tensor],
                  state: Sequence[torch.Tensor], folded: dict, freeze: bool = True) -> FrameProgram:
    """Trace ``body(*inputs)``, fold its BatchNorms into the convolutions before them
    (:func:`fold_batchnorm`) and compile it with inductor.

    On the CPU the program is compiled with inductor's freezing when ``freeze`` is set: the convolution
    weights then become oneDNN's pre-packed constants, which is what makes a compiled dense model fast
    there (ResNet-50's block-sparse frame 60 -> 54 ms on one core). Freezing has computed wrong results
    for some models on the CPU (torch 2.14: a float attribute multiplied in as 3.0 instead of 16.0 in
    CenterNet-MobileNetV3, now a buffer), so the frozen program is run once on copies of the state
    against the traced graph run as it is, and on a disagreement beyond :func:`agreement_tolerance` the
    program is compiled again without freezing (``freezing_failed``). On CUDA freezing is not used: the
    folding above is what it would add there.

    Args:
        body: the eager frame body; it reads and writes the engine's state in place and returns its MACs.
        bind_state: installs a list of state tensors in the engine and returns the ones it replaced.
        inputs: example inputs of ``body`` (its static buffers).
        state: the engine's current state tensors, in ``bind_state`` order.
        folded: the folded weights of earlier programs of the same model, shared with this one.
        freeze: try freezing on the CPU.

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
        return ()  # the results are the states written in place (freezing needs an output tuple)

    examples = [t.clone() for t in list(inputs) + list(state)]
    freezing_failed = False
    with _one_trace, tiles.reference_moves():
        for frozen in (True, False) if freeze and examples[0].device.type == "cpu" else (False,):
            graph = _trace(program, examples, lambda traced: fold_batchnorm(traced, folded))
            expected = _states_after(graph, examples) if frozen else None
            compiled = _compile(graph, examples, freezing=frozen)
            if not frozen:
                break
            if relative_error(_states_after(compiled, examples), expected) <= agreement_tolerance(examples[0].dtype):
                break
            freezing_failed = True
    if inputs and inputs[0].is_cuda:
        torch.cuda.synchronize(inputs[0].device)
    return FrameProgram(compiled, int(macs[-1]), time.perf_counter() - started, frozen, freezing_failed)


def _states_after(run: Callable[..., object], examples: list[torch.Tensor]) -> list[torch.Tensor]:
    """``run`` on copies of ``examples``, which it writes in place; the copies afterwards."""
    copies = [t.clone() for t in examples]
    with torch.no_grad():
        run(*copies)
    return copies


def relative_error(actual: Any, expected: Any) -> float:
    """Largest |actual - expected| over the tensors of two outputs (tensors or nestings of them), each
    relative to the largest finite |expected| of its tensor, in float32. Equal values, infinities
    included, differ by 0 (states padded with -inf); tensors that are not floating point must be equal."""
    worst = 0.0
    for a, e in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected)):
        if not e.is_floating_point():
            if not torch.equal(a, e):
                return math.inf
            continue
        a, e = a.float(), e.float()
        difference = torch.where(a == e, 0.0, (a - e).abs()).max()
        finite = e[torch.isfinite(e)].abs()
        scale = finite.max().clamp_min(1e-12) if finite.numel() else torch.tensor(1.0)
        error = (difference / scale).item()
        worst = max(worst, math.inf if math.isnan(error) else error)
    return worst


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
    with _one_trace:
        return _compile(_trace(fn, examples), examples, freezing=False)


def _trace(fn: Callable[..., Any], examples: list[torch.Tensor],
           rewrite: Callable[[torch.fx.GraphModule], object] | None = None) -> torch.fx.GraphModule:
    """``fn(*examples)`` traced by ``make_fx`` into a graph of aten ops (its weights graph constants),
    changed by ``rewrite`` if given."""
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad(), _one_trace:
        graph = make_fx(fn, tracing_mode="real")(*examples)
        if rewrite is not None:
            rewrite(graph)
    return graph


def _compile(graph: torch.fx.GraphModule, examples: list[torch.Tensor], freezing: bool) -> Callable[..., Any]:
    """``graph`` compiled by inductor for arguments like ``examples``, with or without freezing."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    with torch.no_grad(), inductor_config.patch(freezing=freezing):
        return compile_fx(graph, examples)


# eval-mode BatchNorm ops as make_fx records them (CPU, cuDNN, and the export form), with the position
# of eps among their arguments; all take (input, weight, bias, running_mean, running_var, ...)
_BATCH_NORM_EPS = {
    torch.ops.aten.native_batch_norm.default: 7,
    torch.ops.aten.cudnn_batch_norm.default: 7,
    torch.ops.aten._native_batch_norm_legit_no_training.default: 6,
}


def fold_batchnorm(graph: torch.fx.GraphModule, folded: dict) -> int:
    """Fold every eval-mode BatchNorm whose input is a convolution's output (and nothing else reads that
    output) into the convolution's weight and bias, as inductor's freezing does for a compiled dense model:
    the frame then computes ``conv(x, w * s, (b - mean) * s + beta)`` with ``s = gamma / sqrt(var + eps)``,
    instead of a multiply-add on every activation. Folded in float32, stored in the weight's dtype.

    Only graph constants are folded (the weights a traced frame reads); ``folded`` caches the folded
    tensors by their sources (pointer, version, dtype), so that a model's buckets share one copy. Returns
    the number of BatchNorms folded."""
    count = 0
    for norm in list(graph.graph.nodes):
        eps_at = _BATCH_NORM_EPS.get(norm.target) if norm.op == "call_function" else None
        conv = norm.args[0] if eps_at is not None and len(norm.args) > eps_at else None
        if not isinstance(conv, torch.fx.Node) or conv.target is not torch.ops.aten.convolution.default or len(
                conv.users) != 1 or len(conv.args) != 9:
            continue
        training = eps_at == 7 and norm.args[5]
        sources = [conv.args[1], conv.args[2], *norm.args[1:5]]
        readers = list(norm.users)
        if training or conv.args[6] or not all(  # transposed: output channels are not the weight's first dim
                s is None or (isinstance(s, torch.fx.Node) and s.op == "get_attr") for s in sources) or any(
                s is None for s in (sources[0], *sources[4:])) or any(
                r.target is not operator.getitem or (r.args[1] != 0 and r.users) for r in readers):
            continue
        tensors = [None if s is None else getattr(graph, s.target) for s in sources]
        eps = float(norm.args[eps_at])
        key = (eps, *(None if t is None else (t.data_ptr(), t._version, t.dtype) for t in tensors))
        if key not in folded:
            folded[key] = _folded(*tensors, eps)
        with graph.graph.inserting_before(conv):
            constants = []
            for kind, tensor in zip(("weight", "bias"), folded[key]):
                name = f"_folded_{kind}_{count}"
                graph.register_buffer(name, tensor, persistent=False)
                constants.append(graph.graph.get_attr(name))
        conv.args = (conv.args[0], *constants, *conv.args[3:])
        for reader in readers:
            if reader.args[1] == 0:
                reader.replace_all_uses_with(conv)
            graph.graph.erase_node(reader)
        graph.graph.erase_node(norm)
        for source in sources:
            if source is not None and not source.users:
                graph.graph.erase_node(source)
        count += 1
    if count:
        graph.recompile()
    return count


def _folded(weight, bias, gamma, beta, mean, var, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a convolution followed by an eval-mode BatchNorm, as one convolution."""
    scale = torch.rsqrt(var.float() + eps)
    if gamma is not None:
        scale = scale * gamma.float()
    shift = -mean.float() * scale if bias is None else (bias.float() - mean.float()) * scale
    if beta is not None:
        shift = shift + beta.float()
    shape = (-1,) + (1,) * (weight.dim() - 1)
    folded = torch.empty_like(weight)  # the weight's strides: channels_last stays channels_last
    folded.copy_(weight.float() * scale.view(shape))
    return folded, shift.to(weight.dtype)


# tracing swaps module-level switches (reference tile moves, the tracer); reentrant, since a frame's
# trace holds it around the reference moves and the trace itself
_one_trace = threading.RLock()
