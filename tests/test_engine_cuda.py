"""The engine on a CUDA GPU (CUDA graphs per bucket, fp32/fp16/bf16, channels_last) against the oracle.

Skipped without a GPU. fp32 runs with TF32 disabled so that only summation order differs. For fp16 and
bf16 both sides compute in that precision; the bound is a few units in the last place per layer
accumulated over the depth (measured maxima are about a third of the tolerances).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

import blockcopy_core as bc
from nets import ARCHITECTURES
from oracle import DenseEmulation, rel_error

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("no_tf32")]  # tests/conftest.py
N = 2
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_graphed_engine_matches_oracle(name, dtype, channels_last):
    factory, block, height, width = ARCHITECTURES[name]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = factory().cuda().to(dtype=dtype, memory_format=fmt)
    sparse, oracle = bc.convert(model, block), DenseEmulation(model, block)
    shape = (N, 1, height // block, width // block)
    full = torch.ones(shape, dtype=torch.bool, device="cuda")
    x = torch.randn(N, 3, height, width, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    sparse(x, full)
    oracle(x, full)
    errors = []
    for _ in range(6):
        x = (x + 0.5 * torch.randn_like(x)).contiguous(memory_format=fmt)
        grid = torch.rand(shape, device="cuda") < 0.4
        out = sparse(x, grid)
        executed = sparse.executed_grid
        assert bool((executed | ~grid).all()), "every selected block must execute"
        errors.append(rel_error(out, oracle(x, executed)))
    print(f"{name} {dtype} channels_last={channels_last}: max rel error {max(errors):.2e}")
    assert max(errors) <= TOLERANCE[dtype]


def test_buckets_round_up_to_sixteenths_and_replay_graphs():
    factory, block, height, width = ARCHITECTURES["unet_like"]
    model = factory().cuda()
    n, gh, gw = 4, 4, 4  # 64 blocks in all: buckets of 4
    sparse = bc.convert(model, block)
    x = torch.randn(n, 3, gh * block, gw * block, device="cuda")
    sparse(x, torch.ones(n, 1, gh, gw, dtype=torch.bool, device="cuda"))
    for count in (1, 4, 5, 17, 63, 64, 0, 5):
        grid = torch.zeros(n * gh * gw, dtype=torch.bool, device="cuda")
        grid[torch.randperm(n * gh * gw, device="cuda")[:count]] = True
        previous = sparse(x, torch.ones_like(grid.view(n, 1, gh, gw))) if count == 0 else None
        out = sparse(x + 1, grid.view(n, 1, gh, gw))
        stats = sparse.last_stats
        assert stats.executed_blocks == -(-count // 4) * 4
        assert int(sparse.executed_grid.sum()) == stats.executed_blocks
        if count == 0:
            assert all(torch.equal(a, b) for a, b in zip(tree_leaves(out), tree_leaves(previous)))
    assert len(sparse._graphs) == 4  # buckets 4, 8, 20 and the dense path (64)


def test_a_new_clip_replays_the_last_clips_graphs():
    """After reset() a clip of the same layout runs on the last clip's buffers: its first frame replays
    the dense graph, its buckets replay theirs (no capture), and it equals a fresh engine."""
    factory, block, height, width = ARCHITECTURES["resnet_fpn"]
    model = factory().cuda()
    sparse, fresh = bc.convert(model, block), bc.convert(model, block)
    full = torch.ones(N, 1, height // block, width // block, dtype=torch.bool, device="cuda")
    half = full.clone()
    half.view(-1)[::2] = False
    grids = [full, full.clone(), half]
    for x in torch.randn(3, N, 3, height, width, device="cuda"):
        for grid in grids:  # the dense graph and one bucket's
            sparse(x, grid)
        sparse.reset()
    graphs = sparse._spare.graphs  # kept by reset() for the next clip
    captured = len(graphs)
    assert captured == 2
    for x, grid in zip(torch.randn(3, N, 3, height, width, device="cuda"), grids):
        assert rel_error(sparse(x, grid), fresh(x, grid)) <= TOLERANCE[torch.float32]
    assert sparse._graphs is graphs and len(graphs) == captured


def test_non_executed_blocks_keep_outputs_exactly_on_gpu():
    factory, block, height, width = ARCHITECTURES["mobilenet_v3_like"]
    model = factory().cuda().half()
    sparse = bc.convert(model, block)
    shape = (N, 1, height // block, width // block)
    x = torch.randn(N, 3, height, width, device="cuda", dtype=torch.half)
    previous = sparse(x, torch.ones(shape, dtype=torch.bool, device="cuda"))
    for _ in range(4):
        out = sparse(torch.randn_like(x), torch.rand(shape, device="cuda") < 0.3)
        kept = ~F.interpolate(sparse.executed_grid.half(), size=out.shape[-2:]).bool().expand_as(out)
        assert torch.equal(out[kept], previous[kept])
        previous = out
