"""The engine's invariants on standard architectures (fp32, CPU), and agreement with the oracle."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import blockcopy_core as bc
from nets import ARCHITECTURES
from oracle import DenseEmulation, rel_error

N = 2
# fp32 on CPU: tiles and the dense map run the same convolutions on the same values but may sum in
# another order; deep nets (ResNet-50: ~50 layers) accumulate ~1e-6 relative differences.
RTOL = 1e-4


class Arch:
    def __init__(self, name):
        factory, self.block, self.height, self.width = ARCHITECTURES[name]
        self.model = factory()
        self.grid_shape = (N, 1, self.height // self.block, self.width // self.block)

    def frames(self, count=None):
        shape = (N, 3, self.height, self.width)
        return torch.randn(shape) if count is None else torch.randn((count,) + shape)

    def random_grid(self, p=0.5):
        return torch.rand(self.grid_shape) < p

    def full_grid(self):
        return torch.ones(self.grid_shape, dtype=torch.bool)

    def convert(self, **options):
        return bc.convert(self.model, self.block, **options)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request):
    torch.manual_seed(0)
    return Arch(request.param)


@pytest.mark.parametrize("dense_when_full", [False, True], ids=["tiles", "dense-path"])
def test_all_blocks_executed_equals_dense(arch, dense_when_full):
    model = arch.model
    sparse = arch.convert(dense_when_full=dense_when_full)
    frames = arch.frames(3)
    sparse(frames[0], arch.full_grid())
    for x in frames[1:]:
        assert rel_error(sparse(x, arch.full_grid()), model(x)) <= RTOL


def test_static_video_equals_dense_for_any_grid(arch):
    model = arch.model
    sparse = arch.convert()
    x = arch.frames()
    expected = model(x)
    sparse(x, arch.full_grid())
    for _ in range(3):
        assert rel_error(sparse(x, arch.random_grid()), expected) <= RTOL


class _CountConvolutions(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.conv2d, F.conv_transpose2d):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_no_blocks_returns_previous_outputs_without_convolutions(arch):
    sparse = arch.convert()
    sparse(arch.frames(), arch.full_grid())
    previous = sparse(arch.frames(), arch.random_grid())
    with _CountConvolutions() as counter:
        out = sparse(arch.frames(), torch.zeros(arch.grid_shape, dtype=torch.bool))
    assert counter.calls == 0 and sparse.last_stats.macs == 0
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves(out), tree_leaves(previous)))


def test_streams_in_a_batch_equal_separate_runs(arch):
    batched = arch.convert()
    single = [arch.convert() for _ in range(N)]
    for t in range(3):
        x = arch.frames()
        grid = arch.full_grid() if t == 0 else arch.random_grid()
        together = tree_leaves(batched(x, grid))
        for n in range(N):
            alone = tree_leaves(single[n](x[n:n + 1], grid[n:n + 1]))
            assert rel_error([o[n:n + 1] for o in together], alone) <= RTOL


def test_non_executed_blocks_keep_previous_outputs_exactly(arch):
    sparse = arch.convert()
    previous = tree_leaves(sparse(arch.frames(), arch.full_grid()))
    for _ in range(3):
        grid = arch.random_grid()
        out = tree_leaves(sparse(arch.frames(), grid))
        for a, b in zip(out, previous):
            kept = ~F.interpolate(grid.float(), size=a.shape[-2:], mode="nearest").bool().expand_as(a)
            assert torch.equal(a[kept], b[kept])
            assert not torch.equal(a, b)
        previous = out


def test_matches_dense_emulation_on_a_changing_video(arch):
    """Block padding, feature transfer and global ops exactly as the method defines them."""
    model = arch.model
    sparse, oracle = arch.convert(), DenseEmulation(model, arch.block)
    x = arch.frames()
    sparse(x, arch.full_grid())
    oracle(x, arch.full_grid())
    for _ in range(4):
        x = x + 0.5 * torch.randn_like(x)
        grid = arch.random_grid()
        assert rel_error(sparse(x, grid), oracle(x, grid)) <= RTOL


def test_a_new_clip_reuses_the_last_clips_buffers_and_equals_a_fresh_engine(arch):
    """reset() keeps the clip's buffers (and, on a GPU, the graphs bound to them) for a next clip of the
    same layout, whose first frame overwrites every state: nothing of the old clip may leak into it."""
    sparse, fresh = arch.convert(), arch.convert()
    sparse(arch.frames(), arch.full_grid())
    for _ in range(2):
        sparse(arch.frames(), arch.random_grid())
    states = [layer.dense for layer in sparse.layer_states]
    sparse.reset()
    clip = arch.frames(3)
    grids = [arch.full_grid(), arch.random_grid(), arch.random_grid()]
    for x, grid in zip(clip, grids):
        out, expected = sparse(x, grid), fresh(x, grid)
        assert rel_error(out, expected) <= RTOL
        assert torch.equal(sparse.executed_grid, fresh.executed_grid)
        assert sparse.last_stats.macs == fresh.last_stats.macs
    assert all(layer.dense is state for layer, state in zip(sparse.layer_states, states))
    assert torch.equal(sparse.frame_state, fresh.frame_state)
    sparse.reset()  # a clip of another size gets buffers of its own
    bigger = torch.randn(N, 3, arch.height + arch.block, arch.width)
    full = torch.ones(N, 1, bigger.shape[-2] // arch.block, arch.width // arch.block, dtype=torch.bool)
    assert rel_error(sparse(bigger, full), arch.model(bigger)) <= RTOL
    assert sparse.layer_states[0].dense is not states[0]


def test_weights_are_shared_not_copied(arch):
    model = arch.model
    sparse = arch.convert()
    for (name, p), (_, q) in zip(model.named_parameters(), sparse.model.named_parameters()):
        assert p is q, name


def test_overhead_timing_measures_the_tile_moves_and_changes_nothing(monkeypatch):
    """``time_overhead`` reports the time spent in tile moves and state writes: a known delay added to
    every fused update-and-gather shows up in full, and the outputs are those of an untimed run."""
    import time

    import blockcopy_core.state as state

    arch = Arch("mobilenet_v3_like")
    frames = arch.frames(3)
    grids = [arch.full_grid(), arch.random_grid(), arch.random_grid()]
    untimed = arch.convert()
    expected = [untimed(f, g) for f, g in zip(frames, grids)]
    assert untimed.last_stats.overhead_seconds is None

    delay, calls = 0.002, []
    original = state.update_and_gather

    def slow_update_and_gather(*args, **kwargs):
        calls.append(1)
        time.sleep(delay)
        return original(*args, **kwargs)

    monkeypatch.setattr(state, "update_and_gather", slow_update_and_gather)
    timed = arch.convert()
    timed.time_overhead = True
    for frame, grid, reference in zip(frames, grids, expected):
        calls.clear()
        start = time.perf_counter()
        out = timed(frame, grid)
        elapsed = time.perf_counter() - start
        overhead = timed.last_stats.overhead_seconds
        assert rel_error(out, reference) == 0.0
        assert overhead is not None and 0.0 < overhead < elapsed
        assert overhead >= delay * len(calls)
    assert calls, "the sparse frames must have gathered tiles through the layer states"
