"""The compiled engine (compile=True) against the eager one: the same blocks give the same outputs.

Each frame of the compiled model runs the executed grid it reports through an eager model of the same
weights, which must give the same outputs: fp32 within 1e-4 of the largest output (summation order
differs: inductor fuses and reorders elementwise work), fp16/bf16 within the tolerances of the eager
engine against its oracle (tests/test_engine_cuda.py), since both sides round at different points.
Grids execute a fixed number of blocks, so that each model compiles one bucket (compiling is slow on
the CPU: 10-30 s per program on two cores).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import blockcopy_core as bc
from blockcopy_core import ConfigError, InvalidInputError
from blockcopy_core.protocol import DenseRunner
from nets import ARCHITECTURES
from oracle import rel_error

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def grids_with(count: int, shape, frames: int, device) -> list[torch.Tensor]:
    """``frames`` random (N, 1, Gh, Gw) grids, each executing exactly ``count`` blocks."""
    total = int(torch.tensor(shape).prod())
    grids = []
    for _ in range(frames):
        grid = torch.zeros(total, dtype=torch.bool, device=device)
        grid[torch.randperm(total, device=device)[:count]] = True
        grids.append(grid.view(shape))
    return grids


def compare_with_eager(name: str, device: str, dtype=torch.float32, memory_format=torch.contiguous_format,
                       n: int = 2, frames: int = 3) -> float:
    """Largest relative error of a compiled model's frames against the eager engine on the same grids."""
    factory, block, height, width = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = factory().to(device=device, dtype=dtype, memory_format=memory_format)
    eager, compiled = bc.convert(model, block), bc.convert(factory(), block, compile=True)
    compiled.load_state_dict(model.state_dict())
    compiled.to(device=device, dtype=dtype, memory_format=memory_format)
    shape = (n, 1, height // block, width // block)
    full = torch.ones(shape, dtype=torch.bool, device=device)
    x = torch.randn(n, 3, height, width, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    eager(x, full)
    compiled(x, full)
    errors = []
    with torch.no_grad():
        for grid in grids_with(max(full.numel() // 3, 1), shape, frames, device):
            x = (x + 0.5 * torch.randn_like(x)).contiguous(memory_format=memory_format)
            out = compiled(x, grid)
            assert bool((compiled.executed_grid | ~grid).all()), "every selected block must execute"
            errors.append(rel_error(out, eager(x, compiled.executed_grid)))
    assert len(compiled.compile_seconds) == 1, "frames of one bucket share one program"
    return max(errors)


@pytest.mark.parametrize("name", ["resnet_fpn", "mobilenet_v3_like", "op_zoo", "unet_like"])
def test_compiled_equals_eager_on_cpu(name):
    assert compare_with_eager(name, "cpu") <= TOLERANCE[torch.float32]


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 4, 3, stride=2, padding=1))

    def forward(self, x):
        return self.conv(x)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return Small().eval()


def test_warmup_compiles_ahead_and_programs_outlive_clips():
    model = small_model()
    sparse = bc.convert(model, 16, compile=True, buckets=4)  # 2 streams x 2x2 blocks: buckets of 2 blocks
    full = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(InvalidInputError, match="started clip"):
        sparse.warmup()
    sparse(x, full)
    compiled = sparse.warmup([0.2, 0.25])  # both round up to the bucket of 2 blocks
    assert list(compiled) == [2] and compiled[2] > 0
    assert sparse.warmup([0.25]) == {}, "a compiled bucket is not compiled again"
    grid = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    grid[0, 0, 0, 1] = True
    with torch.no_grad():
        sparse(x + 1, grid)
    assert sparse.last_stats.executed_blocks == 2, "one block rounded up to its bucket"
    assert bool(sparse.executed_grid[0, 0, 0, 1])
    sparse.reset()
    sparse(x, full)
    assert sparse.warmup([0.25]) == {}, "programs are kept across clips"
    eager = bc.convert(small_model(), 16)
    eager(x, full)
    with torch.no_grad():
        out = sparse(x - 1, grid)
        assert rel_error(out, eager(x - 1, sparse.executed_grid)) <= TOLERANCE[torch.float32]


def test_changed_weights_compile_again():
    """Programs read the weights they were traced with: a clip after load_state_dict must not use them."""
    model = small_model()
    sparse = bc.convert(model, 16, compile=True, buckets=4)
    full = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    x = torch.randn(2, 3, 32, 32)
    sparse(x, full)
    sparse.warmup([0.5])
    other = Small().eval()
    for p in other.parameters():
        nn.init.normal_(p)
    sparse.load_state_dict(other.state_dict())
    sparse.reset()
    sparse(x, full)
    assert sparse.warmup([0.5]) != {}, "new weights: the bucket compiles again"
    eager = bc.convert(other, 16)
    eager(x, full)
    grid = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    grid[1, 0, 1, 1] = grid[0, 0, 0, 0] = True
    with torch.no_grad():
        out = sparse(x * 2, grid)
        assert rel_error(out, eager(x * 2, sparse.executed_grid)) <= TOLERANCE[torch.float32]
    sparse.double()
    assert not sparse._programs, "a model moved to another dtype drops its programs"


def test_compile_setting_is_validated():
    with pytest.raises(ConfigError, match="compile"):
        bc.convert(small_model(), 16, compile="yes")
    with pytest.raises(ConfigError, match="compile"):
        bc.BlockCopyConfig(compile=1)
    assert bc.BlockCopyConfig(compile=True).engine_options()["compile"] is True
    sparse = bc.convert(small_model(), 16)
    sparse(torch.randn(1, 3, 16, 16), torch.ones(1, 1, 1, 1, dtype=torch.bool))
    with pytest.raises(InvalidInputError, match="compile=True"):
        sparse.warmup()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("name,dtype,memory_format", [
    *[(name, torch.float16, torch.channels_last) for name in sorted(ARCHITECTURES)],
    ("resnet50_trunk", torch.float32, torch.contiguous_format),
    ("op_zoo", torch.float32, torch.contiguous_format),
    ("resnet_fpn", torch.bfloat16, torch.channels_last),
], ids=str)
def test_compiled_equals_eager_on_cuda(name, dtype, memory_format):
    """Compiled programs inside CUDA graphs against the eager engine's CUDA kernels and graphs."""
    error = compare_with_eager(name, "cuda", dtype, memory_format, frames=4)
    print(f"{name} {dtype}: max rel error {error:.2e}")
    assert error <= TOLERANCE[dtype]


def test_full_frame_runs_the_compiled_dense_program():
    model = small_model()
    sparse = bc.convert(model, 16, compile=True)
    full = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    sparse(torch.randn(2, 3, 32, 32), full)
    assert list(sparse.warmup([1.0])) == ["dense"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_error(sparse(x, full), model(x)) <= TOLERANCE[torch.float32]
        grid = torch.zeros_like(full)
        grid[1, 0, 0, 1] = True
        eager = bc.convert(small_model(), 16)
        eager(x, full)
        out = sparse(x * 3, grid)  # a sparse frame after the dense one reads the states it wrote
        assert rel_error(out, eager(x * 3, sparse.executed_grid)) <= TOLERANCE[torch.float32]


def test_compiled_dense_runner_gives_the_models_results():
    """DenseRunner(compile=True), the dense side of a compiled comparison (tools/run_video.py --compile)."""
    model = small_model()
    runner = DenseRunner(model, bc.SemanticSegmentationAdapter(4), 16, compile=True)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(1, 3, 32, 32)
            step = runner.step(x)
            assert rel_error(step.outputs, model(x)) <= TOLERANCE[torch.float32]
            torch.testing.assert_close(step.result, torch.softmax(model(x), dim=1), rtol=1e-4, atol=1e-5)
    assert runner.statistics.frames == 2


def test_compiled_dense_folds_batchnorm_into_the_convolutions():
    """compile_dense is the strongest dense baseline only if inductor's freezing is on when it compiles:
    then BatchNorm's scale, with its square root, is computed once into the convolution's weights and
    the generated code has no ``sqrt`` left. Freezing passed in torch.compile's options is ignored."""
    from torch._inductor.utils import run_and_get_code

    from blockcopy_core.protocol import compile_dense

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 16, 16)
    fast, code = run_and_get_code(compile_dense, model, x)
    assert code and not any("sqrt" in program for program in code)
    with torch.no_grad():
        assert rel_error(fast(x), model(x)) <= 1e-5
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(model), x)
    assert any("sqrt" in program for program in code), "without freezing BatchNorm stays in the program"


def test_compiled_dense_drops_freezing_where_it_is_wrong(monkeypatch):
    """compile_dense checks the compiled outputs against the eager model's: when freezing gives other
    results (it has, for CenterNet on the CPU), it compiles without it, with a warning."""
    import blockcopy_core.protocol as protocol

    compiled_for_inference = protocol._compiled_for_inference

    def wrong_when_frozen(model, freezing):
        call = compiled_for_inference(model, freezing)
        return (lambda x: call(x) * 1.5) if freezing else call

    monkeypatch.setattr(protocol, "_compiled_for_inference", wrong_when_frozen)
    model = small_model()
    x = torch.randn(1, 3, 16, 16)
    with pytest.warns(RuntimeWarning, match="compiling it without freezing"):
        fast = protocol.compile_dense(model, x)
    with torch.no_grad():
        assert rel_error(fast(x), model(x)) <= 1e-5


class ConvNormPairs(nn.Module):
    """Two BatchNorms that fold (after a convolution with and one without bias) and three that must not:
    after a ReLU, after a convolution whose output is also read elsewhere, after a transposed one."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, bias=False, groups=2)
        self.c, self.d = nn.Conv2d(8, 8, 1), nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.norms = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(5))
        for norm in self.norms:
            for tensor in (norm.weight, norm.bias, norm.running_mean):
                nn.init.normal_(tensor)
            norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = torch.relu(self.norms[0](self.a(x)))
        x = self.norms[1](self.b(x))
        x = self.norms[2](torch.relu(x))
        y = self.c(x)
        x = self.norms[3](y) + y
        return self.norms[4](self.d(x))


def test_batchnorm_folds_into_the_convolution_before_it():
    """Compiled frames fold BatchNorm into the convolution before it, as freezing does for the compiled
    dense model (same sums up to rounding), only where that is exact, and share the folded weights."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from blockcopy_core.compiled import _BATCH_NORM_EPS, fold_batchnorm

    model = ConvNormPairs().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        traced = make_fx(model, tracing_mode="real")(x)
        folded = {}
        assert fold_batchnorm(traced, folded) == 2
        norms = [n for n in traced.graph.nodes if n.op == "call_function" and n.target in _BATCH_NORM_EPS]
        assert len(norms) == 3 and len(folded) == 2
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)
        again = make_fx(model, tracing_mode="real")(x)
        assert fold_batchnorm(again, folded) == 2 and len(folded) == 2, "a second program reuses the folds"
        torch.testing.assert_close(again(x), expected, rtol=1e-5, atol=1e-5)


def test_cpu_programs_are_frozen_and_checked(monkeypatch):
    """On the CPU frame programs compile with freezing (oneDNN's pre-packed weights), each checked once
    against its traced graph: a frozen program that computes other states (as freezing did for
    CenterNet-MobileNetV3 on the CPU) is compiled again without freezing, with a warning, and the
    model's later programs skip freezing."""
    import blockcopy_core.compiled as compiled

    model = small_model()
    full = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    x = torch.randn(2, 3, 32, 32)
    sparse = bc.convert(model, 16, compile=True, buckets=4)
    sparse(x, full)
    sparse.warmup([0.25])
    assert [p.frozen for p in sparse._programs.values()] == [True]

    compile_program = compiled._compile

    def wrong_when_frozen(graph, examples, freezing):
        program = compile_program(graph, examples, freezing)
        if not freezing:
            return program

        def run(*args):
            program(*args)
            next(t for t in args[len(args) // 2:] if t.is_floating_point()).add_(1.0)
        return run

    monkeypatch.setattr(compiled, "_compile", wrong_when_frozen)
    sparse, eager = bc.convert(small_model(), 16, compile=True, buckets=4), bc.convert(small_model(), 16)
    sparse(x, full)
    eager(x, full)
    with pytest.warns(RuntimeWarning, match="freezing changed the results"):
        sparse.warmup([0.25])
    assert [p.frozen for p in sparse._programs.values()] == [False]
    assert sparse.warmup([0.5]) and not any(p.frozen or p.freezing_failed for p in
                                             list(sparse._programs.values())[1:]), "freezing not tried again"
    grid = torch.zeros_like(full)
    grid[1, 0, 0, 1] = True
    with torch.no_grad():
        assert rel_error(sparse(x + 1, grid), eager(x + 1, sparse.executed_grid)) <= TOLERANCE[torch.float32]


def test_a_bucket_that_fails_to_compile_runs_eagerly(monkeypatch):
    """What inductor cannot compile must not stop the video: that bucket runs the eager body, with a
    warning naming the failure (as a bucket whose CUDA graph cannot be captured does)."""
    import blockcopy_core.engine as engine

    def failing(*args, **kwargs):
        raise RuntimeError("inductor lowering failed")

    monkeypatch.setattr(engine, "compile_frame", failing)
    model = small_model()
    sparse, eager = bc.convert(model, 16, compile=True, buckets=4), bc.convert(small_model(), 16)
    full = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    x = torch.randn(2, 3, 32, 32)
    sparse(x, full)
    eager(x, full)
    grid = torch.zeros_like(full)
    grid[0, 0, 1, 0] = True
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="inductor lowering failed"):
        out = sparse(x + 2, grid)
    assert rel_error(out, eager(x + 2, sparse.executed_grid)) <= TOLERANCE[torch.float32]
    assert sparse.executed_grid.sum() == 2, "one block rounded up to the bucket of 2"
    assert sparse.warmup([0.25]) == {}, "the failed bucket is not compiled again"
    with pytest.warns(RuntimeWarning, match="bucket 'dense'"):
        assert sparse.warmup([0.5, 1.0]) == {4: None, "dense": None}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.usefixtures("no_tf32")
def test_compiled_taps_of_a_dilation_beyond_the_tile(device):
    """A convolution dilated beyond the tile reads one window per kernel tap (on the CPU also eagerly); a
    traced frame reads them with one masked indexing op (tiles.gather_tap_windows_reference)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=20, dilation=20, groups=2),
                          nn.Conv2d(6, 4, (3, 5), padding=(17, 36), dilation=(17, 18))).eval().to(device)
    compiled, eager = bc.convert(model, 16, compile=True), bc.convert(model, 16)
    full = torch.ones(2, 1, 2, 3, dtype=torch.bool, device=device)
    x = torch.randn(2, 3, 32, 48, device=device)
    compiled(x, full)
    eager(x, full)
    with torch.no_grad():
        for grid in grids_with(4, full.shape, 2, device):
            x = x + torch.randn_like(x)
            out = compiled(x, grid)
            assert rel_error(out, eager(x, compiled.executed_grid)) <= TOLERANCE[torch.float32]
