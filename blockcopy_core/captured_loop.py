"""The online loop of :meth:`BlockCopy.step` captured in CUDA graphs (``BlockCopy(..., capture_loop=True)``).

Per frame, besides the task network, the loop runs the policy network and its sampling, the adapter's
decoding and O_t painting, the block information gain, the rewards and the REINFORCE backward pass: some
hundred small kernels, whose launches and host synchronisations cost more than their arithmetic on a GPU.
Here each stage is a CUDA graph replayed every frame:

* ``select``: the policy frames, the policy network (training mode: BatchNorm statistics, autograd's
  saved tensors), the Bernoulli draw (CUDA graphs draw fresh random numbers on every replay);
* ``postprocess``: the adapter's ``decode`` and ``output_masks`` on the network's outputs (with
  :meth:`BlockCopy.select`/:meth:`BlockCopy.observe`, where the framework decodes: ``output_masks`` of its
  result, padded to fixed shapes by the adapter's ``fixed_result``);
* ``information_gain``: the adapter's ``block_information_gain`` against the previous frame's result;
* ``reward``: cost average, rewards, the frame's loss and statistics; the frame's result, masks and grid
  stored as the next frame's previous ones;
* ``backward``: the loss's gradient (the backward pass of the ``select`` graph, captured as in
  :func:`torch.cuda.make_graphed_callables`) added to the policy network's ``.grad`` (``backward_start``:
  written over it, for the first frame of an update interval);
* ``step``: the optimiser step (RMSprop with ``capturable=True``: its step counts on the GPU), after the
  last frame of an update interval.

The backward pass of frame t needs nothing that frame t + 1's policy and network produce, and they need
nothing it produces (the weights change only at optimiser steps), so it runs on a side stream while the
next frame's network runs. Frames alternate between two slots, each with its own ``select``, ``reward``
and backward graphs, so that frame t + 1's policy does not overwrite the tensors frame t's backward
pass reads; a slot waits for its backward pass of two frames before it is replayed. Every
``update_interval`` frames the optimiser step follows the backward pass on the side stream, and the next
frame's policy waits for both: it sees the updated weights, exactly as in the eager loop. What reads or
writes the policy's tensors from outside (``state_dict``, ``load_state_dict``, the eager loop) waits for
the side stream first (``ReinforcePolicy.wait_for_updates``).

With ``compile=True`` (``BlockCopy(..., compile_loop=True)``) the policy network's forward and backward
passes (``torch.compile``), the decoding with O_t and the block IG (traced and compiled by inductor,
:func:`blockcopy_core.compiled.compile_function`) are compiled before they are captured: their elementwise
ops fused into few kernels.

Shapes are fixed by the clip (N, frame size) and by the adapter (detections padded to a fixed count),
so one set of graphs serves every frame of every clip of that shape; the graphs are captured after the
first frame of the first such clip. The only host read left in a frame is the engine's count of
executed blocks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import time

import torch
import torch.utils._pytree as pytree

from .adapters import fixed_shapes
from .compiled import compile_function
from .graphs import clone_tensors, copy_into, graphed
from .policy import PolicyObservation
from .policy.reinforce import FRAME_STATISTICS

if TYPE_CHECKING:
    from .blockcopy import BlockCopy

SLOTS = 2


def captured_function(fn: Callable[[Any], Any], example: Any) -> Callable[[Any], Any]:
    """``fn`` (one pytree of tensors in, one out; fixed shapes, no host reads with the adapters'
    :func:`~blockcopy_core.adapters.fixed_shapes`) compiled by inductor and, on CUDA, replayed as a CUDA
    graph (:func:`~blockcopy_core.graphs.graphed`: arguments copied in, copies of the outputs returned).
    Built on ``example``; later arguments must have its structure and shapes."""
    with fixed_shapes():
        compiled = compile_function(fn, example)
    leaves = pytree.tree_leaves(example)
    return graphed(compiled, example) if leaves and leaves[0].is_cuda else compiled


def loop_key(blockcopy: "BlockCopy", frames: torch.Tensor, source: Any, decodes: bool) -> tuple:
    """What fixes a captured loop: frame layout, the layout of what its postprocessing reads (the network's
    outputs, or the fixed result where it does not decode), and whether the policy learns."""
    leaves, spec = pytree.tree_flatten(source)
    return (tuple(frames.shape), frames.dtype, frames.device, decodes, spec,
            tuple((t.shape, t.dtype) for t in leaves), blockcopy.policy.training)


class _Slot:
    """The graphs of one of the two alternating frames and the tensors only they use."""

    def __init__(self) -> None:
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.backward_done = torch.cuda.Event()
        self.backward_pending = False  # a backward pass reading this slot's tensors may still run
        self.actions = self.log_probs = self.probs = self.grid = self.loss = self.statistics = None


class CapturedLoop:
    """The graphs of one loop key and the static tensors they read and write.

    Built after a clip's first (full, eager) frame from that frame's tensors, which give the shapes; each
    body runs once eagerly on a side stream first (its effects undone), as CUDA graph capture needs.

    Args:
        owner: the :class:`BlockCopy` whose policy (a :class:`ReinforcePolicy`) and adapter the graphs run.
        frames: (N, C, H, W) frames of the model's input.
        result, masks: the frames' result (fixed shapes) and O_t.
        decodes: the graphs decode the network's outputs (the engine's ``output_state``); otherwise the
            caller decodes (:meth:`BlockCopy.observe`) and the graphs start from its result, in the
            adapter's fixed shapes.
        compile: compile the stages before capturing them (``compile_seconds`` says how long it took).
    """

    def __init__(self, owner: "BlockCopy", frames: torch.Tensor, result: Any, masks: torch.Tensor, *,
                 decodes: bool, compile: bool = False) -> None:
        self.owner = owner
        self.decodes = decodes
        # what the postprocessing graph reads: refreshed before each replay unless already this tensor
        self.source = owner.sparse.output_state if self.decodes else clone_tensors(result)
        self.key = loop_key(owner, frames, self.source, self.decodes)
        policy = owner.policy
        self.learn = policy.training
        self.frame_size = (frames.shape[-2], frames.shape[-1])
        device = frames.device
        grid_shape = (frames.shape[0], 1, frames.shape[-2] // owner.block_size, frames.shape[-1] // owner.block_size)
        # inputs of the graphs, refreshed before a replay where they are not already these tensors
        self.frames = frames.clone()
        self.frame_state = owner.sparse.frame_state
        self.prev_result = clone_tensors(result)
        self.prev_masks = masks.clone()
        self.prev_grid = torch.ones(grid_shape, dtype=torch.bool, device=device)
        self.target = torch.full((), policy.target, device=device)
        self._target_value = policy.target
        self.cost_average = policy.previous_cost_average(self.prev_grid.float())
        self.params = list(policy.net.parameters())
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        self.grads = [param.grad for param in self.params]
        self.main = torch.cuda.current_stream(device)
        self.side = torch.cuda.Stream(device)
        self.slots = [_Slot() for _ in range(SLOTS)]
        self.weights_changing = False  # an optimiser step was launched on the side stream
        self.frame_number = -1  # of the frames replayed, counting from the first; picks the slot
        self.slot = self.slots[0]
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        adapter = owner.adapter
        self.policy_macs = owner._count_policy_macs(PolicyObservation(
            adapter.policy_frame(self.frames), adapter.policy_frame(self.frame_state), self.prev_masks,
            self.prev_grid))
        self.compile_seconds = 0.0
        self._logits, self._block_ig = self._policy_logits, self._block_gain
        self._decode = self._decode_and_mask if self.decodes else self._mask
        if compile:
            self._compile()
        self._capture()

    def matches(self, frames: torch.Tensor, learning: bool) -> bool:
        """Whether these frames (and the policy's mode) are those the graphs were captured for."""
        return self.key[:3] == (tuple(frames.shape), frames.dtype, frames.device) and self.key[-1] == learning

    # Pure pieces of the bodies (what compile=True compiles).

    def _policy_logits(self, frames: torch.Tensor, frame_state: torch.Tensor, prev_masks: torch.Tensor,
                       prev_grid: torch.Tensor) -> torch.Tensor:
        adapter = self.owner.adapter
        return self.owner.policy.net(adapter.policy_frame(frames), adapter.policy_frame(frame_state), prev_masks,
                                     prev_grid)

    def _decode_and_mask(self, outputs: Any) -> tuple[Any, torch.Tensor]:
        adapter = self.owner.adapter
        result = adapter.decode(outputs, self.frame_size)
        return result, adapter.output_masks(result, self.frame_size)

    def _mask(self, result: Any) -> torch.Tensor:
        return self.owner.adapter.output_masks(result, self.frame_size)

    def _block_gain(self, result: Any, prev_result: Any) -> torch.Tensor:
        return self.owner.adapter.block_information_gain(result, prev_result, self.frame_size, self.owner.block_size)

    def _compile(self) -> None:
        """Compile the pure pieces; the policy network's passes compile on their first call (in
        :meth:`_capture`'s run before capture)."""
        started = time.perf_counter()
        self._logits = torch.compile(self._policy_logits, dynamic=False, options={"freezing": False})
        with fixed_shapes():
            self._decode = compile_function(self._decode, self.source)
            result = self._decode(self.source)[0] if self.decodes else self.source
            self._block_ig = compile_function(self._block_gain, result, self.prev_result)
        torch.cuda.synchronize(self.frames.device)
        self.compile_seconds += time.perf_counter() - started

    # The bodies: what the graphs replay. Each writes its results as attributes (static tensors).

    def _select(self, slot: _Slot) -> None:
        policy = self.owner.policy
        with policy._autograd():
            slot.actions, slot.log_probs, slot.probs = policy.draw(
                self._logits(self.frames, self.frame_state, self.prev_masks, self.prev_grid))
        slot.grid = slot.actions.bool()

    def _postprocess(self) -> None:
        if self.decodes:
            self.result, self.masks = self._decode(self.source)
        else:
            self.result, self.masks = self.source, self._decode(self.source)

    def _information_gain(self) -> None:
        self.block_ig = self._block_ig(self.result, self.prev_result)

    def _reward(self, slot: _Slot) -> None:
        policy = self.owner.policy
        with policy._autograd():
            slot.loss, cost_average, rewards = policy.frame_loss(slot.log_probs, slot.actions, self.block_ig,
                                                                 self.cost_average, self.target)
        statistics = policy.frame_statistics(slot.actions, self.block_ig, slot.loss, rewards, cost_average, slot.probs)
        slot.statistics = torch.stack([statistics[name].float() for name in FRAME_STATISTICS])
        self.cost_average.copy_(cost_average)
        copy_into(self.prev_result, self.result)
        self.prev_masks.copy_(self.masks)
        self.prev_grid.copy_(slot.grid)

    def _backward(self, slot: _Slot, start: bool) -> None:
        policy = self.owner.policy
        with policy._autograd():
            grads = torch.autograd.grad(slot.loss / policy.update_every, self.params, retain_graph=True)
        if start:
            torch._foreach_copy_(self.grads, grads)
        else:
            torch._foreach_add_(self.grads, grads)

    def _step(self) -> None:
        self.owner.policy.optimizer.step()

    def _optimizer_state(self) -> list[torch.Tensor]:
        """The optimiser's state tensors (what ``step`` reads and writes besides weights and gradients)."""
        state = self.owner.policy.optimizer.state
        return [value for param in self.params for value in state[param].values() if isinstance(value, torch.Tensor)]

    def _step_state_is_current(self) -> bool:
        """Whether the optimiser's state tensors are still those the step graph was captured on."""
        state = self._optimizer_state()
        return len(state) == len(self.step_state) and all(a is b for a, b in zip(state, self.step_state))

    def _make_step_capturable(self) -> None:
        """``capturable=True`` in every parameter group and the state (step counts too) on the GPU."""
        optimizer = self.owner.policy.optimizer
        for group in optimizer.param_groups:
            group["capturable"] = True
        device = self.frames.device
        for param in self.params:
            state = optimizer.state[param]
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and value.device != device:
                    state[name] = value.to(device)

    def _capture_step(self) -> None:
        """(Re)capture the optimiser step, on the optimiser's current state tensors: run once on the side
        stream first (creating the state of a fresh optimiser), every effect undone (new state starts at
        zero, as in every torch optimiser)."""
        self._make_step_capturable()
        state = self.owner.policy.optimizer.state
        before = {(id(param), name): value.clone() for param in self.params
                  for name, value in state[param].items() if isinstance(value, torch.Tensor)}
        weights = [param.detach().clone() for param in self.params]
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            self._step()
        self.main.wait_stream(self.side)
        for param, value in zip(self.params, weights):
            param.detach().copy_(value)
        for param in self.params:
            for name, value in state[param].items():
                if isinstance(value, torch.Tensor):
                    saved = before.get((id(param), name))
                    if saved is None:
                        value.zero_()
                    else:
                        value.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graphs["step"] = graph
        self.step_state = self._optimizer_state()

    def _capture(self) -> None:
        first = self.slots[0]
        bodies: list[tuple[str, _Slot | None, Callable[[], None]]] = [
            *((("select", slot, lambda s=slot: self._select(s))) for slot in self.slots),
            ("postprocess", None, self._postprocess),
            ("information_gain", None, self._information_gain),
            *((("reward", slot, lambda s=slot: self._reward(s))) for slot in self.slots),
        ]
        if self.learn:
            bodies += [(name, slot, lambda s=slot, start=start: self._backward(s, start)) for slot in self.slots
                       for name, start in (("backward", False), ("backward_start", True))]
        mutated = [*self.owner.policy.net.buffers(), *self.grads, self.cost_average, self.prev_masks, self.prev_grid,
                   *pytree.tree_leaves(self.prev_result)]
        saved = [t.clone() for t in mutated]
        started = time.perf_counter()
        self.side.wait_stream(self.main)
        # lazy initialisations (cuDNN, cuBLAS, autograd; the policy network's compilation) outside capture
        with torch.cuda.stream(self.side):
            self._select(first)
            self._postprocess()
            self._information_gain()
            self._reward(first)
            if self.learn:
                self._backward(first, False)
        self.main.wait_stream(self.side)
        if self._logits is not self._policy_logits:
            torch.cuda.synchronize(self.frames.device)
            self.compile_seconds += time.perf_counter() - started
        for tensor, value in zip(mutated, saved):
            tensor.copy_(value)
        for name, slot, body in bodies:
            # each graph its own memory pool: graphs that share one may reuse each other's temporaries, which
            # is safe only for graphs replayed one after the other in capture order, and the backward passes
            # run beside the next frame's graphs
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                body()
            (slot.graphs if slot is not None else self.graphs)[name] = graph
        if self.learn:
            self._capture_step()
            self.owner.policy.updates_in_flight = self.drain

    # One frame, stage by stage (BlockCopy times each call).

    def select(self, frames: torch.Tensor, frame_state: torch.Tensor, prev_masks: torch.Tensor,
               prev_grid: torch.Tensor, prev_result: Any) -> torch.Tensor:
        """Replay the policy; returns the (N, 1, Gh, Gw) bool grid (a static tensor: clone to keep it)."""
        self.frame_number += 1
        self.slot = self.slots[self.frame_number % SLOTS]
        if self.weights_changing:  # the policy must see the weights of the step launched by the last frame
            self.drain()
        elif self.slot.backward_pending:  # its tensors are still being read by the backward pass of frame t - 2
            self.main.wait_event(self.slot.backward_done)
        self.frames.copy_(frames)
        for static, value in ((self.frame_state, frame_state), (self.prev_masks, prev_masks),
                              (self.prev_grid, prev_grid)):
            if static is not value:
                static.copy_(value)
        if prev_result is not self.prev_result:
            copy_into(self.prev_result, prev_result)
        self.slot.graphs["select"].replay()
        return self.slot.grid

    def postprocess(self, source: Any) -> Any:
        """Replay decoding and O_t painting of ``source`` (the engine's ``output_state``; or, where the loop
        does not decode, O_t painting of a result in the adapter's fixed shapes); returns the result (static
        tensors)."""
        copy_into(self.source, source)
        self.graphs["postprocess"].replay()
        return self.result

    def information_gain(self) -> torch.Tensor:
        """Replay the block IG; returns (N, 1, Gh, Gw) (static)."""
        self.graphs["information_gain"].replay()
        return self.block_ig

    def update(self) -> dict[str, Any]:
        """Replay the rewards; start the backward pass on the side stream, and the optimiser step after it
        when due. Returns the frame's statistics (0-dim tensors of their own) and ``updated``."""
        policy, slot = self.owner.policy, self.slot
        if policy.target != self._target_value:
            self.target.fill_(policy.target)
            self._target_value = policy.target
        if policy._cost_average is not self.cost_average:
            self.cost_average.copy_(policy.previous_cost_average(slot.actions))
            policy._cost_average = self.cost_average
        slot.graphs["reward"].replay()
        statistics = dict(zip(FRAME_STATISTICS, slot.statistics.clone().unbind()))
        if not self.learn:
            return {**statistics, "updated": False}
        starts, completes = policy.starts_interval, policy.completes_interval
        if any(param.grad is not grad for param, grad in zip(self.params, self.grads)):
            self.drain()
            for param, grad in zip(self.params, self.grads):
                if param.grad is not grad:  # replaced by an eager backward pass: accumulate on its value
                    if param.grad is None and not starts:
                        grad.zero_()
                    elif not starts:
                        grad.copy_(param.grad)
                    param.grad = grad
        if completes and not self._step_state_is_current():
            # the optimiser's state was replaced (load_state_dict): the step graph read the old tensors
            self.drain()
            self._capture_step()
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            slot.graphs["backward_start" if starts else "backward"].replay()
            slot.backward_done.record(self.side)
            if completes:
                self.graphs["step"].replay()
        slot.backward_pending = True
        self.weights_changing = completes
        return {**statistics, "updated": policy.count_observed_frame(step=False)}

    def drain(self) -> None:
        """Make the current stream wait for every backward pass and optimiser step launched so far."""
        torch.cuda.current_stream(self.main.device).wait_stream(self.side)
        self.main.wait_stream(self.side)
        for slot in self.slots:
            slot.backward_pending = False
        self.weights_changing = False
