"""The online loop of :meth:`BlockCopy.step` captured in CUDA graphs (``BlockCopy(..., capture_loop=True)``).

Per frame, besides the task network, the loop runs the policy network and its sampling, the adapter's
decoding and O_t painting, the block information gain, the rewards and the REINFORCE backward pass: some
hundred small kernels, whose launches and host synchronisations cost more than their arithmetic on a GPU.
Here each stage is a CUDA graph replayed every frame:

* ``select``: the policy frames, the policy network (training mode: BatchNorm statistics, autograd's
  saved tensors), the Bernoulli draw (CUDA graphs draw fresh random numbers on every replay);
* ``postprocess``: the adapter's ``decode`` and ``output_masks`` on the network's outputs;
* ``information_gain``: the adapter's ``block_information_gain`` against the previous frame's result;
* ``reward``: cost average, rewards, the frame's loss and statistics; the frame's result, masks and grid
  stored as the next frame's previous ones;
* ``backward``: the loss's gradient (the backward pass of the ``select`` graph, captured as in
  :func:`torch.cuda.make_graphed_callables`) added to the policy network's ``.grad``.

The backward pass of frame t needs nothing that frame t + 1's policy and network produce, and they need
nothing it produces (the weights change only at optimiser steps), so it runs on a side stream while the
next frame's network runs. Frames alternate between two slots, each with its own ``select``, ``reward``
and ``backward`` graphs, so that frame t + 1's policy does not overwrite the tensors frame t's backward
pass reads; a slot waits for its backward pass of two frames before it is replayed. Every
``update_interval`` frames the main stream waits for the backward pass and the optimiser steps eagerly
(one foreach RMSprop step, no host read): the next frame's policy sees the updated weights, exactly as
in the eager loop.

Shapes are fixed by the clip (N, frame size) and by the adapter (detections padded to a fixed count),
so one set of graphs serves every frame of every clip of that shape; the graphs are captured after the
first frame of the first such clip. The only host read left in a frame is the engine's count of
executed blocks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.utils._pytree as pytree

from .policy import PolicyObservation
from .policy.reinforce import FRAME_STATISTICS

if TYPE_CHECKING:
    from .blockcopy import BlockCopy

SLOTS = 2


def clone_tensors(tree: Any) -> Any:
    """``tree`` with each tensor cloned."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def _copy_into(destination: Any, source: Any) -> None:
    """Copy the tensors of ``source`` into those of ``destination`` (same structure and shapes)."""
    targets, spec = pytree.tree_flatten(destination)
    values, source_spec = pytree.tree_flatten(source)
    if source_spec != spec or any(t.shape != v.shape for t, v in zip(targets, values)):
        raise ValueError("the captured loop's buffers and this frame's values differ in structure or shape")
    for target, value in zip(targets, values):
        if target is not value:
            target.copy_(value)


def loop_key(blockcopy: "BlockCopy", frames: torch.Tensor, outputs: Any) -> tuple:
    """What fixes a captured loop: frame and output layouts, and whether the policy learns."""
    leaves, spec = pytree.tree_flatten(outputs)
    return (tuple(frames.shape), frames.dtype, frames.device, spec,
            tuple((t.shape, t.dtype) for t in leaves), blockcopy.policy.training)


class _Slot:
    """The graphs of one of the two alternating frames and the tensors only they use."""

    def __init__(self) -> None:
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.backward_done = torch.cuda.Event()
        self.backward_pending = False
        self.actions = self.log_probs = self.probs = self.grid = self.loss = self.statistics = None


class CapturedLoop:
    """The graphs of one loop key and the static tensors they read and write.

    Built after a clip's first (full, eager) frame from that frame's tensors, which give the shapes; each
    body runs once eagerly on a side stream first (its effects undone), as CUDA graph capture needs.

    Args:
        owner: the :class:`BlockCopy` whose policy (a :class:`ReinforcePolicy`) and adapter the graphs run.
        frames: (N, C, H, W) frames of the model's input.
        outputs: the model's outputs for them; result, masks: their decoding and O_t.
    """

    def __init__(self, owner: "BlockCopy", frames: torch.Tensor, outputs: Any, result: Any,
                 masks: torch.Tensor) -> None:
        self.owner = owner
        self.key = loop_key(owner, frames, outputs)
        policy = owner.policy
        self.learn = policy.training
        self.frame_size = (frames.shape[-2], frames.shape[-1])
        device = frames.device
        grid_shape = (frames.shape[0], 1, frames.shape[-2] // owner.block_size, frames.shape[-1] // owner.block_size)
        # inputs of the graphs, refreshed before a replay where they are not already these tensors
        self.frames = frames.clone()
        self.frame_state = owner.sparse.frame_state
        self.outputs = owner.sparse.output_state
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
        self.frame_number = -1  # of the frames replayed, counting from the first; picks the slot
        self.slot = self.slots[0]
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        adapter = owner.adapter
        self.policy_macs = owner._count_policy_macs(PolicyObservation(
            adapter.policy_frame(self.frames), adapter.policy_frame(self.frame_state), self.prev_masks,
            self.prev_grid))
        self._capture()

    def matches(self, frames: torch.Tensor, learning: bool) -> bool:
        """Whether these frames (and the policy's mode) are those the graphs were captured for."""
        return self.key[:3] == (tuple(frames.shape), frames.dtype, frames.device) and self.key[-1] == learning

    # The bodies: what the graphs replay. Each writes its results as attributes (static tensors).

    def _select(self, slot: _Slot) -> None:
        adapter, policy = self.owner.adapter, self.owner.policy
        with policy._autograd():
            observation = PolicyObservation(adapter.policy_frame(self.frames), adapter.policy_frame(self.frame_state),
                                            self.prev_masks, self.prev_grid)
            slot.actions, slot.log_probs, slot.probs = policy.sample(observation)
        slot.grid = slot.actions.bool()

    def _postprocess(self) -> None:
        adapter = self.owner.adapter
        self.result = adapter.decode(self.outputs, self.frame_size)
        self.masks = adapter.output_masks(self.result, self.frame_size)

    def _information_gain(self) -> None:
        self.block_ig = self.owner.adapter.block_information_gain(self.result, self.prev_result, self.frame_size,
                                                                  self.owner.block_size)

    def _reward(self, slot: _Slot) -> None:
        policy = self.owner.policy
        with policy._autograd():
            slot.loss, cost_average, rewards = policy.frame_loss(slot.log_probs, slot.actions, self.block_ig,
                                                                 self.cost_average, self.target)
        statistics = policy.frame_statistics(slot.actions, self.block_ig, slot.loss, rewards, cost_average, slot.probs)
        slot.statistics = torch.stack([statistics[name].float() for name in FRAME_STATISTICS])
        self.cost_average.copy_(cost_average)
        _copy_into(self.prev_result, self.result)
        self.prev_masks.copy_(self.masks)
        self.prev_grid.copy_(slot.grid)

    def _backward(self, slot: _Slot) -> None:
        policy = self.owner.policy
        with policy._autograd():
            grads = torch.autograd.grad(slot.loss / policy.update_every, self.params, retain_graph=True)
        torch._foreach_add_(self.grads, grads)

    def _capture(self) -> None:
        first = self.slots[0]
        bodies: list[tuple[str, _Slot | None, Callable[[], None]]] = [
            *((("select", slot, lambda s=slot: self._select(s))) for slot in self.slots),
            ("postprocess", None, self._postprocess),
            ("information_gain", None, self._information_gain),
            *((("reward", slot, lambda s=slot: self._reward(s))) for slot in self.slots),
        ]
        if self.learn:
            bodies += [("backward", slot, lambda s=slot: self._backward(s)) for slot in self.slots]
        mutated = [*self.owner.policy.net.buffers(), *self.grads, self.cost_average, self.prev_masks, self.prev_grid,
                   *pytree.tree_leaves(self.prev_result)]
        saved = [t.clone() for t in mutated]
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):  # lazy initialisations (cuDNN, cuBLAS, autograd) outside capture
            self._select(first)
            self._postprocess()
            self._information_gain()
            self._reward(first)
            if self.learn:
                self._backward(first)
        self.main.wait_stream(self.side)
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

    # One frame, stage by stage (BlockCopy times each call).

    def select(self, frames: torch.Tensor, frame_state: torch.Tensor, prev_masks: torch.Tensor,
               prev_grid: torch.Tensor, prev_result: Any) -> torch.Tensor:
        """Replay the policy; returns the (N, 1, Gh, Gw) bool grid (a static tensor: clone to keep it)."""
        self.frame_number += 1
        self.slot = self.slots[self.frame_number % SLOTS]
        if self.slot.backward_pending:  # its tensors are still being read by the backward pass of frame t - 2
            self.main.wait_event(self.slot.backward_done)
        self.frames.copy_(frames)
        for static, value in ((self.frame_state, frame_state), (self.prev_masks, prev_masks),
                              (self.prev_grid, prev_grid)):
            if static is not value:
                static.copy_(value)
        if prev_result is not self.prev_result:
            _copy_into(self.prev_result, prev_result)
        self.slot.graphs["select"].replay()
        return self.slot.grid

    def postprocess(self, outputs: Any) -> Any:
        """Replay decoding and O_t painting of ``outputs`` (the engine's ``output_state``); returns the result
        (static tensors)."""
        _copy_into(self.outputs, outputs)
        self.graphs["postprocess"].replay()
        return self.result

    def information_gain(self) -> torch.Tensor:
        """Replay the block IG; returns (N, 1, Gh, Gw) (static)."""
        self.graphs["information_gain"].replay()
        return self.block_ig

    def update(self) -> dict[str, Any]:
        """Replay the rewards; start the backward pass on the side stream; step the optimiser when due (after
        waiting for the backward pass). Returns the frame's statistics (0-dim tensors of their own) and
        ``updated``."""
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
        if policy.starts_interval or any(param.grad is not grad for param, grad in zip(self.params, self.grads)):
            self.drain()  # .grad is about to be zeroed or refilled: no backward pass may still add to it
            for param, grad in zip(self.params, self.grads):
                if param.grad is not grad:  # an eager backward pass replaced it
                    if param.grad is None:
                        grad.zero_()
                    else:
                        grad.copy_(param.grad)
                    param.grad = grad
            policy.start_accumulation()
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            slot.graphs["backward"].replay()
            slot.backward_done.record(self.side)
        slot.backward_pending = True
        if policy.completes_interval:
            self.drain()  # the optimiser step reads the whole gradient
        return {**statistics, "updated": policy.count_observed_frame()}

    def drain(self) -> None:
        """Make the main stream wait for every backward pass launched so far."""
        self.main.wait_stream(self.side)
        for slot in self.slots:
            slot.backward_pending = False
