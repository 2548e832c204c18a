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

import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import resolve_name
from torch.utils import _pytree as pytree

from .activation import SPATIAL, VECTOR, Activation, active_executor, plain, wrap
from .compiled import FrameProgram, compile_frame
from .config import BlockCopyConfig, input_divisibility
from .errors import (BlockCopyError, ConfigError, ControlFlowChangedError, InvalidInputError,
                     UnsupportedOperationError)
from .graphs import BucketGraphs
from .grid import FrameGeometry, TileIndex
from .ops import HANDLERS
from .state import LayerState
from .tiles import block_tile_map, extract_tiles, reference_only, scatter_tiles
from .timing import OverheadTimer

_OP_NAMES: dict = {}

_SHARED_REGISTRIES = ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules", "_state_dict_hooks",
                      "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
"""The nn.Module attributes a converted model shares with the original (same dict objects)."""


def _check_eval_mode(model: nn.Module) -> None:
    """Raise naming the first module in training mode: BatchNorm and dropout in training mode mix
    positions and streams, so block-sparse execution needs ``model.eval()``."""
    for name, module in model.named_modules():
        if module.training:
            path = f"{name} ({type(module).__name__})" if name else f"<model> ({type(module).__name__})"
            raise UnsupportedOperationError(
                "training mode", path, "the model is in training mode; call model.eval() before convert() and "
                "before running it (BatchNorm and dropout in training mode mix positions and streams)")


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
    overhead_seconds: float | None = None
    """Wall time of the engine's own work (tile moves, state writes) when timed, else None; see
    :attr:`BlockSparseModel.time_overhead`."""
    selected_blocks: int | None = None
    """Blocks the grid selected, before the bucket rounding on CUDA (None: as many as executed)."""
    compile_seconds: float = 0.0
    """Wall time this forward spent compiling frame programs (``compile=True``, a bucket's first use
    without :meth:`BlockSparseModel.warmup`); part of the forward's own wall time."""

    @property
    def executed_fraction(self) -> float:
        return self.executed_blocks / self.total_blocks

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


class _FrameExecutor:
    """Routes the ops of one forward to their handlers; the handlers' view of the engine."""

    def __init__(self, engine: "BlockSparseModel", geometry: FrameGeometry, index: TileIndex | None,
                 recording: bool = False):
        self.engine = engine
        self.geometry = geometry
        self.index = index
        self.dense_phase = index is None
        self.recording = recording
        self._tile_map = None
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
        if self.recording:
            layers.append(LayerState(op, self.module_path, self.engine._timer))
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

    @property
    def tile_map(self) -> torch.Tensor | None:
        """(N, Gh, Gw) int32 tile number of each executed block (-1 elsewhere), shared by all layers of
        the frame; built on CUDA only, where the fused update-and-gather kernel reads it."""
        if self._tile_map is None and self.index is not None and self.index.stream.is_cuda \
                and not reference_only():
            g = self.geometry
            with self.engine._timer:
                self._tile_map = block_tile_map(self.index, (g.batch, g.grid_height, g.grid_width))
        return self._tile_map

    def add_macs(self, macs: int) -> None:
        self.macs += int(macs)

    def broadcast_vectors(self, args, kwargs):
        """On tiles, per-stream vectors (N, ...) are indexed to one row per tile (K, ...)."""
        if self.dense_phase:
            return args, kwargs

        def per_tile(value):
            if isinstance(value, Activation) and value.bc_role == VECTOR:
                return plain(value)[self.index.stream]
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

    The converted model *is* the original module tree (shared parameters, buffers and children; see
    :func:`convert`); attributes it does not define itself are read from the original model. Frames must
    be padded to :attr:`size_divisibility`. A block-sparse forward needs eval mode and refuses training
    mode, naming the module.

    On CUDA (with ``cuda_graphs=True``) and with ``compile=True`` the number of executed blocks is
    rounded up to a multiple of 1/``buckets`` of all N grids' blocks (the method's bucket rule, 16
    buckets): the extra blocks are drawn at random among the blocks not selected, so the frame costs
    what its bucket costs and each bucket's forward is replayed from a CUDA graph; the one host read per
    frame is the executed-block count. ``executed_grid`` is the grid that actually ran. With
    ``dense_when_full=True`` a frame that executes every block runs the model densely (same result, no
    tile overhead).

    With ``compile=True`` each bucket's frame (and the dense-when-full frame) runs as one program
    compiled by inductor (:mod:`blockcopy_core.compiled`): the model's elementwise ops fused with the
    state writes and halo gathers, on CUDA inside the bucket's CUDA graph. A bucket compiles on its
    first frame (tens of seconds for a ResNet-50) or ahead of time with :meth:`warmup`;
    ``compile_seconds`` reports each. Programs are kept across clips; they are dropped when the model
    moves (``.to()``) and rebuilt when a clip starts after its weights changed. A bucket that fails to
    compile runs eagerly, with a warning.

    Set ``time_overhead = True`` to have ``last_stats.overhead_seconds`` report the wall time of the
    engine's own work (tile gathers and scatters, state writes, tile indexing) on every frame that runs
    eagerly: always on the CPU, on CUDA only without CUDA graphs (each timed piece then synchronises).
    """

    def __init__(self, model: nn.Module, block_size: int, *, cuda_graphs: bool = True,
                 dense_when_full: bool = True, buckets: int = 16, compile: bool = False):
        super().__init__()
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ConfigError("block_size", block_size, "a positive integer")
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
            raise ConfigError("buckets", buckets, "a positive integer")
        if not isinstance(compile, bool):
            raise ConfigError("compile", compile, "True or False")
        if isinstance(model, BlockSparseModel):
            raise ValueError("the model is already block-sparse (convert() was applied to it before)")
        _check_eval_mode(model)
        # Converted in place, as nn.SyncBatchNorm.convert_sync_batchnorm or torch.ao's prepare do: this
        # module shares the model's registries (the same dict objects), so both see the same parameters,
        # buffers and children under the same names. state_dict() keys are the model's own, and a cast
        # through either object (.to(), .half(), .cuda()) moves the one set of tensors both hold.
        for registry in _SHARED_REGISTRIES:
            object.__setattr__(self, registry, getattr(model, registry))
        object.__setattr__(self, "_version", getattr(model, "_version", 1))
        object.__setattr__(self, "_wrapped", model)
        self.block_size = block_size
        self.cuda_graphs = cuda_graphs
        self.dense_when_full = dense_when_full
        self.buckets = buckets
        self.compile = compile
        self.time_overhead = False
        self._timer = OverheadTimer()
        self._graphs = BucketGraphs()
        self._spare: _Clip | None = None  # the last clip's buffers, graphs and programs (see reset)
        self._programs: dict = {}  # (bucket, layouts) -> FrameProgram, kept across clips
        self._folded: dict = {}  # BatchNorms folded into convolutions, shared by the programs
        self._freeze = True  # compile with freezing on the CPU, until it fails the check once
        self._weights_seen = None
        self._compile_seconds = 0.0  # compiling done by the current forward
        self.compile_seconds: dict = {}  # bucket (executed-block count or "dense") -> seconds to compile
        self._module_stack: list[str] = []
        self._module_labels: dict[int, str] = {}
        object.__setattr__(self, "_grid_source", None)  # not a child module, not state
        self.reset()

    def bind(self, grid_source: "torch.Tensor | BlockSparseModel | None") -> None:
        """Let calls without a grid use ``grid_source``: an (N, 1, Gh, Gw) bool grid, or another block-sparse
        model whose ``executed_grid`` (that of its latest frame, bucket extras included) is used.

        For model parts that a framework calls with its own signature: Detectron2 calls its RPN head as
        ``rpn_head(features)``; bound to the block-sparse backbone, the converted head runs the blocks the
        backbone ran. ``None`` unbinds.
        """
        if grid_source is not None and not isinstance(grid_source, (torch.Tensor, BlockSparseModel)):
            raise TypeError(f"bind() takes a grid tensor or a BlockSparseModel, got {type(grid_source).__name__}")
        object.__setattr__(self, "_grid_source", grid_source)

    def _bound_grid(self) -> torch.Tensor:
        source = self._grid_source
        if isinstance(source, BlockSparseModel):
            if source.executed_grid is None:
                raise InvalidInputError("the block-sparse model this one is bound to has not run a frame yet")
            return source.executed_grid
        if source is None:
            raise InvalidInputError("no execution grid: call forward(x, grid), or bind() a grid or a block-sparse "
                                    "model first")
        return source

    @property
    def training(self) -> bool:
        """The original model's mode: the two objects are one model, so they share one flag."""
        wrapped = self.__dict__.get("_wrapped")
        return self.__dict__.get("_training_before_wrap", True) if wrapped is None else wrapped.training

    @training.setter
    def training(self, mode: bool) -> None:
        wrapped = self.__dict__.get("_wrapped")
        if wrapped is None:  # nn.Module.__init__ sets the flag before the model is attached
            self.__dict__["_training_before_wrap"] = mode
        else:
            wrapped.training = mode

    @property
    def model(self) -> nn.Module:
        """The original model object; it stays usable as a dense model (its modules are unchanged)."""
        return self._wrapped

    @property
    def size_divisibility(self) -> int:
        """The multiple frames must be padded to: the least common multiple of the block size and the
        model's own ``size_divisibility`` (Detectron2 backbones declare one; others count as 1)."""
        return input_divisibility(self.block_size, getattr(self._wrapped, "size_divisibility", 0) or 0)

    def __getattr__(self, name: str):
        # Attributes this wrapper lacks come from the original model (e.g. Detectron2's output_shape()),
        # so that the converted model stands in for it.
        try:
            return super().__getattr__(name)
        except AttributeError:
            wrapped = self.__dict__.get("_wrapped")
            if wrapped is None or name.startswith("_"):
                raise
            return getattr(wrapped, name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._wrapped._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._wrapped._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                            unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        # The clip's state (layer maps, outputs, CUDA graphs) holds tensors of the old dtype and device,
        # compiled programs the old weight tensors.
        self.reset()
        self._spare = None
        self._forget_programs()
        return super()._apply(fn, recurse)

    def _forget_programs(self) -> None:
        """Drop the compiled frame programs and the folded weights they read (the weights changed or moved);
        freezing is tried again on the CPU."""
        self._programs.clear()
        self._folded.clear()
        self._freeze = True

    def _push_module(self, module: nn.Module, args) -> None:
        label = self._module_labels.get(id(module))
        if label is not None:
            self._module_stack.append(label)

    def _pop_module(self, module: nn.Module, args, output) -> None:
        if id(module) in self._module_labels:
            self._module_stack.pop()

    def reset(self) -> None:
        """Start a new clip: forget all state; the next frame must execute every block.

        The clip's buffers (layer states, outputs, frame state), with the CUDA graphs and compiled
        programs bound to them, are kept for the next clip: when its frames have the same layout, its
        first frame overwrites them all in place (the dense frame program), so a new clip of that shape
        captures and allocates nothing."""
        if getattr(self, "_geometry", None) is not None:
            self._spare = _Clip(self._geometry, self._input_format, self._input_layouts, self._layers,
                                self._clip_programs, self._output_spec, self._outputs, self._graphs,
                                self.frame_state, self.executed_grid)
            self._graphs = BucketGraphs()
        self._geometry: FrameGeometry | None = None
        self._input_format = None  # (pytree spec, strides, (dtype, device) per input) of the clip
        self._input_layouts: list = []  # (shape, stride, dtype, device) of each input tensor of the clip
        self._layers: list[LayerState] = []
        self._clip_programs: dict = {}  # bucket -> its compiled program bound to this clip's state
        self._output_spec = None
        self._outputs: list[torch.Tensor] = []
        self.frame_state: torch.Tensor | None = None  # (N, C, H, W): each block's pixels at its last execution
        self.executed_grid: torch.Tensor | None = None  # (N, 1, Gh, Gw) bool: the blocks the last frame ran
        self.last_stats: FrameStats | None = None

    @property
    def output_state(self):
        """The last frame's outputs as the engine keeps them: the same tensors every frame of a clip,
        overwritten by the next frame (``forward`` returns copies). None before a clip's first frame."""
        if self._output_spec is None:
            return None
        return pytree.tree_unflatten(list(self._outputs), self._output_spec)

    @property
    def layer_states(self) -> list[LayerState]:
        """The dense state of each spatial op call site, in execution order."""
        return list(self._layers)

    @torch.no_grad()
    def forward(self, x, grid: torch.Tensor | None = None):
        """Run one frame of N streams.

        Args:
            x: (N, C, H, W) frames as the model takes them, H and W multiples of ``block_size``; or, for a
                model that takes feature maps (a detection head on a feature pyramid), a list, tuple or
                dict of (N, C_l, H / s_l, W / s_l) maps, each at an integer stride s_l dividing the block
                size (the frame size is then the grid's). ``frame_state`` is kept for frame inputs only.
            grid: (N, 1, H // block_size, W // block_size) bool, True = execute the block; None: the grid
                bound with :meth:`bind`.

        Returns:
            The model's output structure, every feature map dense (N, C, H_l, W_l).
        """
        if grid is None:
            grid = self._bound_grid()
        if self.training:
            _check_eval_mode(self._wrapped)
        inputs, spec = pytree.tree_flatten(x)
        if isinstance(x, torch.Tensor):
            geometry, strides = FrameGeometry.of_frame(x, self.block_size), (1,)
        else:
            geometry, strides = FrameGeometry.of_feature_maps(inputs, grid, self.block_size)
        device = inputs[0].device
        geometry.check_grid(grid, device)
        input_format = (spec, strides, tuple((t.dtype, t.device) for t in inputs))
        first = self._geometry is None
        graphed = self.cuda_graphs and inputs[0].is_cuda
        bucketed = graphed or self.compile
        self._timer.start_frame(self.time_overhead and (first or not bucketed), device)
        self._compile_seconds = 0.0
        if not first and (geometry != self._geometry or input_format != self._input_format):
            raise InvalidInputError(
                f"inputs changed mid-clip from {self._describe(self._geometry, self._input_format)} to "
                f"{self._describe(geometry, input_format)}; call reset() to start a new clip")
        # NaN and infinities show in the extremes (min and max propagate NaN): one reduction per input,
        # where isfinite(t).all() made three passes (3.3 against 1.3 ms for a 768x576 frame on one core)
        extremes = [v for t in inputs for v in torch.aminmax(t)]
        # random priorities for the extra blocks of a bucket, drawn outside the graphs (replays draw nothing)
        noise = torch.rand(grid.shape, device=grid.device) if bucketed and not first else None
        if graphed and not first:
            # queued before the host read, so that after it only the graph launch is left to do
            self._graphs.stage(*inputs, grid, noise)
        # the one host read: the extremes and the block count (as a float, exact below 2**24 blocks) in one
        # tensor of their promoted dtype, so that the GPU runs no more kernels before it than it must
        *extremes, executed = torch.stack([*extremes, grid.sum(dtype=torch.float32)]).tolist()
        if not all(math.isfinite(v) for v in extremes):
            raise InvalidInputError("the frame contains NaN or infinite values")
        executed = int(executed)
        total = geometry.batch * geometry.blocks_per_frame
        if first:
            if executed != total:
                raise InvalidInputError("the first frame after reset() must execute all blocks "
                                        "(its grid must be all True)")
            return self._start_clip(inputs, geometry, input_format)
        selected = executed
        if bucketed and executed:
            executed = self._bucket(executed, total)
        if executed == 0:
            self.executed_grid.zero_()
            self.last_stats = FrameStats(0, total, 0, self._overhead(), selected, self._compile_seconds)
            return self._current_outputs()
        key, body = self._frame_body(executed, total, bucketed)
        args = inputs if key == "dense" else (*inputs, grid, noise) if bucketed else (*inputs, grid)
        macs = self._run_body(key, body, args, graphed)
        self.last_stats = FrameStats(executed, total, macs, self._overhead(), selected, self._compile_seconds)
        return self._current_outputs()

    def _run_body(self, key, body, args, graphed: bool) -> int:
        """Run a frame body (compiled when ``compile``; through its CUDA graph when ``graphed``, on the
        inputs staged before); returns its MACs."""
        if self.compile:
            body = self._compiled(key, body, args)
        return self._graphs.run(key, body, len(args)) if graphed else body(*args)

    def _frame_body(self, executed: int, total: int, bucketed: bool):
        """(bucket key, body) of a frame executing ``executed`` of ``total`` blocks. The body returns its
        MACs and takes the inputs alone (the dense frame, key "dense"), or the inputs, the grid and, in
        bucketed frames, the noise ranking the extra blocks."""
        if executed == total and self.dense_when_full:
            return "dense", self._refresh_dense
        if bucketed:
            return executed, lambda *args: self._execute_tiles(args[:-2], args[-2], executed, args[-1])
        return executed, lambda *args: self._execute_tiles(args[:-1], args[-1], executed, None)

    def _bucket(self, executed: int, total: int) -> int:
        """``executed`` rounded up to the next bucket: a multiple of 1/``buckets`` of ``total``."""
        quantum = max(total // self.buckets, 1)
        return min(-(-executed // quantum) * quantum, total)

    # Compiled frames (compile=True): the body of a bucket traced and compiled once, then run on the
    # clip's state tensors, which are passed to the program explicitly.

    def _state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a frame body writes: layer states, outputs, frame state, executed grid."""
        tensors = [layer.dense for layer in self._layers if layer.dense is not None] + list(self._outputs)
        return tensors + ([self.frame_state] if self.frame_state is not None else []) + [self.executed_grid]

    def _bind_state(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Install ``tensors`` (in :meth:`_state_tensors` order) as the clip's state; returns the old ones."""
        previous = self._state_tensors()
        tensors = list(tensors)
        for layer in self._layers:
            if layer.dense is not None:
                layer.dense = tensors.pop(0)
        self._outputs = [tensors.pop(0) for _ in self._outputs]
        if self.frame_state is not None:
            self.frame_state = tensors.pop(0)
        self.executed_grid = tensors.pop(0)
        return previous

    def _program(self, key, body, args) -> tuple[FrameProgram | None, bool]:
        """The compiled program of ``body`` for bucket ``key`` and these argument and state layouts (None:
        compiling failed, the bucket runs eagerly), and whether it was compiled by this call."""
        state = self._state_tensors()
        signature = (key, tuple(_layout(t) for t in (*args, *state)))
        if signature in self._programs:
            return self._programs[signature], False
        try:
            program = compile_frame(body, self._bind_state, args, state, self._folded, self._freeze)
            if program.freezing_failed:
                self._freeze = False  # the model's other programs would fail the same way
                warnings.warn("blockcopy: inductor's freezing changed the results of this model's frame "
                              "programs on the CPU; they are compiled without it (slower)", RuntimeWarning,
                              stacklevel=4)
            self.compile_seconds[key] = program.compile_seconds
            self._compile_seconds += program.compile_seconds
        except BlockCopyError:
            raise  # the eager body raises it too: an unsupported op, changed control flow, ...
        except Exception as error:  # what inductor cannot compile runs eagerly, as an uncapturable graph does
            warnings.warn(f"blockcopy: compiling the frame program of bucket {key!r} failed "
                          f"({type(error).__name__}: {error}); this bucket runs eagerly", RuntimeWarning,
                          stacklevel=4)
            program = None
        self._programs[signature] = program
        return program, True

    def _compiled(self, key, body, args):
        """``body`` (which returns its MACs) run by its compiled program (looked up once per clip)."""
        run = self._clip_programs.get(key)
        if run is None:
            program, _ = self._program(key, body, args)
            state = self._state_tensors()  # fixed for the clip

            def run(*call_args):
                program.run(*call_args, *state)
                return program.macs

            self._clip_programs[key] = run if program is not None else body
        return self._clip_programs[key]

    def warmup(self, fractions=None) -> dict:
        """Compile (``compile=True``) the frame programs ahead of time, so that no timed frame compiles.

        Needs a started clip (one frame run since :meth:`reset`): programs are built for its geometry and
        input format, on copies of its state (the clip is left as it was), and kept for later clips of
        the same shape.

        Args:
            fractions: executed fractions whose buckets to compile (each rounded up to its bucket, 1.0
                being the dense frame); None: every bucket and, with ``dense_when_full``, the dense frame.

        Returns:
            {bucket: compile seconds} of the programs compiled by this call (executed-block counts, or
            "dense"); None for a bucket whose compilation failed (it runs eagerly; a warning says why).
        """
        if not self.compile:
            raise InvalidInputError("warmup() compiles frame programs; convert the model with compile=True")
        if self._geometry is None:
            raise InvalidInputError("warmup() needs a started clip: run the clip's first frame (all blocks) first")
        total = self._geometry.batch * self._geometry.blocks_per_frame
        wanted = [max(round(f * total), 1) for f in fractions] if fractions is not None else range(1, total + 1)
        counts = sorted({self._bucket(count, total) for count in wanted})
        inputs = [torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
                  for shape, stride, dtype, device in self._input_layouts]
        grid = torch.zeros(self._geometry.grid_shape, dtype=torch.bool, device=inputs[0].device)
        compiled = {}
        for count in _progress(counts, "compiling buckets"):
            key, body = self._frame_body(count, total, bucketed=True)
            args = inputs if key == "dense" else (*inputs, grid, torch.rand(grid.shape, device=grid.device))
            program, new = self._program(key, body, args)
            if new:
                compiled[key] = None if program is None else program.compile_seconds
        return compiled

    def _overhead(self) -> float | None:
        return self._timer.seconds if self._timer.active else None

    @staticmethod
    def _describe(g: FrameGeometry, input_format) -> str:
        _, strides, formats = input_format
        dtype, device = formats[0]
        inputs = "" if strides == (1,) else f" as {len(strides)} maps at strides {strides}"
        return f"N={g.batch} x {g.channels}x{g.height}x{g.width}{inputs} ({dtype}, {device})"

    def _model_input(self, tensors) -> Activation:
        """The model's argument: the input tensors (frames, or tiles) as activations, in the input's
        structure."""
        return pytree.tree_unflatten([wrap(t, SPATIAL) for t in tensors], self._input_format[0])

    def _start_clip(self, inputs: list[torch.Tensor], geometry: FrameGeometry, input_format):
        """The first frame: run densely, recording every spatial op's state and the output structure (or,
        for frames laid out as the last clip's, refreshing that clip's buffers in place)."""
        spare, self._spare = self._spare, None
        self.reset()
        layouts = [_layout(t) for t in inputs]
        _check_eval_mode(self._wrapped)
        if self.compile:
            # compiled programs read the weight tensors they were traced with: after a weight was
            # replaced or changed in place (load_state_dict), compile again
            weights = tuple((t.data_ptr(), t._version) for t in self._wrapped.state_dict(keep_vars=True).values()
                            if isinstance(t, torch.Tensor))
            if weights != self._weights_seen:
                self._forget_programs()
                self._weights_seen = weights
                spare = None  # its bound programs are stale
        if spare is not None and (spare.geometry, spare.input_format, spare.input_layouts) == (
                geometry, input_format, layouts):
            return self._resume_clip(spare, inputs)
        del spare  # free its buffers and graphs before this clip allocates its own
        self._input_format = input_format
        self._input_layouts = layouts
        self._module_labels = {id(module): f"{name} ({type(module).__name__})"
                               for name, module in self._wrapped.named_modules() if name}
        executor = _FrameExecutor(self, geometry, None, recording=True)
        leaves, self._output_spec = pytree.tree_flatten(self._call_model(executor, self._model_input(inputs)))
        for i, leaf in enumerate(leaves):
            self._check_output_leaf(i, leaf, geometry, dense=True)
        with self._timer:
            self._outputs = [plain(leaf).clone() for leaf in leaves]
            if input_format[1] == (1,):  # a frame, not feature maps
                self.frame_state = inputs[0].clone()
            self.executed_grid = torch.ones(geometry.grid_shape, dtype=torch.bool, device=inputs[0].device)
        self._geometry = geometry
        total = geometry.batch * geometry.blocks_per_frame
        self.last_stats = FrameStats(total, total, executor.macs, self._overhead())
        return self._current_outputs()

    def _resume_clip(self, spare: "_Clip", inputs: list[torch.Tensor]):
        """A clip's first frame on the last clip's buffers: the dense frame body, through its CUDA graph
        or compiled program like any frame, overwrites every state."""
        (self._geometry, self._input_format, self._input_layouts, self._layers, self._clip_programs,
         self._output_spec, self._outputs, self._graphs, self.frame_state, self.executed_grid) = spare
        graphed = self.cuda_graphs and inputs[0].is_cuda
        if graphed:
            self._graphs.stage(*inputs)
        macs = self._run_body("dense", self._refresh_dense, inputs, graphed)
        total = self._geometry.batch * self._geometry.blocks_per_frame
        self.last_stats = FrameStats(total, total, macs, self._overhead(), compile_seconds=self._compile_seconds)
        return self._current_outputs()

    # The two frame bodies below may be captured in CUDA graphs: everything they leave behind must be
    # written in place into buffers allocated on the clip's first frame, never rebound.

    def _refresh_dense(self, *inputs: torch.Tensor) -> int:
        """Execute every block densely, refreshing all states; returns the MACs run."""
        executor = _FrameExecutor(self, self._geometry, None)
        leaves = self._model_outputs(executor, self._model_input(inputs))
        with self._timer:
            for buffer, leaf in zip(self._outputs, leaves):
                buffer.copy_(plain(leaf))
            if self.frame_state is not None:
                self.frame_state.copy_(inputs[0])
            self.executed_grid.fill_(True)
        return executor.macs

    def _execute_tiles(self, inputs, grid: torch.Tensor, count: int, noise: torch.Tensor | None) -> int:
        """Run the model on ``count`` blocks: the grid's, plus extras ranked by ``noise`` (in [0, 1))."""
        with self._timer:
            index = self._tile_index(grid, count, noise)
            tiles = [extract_tiles(t, index, self.block_size // stride)
                     for t, stride in zip(inputs, self._input_format[1])]
            if self.frame_state is not None:
                scatter_tiles(self.frame_state, tiles[0], index)
        executor = _FrameExecutor(self, self._geometry, index)
        leaves = self._model_outputs(executor, self._model_input(tiles))
        with self._timer:
            for buffer, leaf in zip(self._outputs, leaves):
                scatter_tiles(buffer, plain(leaf), index)
            g = self._geometry
            blocks = index.stream * g.blocks_per_frame + index.row * g.grid_width + index.col
            self.executed_grid.view(-1).zero_().index_fill_(0, blocks, True)
        return executor.macs

    def _tile_index(self, grid: torch.Tensor, count: int, noise: torch.Tensor | None) -> TileIndex:
        """``count`` blocks in row-major order: the grid's True blocks, then others ranked by ``noise``."""
        flat = grid.flatten()
        priority = flat.float() * 2
        if noise is not None:
            priority = priority + noise.flatten()
        chosen = priority.topk(count, sorted=False).indices.sort().values
        per_stream, width = self._geometry.blocks_per_frame, self._geometry.grid_width
        within = chosen % per_stream
        return TileIndex(chosen // per_stream, within // width, within % width)

    def _model_outputs(self, executor: _FrameExecutor, x: Activation) -> list:
        """Run the model on ``x`` and check it behaved as on the clip's first frame."""
        out = self._call_model(executor, x)
        if executor.cursor != len(self._layers):
            raise ControlFlowChangedError(
                f"the model ran {executor.cursor} spatial ops, but {len(self._layers)} on the clip's first "
                "frame; block-sparse execution needs the same op sequence on every frame of a clip")
        leaves, spec = pytree.tree_flatten(out)
        if spec != self._output_spec:
            raise ControlFlowChangedError(f"the model's output structure changed from {self._output_spec} "
                                          f"to {spec} since the clip's first frame")
        for i, leaf in enumerate(leaves):
            self._check_output_leaf(i, leaf, self._geometry, dense=executor.dense_phase)
        return leaves

    def _call_model(self, executor: _FrameExecutor, x: Activation):
        # Module paths for error messages come from global hooks that exist only during this call, so
        # the shared modules carry nothing of the engine when the original model runs densely.
        self._module_stack.clear()
        enter = register_module_forward_pre_hook(self._push_module)
        leave = register_module_forward_hook(self._pop_module)
        try:
            with active_executor(executor):
                return self._wrapped(x)
        finally:
            enter.remove()
            leave.remove()

    def _current_outputs(self):
        return pytree.tree_unflatten([buffer.clone() for buffer in self._outputs], self._output_spec)

    def _check_output_leaf(self, i: int, leaf, geometry: FrameGeometry, dense: bool) -> None:
        if not isinstance(leaf, Activation) or leaf.bc_role != SPATIAL or leaf.bc_halo is not None \
                or leaf.dim() != 4 or leaf.bc_spatial_dims != (-2, -1):
            raise UnsupportedOperationError(
                "output", "<model>", f"output #{i} is not a (N, C, H, W) feature map computed from the frame "
                                     f"({type(leaf).__name__}); block-sparse models must return feature maps")
        self._check_stride("output", "<model>", leaf.shape[-2:], geometry, dense)

    def _check_stride(self, op: str, module_path: str, size, geometry: FrameGeometry, dense: bool) -> None:
        """A map of ``size`` (H_l, W_l) must be the frame scaled by 1/s in both dims, s dividing the block
        size (s = 1/m for maps upsampled m times beyond the frame)."""
        extent = (geometry.height, geometry.width) if dense else (self.block_size, self.block_size)
        h, w = int(size[0]), int(size[1])
        downsampled = h and w and not (extent[0] % h or extent[1] % w) and extent[0] // h == extent[1] // w \
            and self.block_size % (extent[0] // h) == 0
        upsampled = h and w and not (h % extent[0] or w % extent[1]) and h // extent[0] == w // extent[1]
        if not (downsampled or upsampled):
            stride = f"{extent[0] / h:g}x{extent[1] / w:g}" if h and w else "undefined"
            raise UnsupportedOperationError(
                op, module_path, f"its output has stride {stride} relative to the frame, which does not divide "
                                 f"the block size {self.block_size}; use a block size that is a multiple of "
                                 "every layer's stride")


def _progress(items: list, description: str):
    """``items`` with a progress bar when there are several and tqdm is installed (the engine itself
    needs only torch)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, unit="bucket", disable=len(items) < 2)


class _Clip(NamedTuple):
    """A clip's buffers and what is bound to them, kept by :meth:`BlockSparseModel.reset` for the next."""

    geometry: FrameGeometry
    input_format: tuple
    input_layouts: list
    layers: list[LayerState]
    clip_programs: dict
    output_spec: Any
    outputs: list[torch.Tensor]
    graphs: BucketGraphs
    frame_state: torch.Tensor | None
    executed_grid: torch.Tensor


def _layout(t: torch.Tensor) -> tuple:
    """What a compiled program assumes of a tensor argument: shape, strides, dtype and device."""
    return tuple(t.shape), t.stride(), t.dtype, t.device


def convert(model: nn.Module, block_size: int | None = None, *, config: BlockCopyConfig | None = None,
            **options) -> BlockSparseModel:
    """Make ``model`` run block-sparse with square blocks of ``block_size`` pixels, in place.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, the result uses the *same* module objects, parameters
    and buffers as ``model`` (nothing is copied): its ``state_dict()`` has exactly ``model``'s keys, so a
    checkpoint of the plain model loads into it with ``strict=True`` and the other way round, and
    ``.to()``, ``.half()``, ``.cuda()`` on either object change the one model both hold. ``model`` itself
    stays usable as the ordinary dense model: convert installs nothing on its modules.

    Args:
        model: the task network in eval mode (``model.eval()``).
        block_size: block side in pixels; give either it or ``config``.
        config: a :class:`BlockCopyConfig` (block size, buckets, CUDA graphs, dense-when-full).
        **options: ``cuda_graphs``, ``dense_when_full``, ``buckets``, ``compile`` (see
            :class:`BlockSparseModel`), only with ``block_size``.

    Raises:
        UnsupportedOperationError: when a module of ``model`` is in training mode.
        ConfigError: when ``block_size`` is not a multiple of the model's declared ``size_divisibility``.
    """
    if (block_size is None) == (config is None):
        raise TypeError("convert() takes either block_size or config, not both or neither")
    if config is not None:
        if options:
            raise TypeError(f"convert() takes the options {sorted(options)} from config, not as arguments")
        block_size, options = config.block_size, config.engine_options()
    divisibility = getattr(model, "size_divisibility", 0)
    if isinstance(divisibility, int) and divisibility > 0 and isinstance(block_size, int) \
            and block_size % divisibility:
        raise ConfigError("block_size", block_size,
                          f"a multiple of the model's largest stride {divisibility} (its size_divisibility)")
    return BlockSparseModel(model, block_size, **options)
