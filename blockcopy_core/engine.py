"""The block-sparse engine: run a pretrained model on the executed blocks of each frame only.

``convert(model, block_size)`` returns a :class:`BlockSparseModel`. Its ``forward(x, grid)`` runs one
time step of N video streams: the first frame after ``reset()`` runs densely and records, for every op
that needs spatial context, its dense input (the layer's state); later frames run the model on a batch
of (K, C, T, T) tiles, one per executed block, with every op's halo gathered from the layer's state
(block padding, method.md section 1). Outputs are dense: blocks not executed keep their last values.

How ops are run is decided per op by the handlers in :mod:`blockcopy_core.ops`; this module holds the
per-clip state and the per-frame bookkeeping.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import resolve_name
from torch.utils import _pytree as pytree

from .activation import SPATIAL, VECTOR, Activation, active_executor, wrap
from .errors import ControlFlowChangedError, InvalidInputError, UnsupportedOperationError
from .grid import FrameGeometry, TileIndex
from .ops import HANDLERS
from .state import LayerState
from .tiles import extract_tiles, scatter_tiles

_OP_NAMES: dict = {}


def op_name(func) -> str:
    """Short name of a torch function: ``torch.nn.functional.conv2d`` -> ``conv2d``."""
    name = _OP_NAMES.get(func)
    if name is None:
        full = resolve_name(func) or getattr(func, "__qualname__", None) or repr(func)
        parts = full.split(".")
        name = parts[-2] if parts[-1] == "__get__" and len(parts) > 1 else parts[-1]
        _OP_NAMES[func] = name
    return name


@dataclass(frozen=True)
class FrameStats:
    """What one call of :meth:`BlockSparseModel.forward` executed (all N streams together)."""

    executed_blocks: int
    total_blocks: int
    macs: int

    @property
    def executed_fraction(self) -> float:
        return self.executed_blocks / self.total_blocks

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


class _FrameExecutor:
    """Routes the ops of one forward to their handlers; the handlers' view of the engine."""

    def __init__(self, engine: "BlockSparseModel", geometry: FrameGeometry, index: TileIndex | None):
        self.engine = engine
        self.geometry = geometry
        self.index = index
        self.dense_phase = index is None
        self.cursor = 0
        self.macs = 0

    def dispatch(self, func, args, kwargs):
        name = op_name(func)
        handler = HANDLERS.get(name)
        if handler is None:
            self.unsupported(name, "it is not known to act on each spatial position separately")
        with torch._C.DisableTorchFunctionSubclass():
            return handler(self, name, func, args, kwargs)

    @property
    def module_path(self) -> str:
        return self.engine._module_stack[-1] if self.engine._module_stack else "<model>"

    def unsupported(self, op: str, reason: str):
        raise UnsupportedOperationError(op, self.module_path, reason)

    def site(self, op: str) -> LayerState:
        """The state of the next spatial op call site, created on the clip's first frame."""
        layers = self.engine._layers
        if self.dense_phase:
            layers.append(LayerState(op, self.module_path))
        elif self.cursor >= len(layers) or (layers[self.cursor].op, layers[self.cursor].module_path) != (
                op, self.module_path):
            expected = layers[self.cursor] if self.cursor < len(layers) else None
            raise ControlFlowChangedError(
                f"the model ran '{op}' in '{self.module_path}' as spatial op #{self.cursor}, but on the clip's "
                f"first frame op #{self.cursor} was "
                f"{f'{expected.op!r} in {expected.module_path!r}' if expected else 'the end of the forward'}; "
                "block-sparse execution needs the same op sequence on every frame of a clip")
        self.cursor += 1
        return layers[self.cursor - 1]

    def add_macs(self, macs: int) -> None:
        self.macs += int(macs)

    def broadcast_vectors(self, args, kwargs):
        """On tiles, per-stream vectors (N, ...) are indexed to one row per tile (K, ...)."""
        if self.dense_phase:
            return args, kwargs

        def per_tile(value):
            if isinstance(value, Activation) and value.bc_role == VECTOR:
                return value.as_subclass(torch.Tensor)[self.index.stream]
            if isinstance(value, (list, tuple)):
                return type(value)(per_tile(v) for v in value)
            return value

        return per_tile(args), {k: per_tile(v) for k, v in kwargs.items()}

    def check_scaled(self, op: str, x: Activation, out: torch.Tensor, up=(1, 1), down=(1, 1)) -> None:
        """Check that ``op`` maps ``x`` to ``out`` at scale up/down and stays block-aligned."""
        h, w = x.shape[-2:]
        if x.bc_halo is not None:
            left, right, top, bottom = x.bc_halo
            h, w = h - top - bottom, w - left - right
        expected = [size * u / d for size, u, d in zip((h, w), up, down)]
        if list(out.shape[-2:]) != expected:
            self.unsupported(op, f"it maps {h}x{w} to {out.shape[-2]}x{out.shape[-1]} instead of "
                                 f"{expected[0]:g}x{expected[1]:g}: its padding or stride is not block-aligned "
                                 "(every layer's output must be the input scaled exactly by its stride)")
        self.engine._check_stride(op, self.module_path, out.shape[-2:], self.geometry, self.dense_phase)


class BlockSparseModel(nn.Module):
    """A model run block-sparse over the frames of N video streams.

    Build it with :func:`convert`. ``forward(x, grid)`` takes frames (N, C, H, W) and a bool execution
    grid (N, 1, H // block_size, W // block_size) (True = execute) and returns the model's output
    structure with dense tensors, where blocks not executed carry their last computed values.
    """

    def __init__(self, model: nn.Module, block_size: int):
        super().__init__()
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        self.model = copy.deepcopy(model, shared)  # own module tree (for hooks), the same weights
        self.block_size = block_size
        self._module_stack: list[str] = []
        for name, module in self.model.named_modules():
            if name:
                label = f"{name} ({type(module).__name__})"
                module.register_forward_pre_hook(lambda m, a, label=label: self._enter_module(label))
                module.register_forward_hook(lambda m, a, o: self._exit_module())
        self.reset()

    def _enter_module(self, label: str) -> None:
        self._module_stack.append(label)

    def _exit_module(self) -> None:
        self._module_stack.pop()

    def reset(self) -> None:
        """Start a new clip: forget all state; the next frame must execute every block."""
        self._geometry: FrameGeometry | None = None
        self._frame_format = None
        self._layers: list[LayerState] = []
        self._output_spec = None
        self._outputs: list[torch.Tensor] = []
        self.frame_state: torch.Tensor | None = None  # (N, C, H, W): each block's pixels at its last execution
        self.last_stats: FrameStats | None = None

    @property
    def layer_states(self) -> list[LayerState]:
        """The dense state of each spatial op call site, in execution order."""
        return list(self._layers)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, grid: torch.Tensor):
        geometry = FrameGeometry.of_frame(x, self.block_size)
        geometry.check_grid(grid, x.device)
        if not bool(torch.isfinite(x).all()):
            raise InvalidInputError("the frame contains NaN or infinite values")
        if self._geometry is None:
            if not bool(grid.all()):
                raise InvalidInputError("the first frame after reset() must execute all blocks "
                                        "(its grid must be all True)")
            return self._run_dense(x, geometry)
        if geometry != self._geometry or (x.dtype, x.device) != self._frame_format:
            raise InvalidInputError(
                f"frames changed mid-clip from {self._describe(self._geometry, *self._frame_format)} to "
                f"{self._describe(geometry, x.dtype, x.device)}; call reset() to start a new clip")
        return self._run_sparse(x, TileIndex.from_grid(grid), geometry)

    @staticmethod
    def _describe(g: FrameGeometry, dtype, device) -> str:
        return f"N={g.batch} x {g.channels}x{g.height}x{g.width} ({dtype}, {device})"

    def _run_dense(self, x: torch.Tensor, geometry: FrameGeometry):
        self.reset()
        executor = _FrameExecutor(self, geometry, None)
        out = self._call_model(executor, wrap(x, SPATIAL))
        leaves, spec = pytree.tree_flatten(out)
        for i, leaf in enumerate(leaves):
            self._check_output_leaf(i, leaf, geometry, dense=True)
        self._output_spec = spec
        self._outputs = [leaf.as_subclass(torch.Tensor).clone() for leaf in leaves]
        self._geometry, self._frame_format = geometry, (x.dtype, x.device)
        self.frame_state = x.clone()
        self.last_stats = FrameStats(geometry.batch * geometry.blocks_per_frame,
                                     geometry.batch * geometry.blocks_per_frame, executor.macs)
        return self._current_outputs()

    def _run_sparse(self, x: torch.Tensor, index: TileIndex, geometry: FrameGeometry):
        tiles = extract_tiles(x, index, self.block_size)
        scatter_tiles(self.frame_state, tiles, index)
        executor = _FrameExecutor(self, geometry, index)
        if len(index):
            out = self._call_model(executor, wrap(tiles, SPATIAL))
            if executor.cursor != len(self._layers):
                raise ControlFlowChangedError(
                    f"the model ran {executor.cursor} spatial ops, but {len(self._layers)} on the clip's first "
                    "frame; block-sparse execution needs the same op sequence on every frame of a clip")
            leaves, spec = pytree.tree_flatten(out)
            if spec != self._output_spec:
                raise ControlFlowChangedError(f"the model's output structure changed from {self._output_spec} "
                                              f"to {spec} since the clip's first frame")
            for i, (leaf, buffer) in enumerate(zip(leaves, self._outputs)):
                self._check_output_leaf(i, leaf, geometry, dense=False)
                scatter_tiles(buffer, leaf.as_subclass(torch.Tensor), index)
        self.last_stats = FrameStats(len(index), geometry.batch * geometry.blocks_per_frame, executor.macs)
        return self._current_outputs()

    def _call_model(self, executor: _FrameExecutor, x: Activation):
        self._module_stack.clear()
        with active_executor(executor):
            return self.model(x)

    def _current_outputs(self):
        return pytree.tree_unflatten([buffer.clone() for buffer in self._outputs], self._output_spec)

    def _check_output_leaf(self, i: int, leaf, geometry: FrameGeometry, dense: bool) -> None:
        if not isinstance(leaf, Activation) or leaf.bc_role != SPATIAL or leaf.bc_halo is not None \
                or leaf.dim() != 4:
            raise UnsupportedOperationError(
                "output", "<model>", f"output #{i} is not a (N, C, H, W) feature map computed from the frame "
                                     f"({type(leaf).__name__}); block-sparse models must return feature maps")
        self._check_stride("output", "<model>", leaf.shape[-2:], geometry, dense)

    def _check_stride(self, op: str, module_path: str, size, geometry: FrameGeometry, dense: bool) -> None:
        """A map of ``size`` (H_l, W_l) must have one integer stride dividing the block size."""
        extent = (geometry.height, geometry.width) if dense else (self.block_size, self.block_size)
        h, w = int(size[0]), int(size[1])
        if h == 0 or w == 0 or extent[0] % h or extent[1] % w or extent[0] // h != extent[1] // w \
                or self.block_size % (extent[0] // h):
            stride = f"{extent[0] / h:g}x{extent[1] / w:g}" if h and w else "undefined"
            raise UnsupportedOperationError(
                op, module_path, f"its output has stride {stride} relative to the frame, which does not divide "
                                 f"the block size {self.block_size}; use a block size that is a multiple of "
                                 "every layer's stride")


def convert(model: nn.Module, block_size: int) -> BlockSparseModel:
    """Wrap ``model`` for block-sparse execution with square blocks of ``block_size`` pixels.

    The returned module shares ``model``'s parameters and buffers (no copy of the weights). Put the model
    in eval mode: BatchNorm and dropout in training mode cannot run block-sparse.
    """
    return BlockSparseModel(model, block_size)
