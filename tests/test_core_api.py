"""The core API the framework plugins build on: in-place convert, BlockCopy as an nn.Module with
select/observe, the configuration schema, input formats and the shared evaluation protocol."""
import io

import pytest
import torch
import torchvision
from torch import nn

import blockcopy_core as bc
from blockcopy_core.adapters import CenterNetAdapter, InputFormat
from blockcopy_core.blockcopy import BlockCopy, RunStatistics, task_parameters
from blockcopy_core.config import BlockCopyConfig
from blockcopy_core.policy import POLICIES, RandomPolicy, register_policy
from blockcopy_core.protocol import DenseRunner, run_clips, warm_up
from test_blockcopy_api import HEIGHT, SMALL_POLICY, STREAMS, WIDTH, adapter, clip, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
BLOCK = 32


class WithRootState(nn.Module):
    """A model with a parameter and a buffer of its own (not only in children), FrozenBatchNorm2d (whose
    weight and bias are buffers) and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torchvision.ops.FrozenBatchNorm2d(4)
        self.scale = nn.Parameter(torch.full((1, 4, 1, 1), 1.5))
        self.register_buffer("shift", torch.full((1, 4, 1, 1), 0.25))
        self.register_buffer("scratch", torch.zeros(1), persistent=False)

    def forward(self, x):
        return self.norm(self.conv(x)) * self.scale + self.shift


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and buffer filled with random values (running variances kept positive)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
    return model.eval()


def frames(n=STREAMS, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, 64, 96, dtype=dtype)


def full(n=STREAMS) -> torch.Tensor:
    return torch.ones(n, 1, 2, 3, dtype=torch.bool)


# --- convert: the same modules, the same keys, one model under casts --------------------------------

@pytest.mark.parametrize("factory", [WithRootState, lambda: nn.Sequential(
    *list(torchvision.models.resnet18().children())[:-2])])
def test_converted_model_has_exactly_the_original_state_dict_keys(factory):
    model = randomized(factory(), 0)
    sparse = bc.convert(model, BLOCK)
    assert list(sparse.state_dict()) == list(model.state_dict())
    assert [n for n, _ in sparse.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [n for n, _ in sparse.named_buffers()] == [n for n, _ in model.named_buffers()]
    assert all(a is b for a, b in zip(sparse.modules(), model.modules()) if a is not sparse)


def test_checkpoints_load_strictly_in_both_directions():
    plain, other = randomized(WithRootState(), 0), randomized(WithRootState(), 1)
    sparse = bc.convert(plain, BLOCK)
    x = frames()
    sparse.load_state_dict(other.state_dict(), strict=True)  # a plain checkpoint into the converted model
    torch.testing.assert_close(sparse(x, full()), other(x), rtol=1e-6, atol=1e-6)
    fresh = WithRootState().eval()
    fresh.load_state_dict(sparse.state_dict(), strict=True)  # and the converted model's into a plain one
    torch.testing.assert_close(fresh(x), other(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key"):
        sparse.load_state_dict({k: v for k, v in other.state_dict().items() if k != "shift"}, strict=True)


def test_converted_child_keeps_its_parents_checkpoint_keys():
    """A framework holds the converted part as a child (e.g. meta_arch.backbone): keys unchanged."""
    class Parent(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.head = nn.Conv2d(4, 2, 1)

    plain = Parent(randomized(WithRootState(), 0))
    converted = Parent(bc.convert(randomized(WithRootState(), 1), BLOCK))
    assert list(converted.state_dict()) == list(plain.state_dict())
    converted.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(converted.state_dict(), strict=True)


@pytest.mark.parametrize("cast_through", ["converted", "original"])
@pytest.mark.parametrize("cast", ["to", "double"])
def test_convert_then_cast_leaves_one_consistent_model(cast_through, cast):
    model = randomized(WithRootState(), 0)
    reference = randomized(WithRootState(), 0).double()
    sparse = bc.convert(model, BLOCK)
    target = sparse if cast_through == "converted" else model
    target.to(torch.float64) if cast == "to" else target.double()
    for holder in (model, sparse):
        assert all(t.dtype == torch.float64 for t in [*holder.parameters(), *holder.buffers()])
    x = frames(dtype=torch.float64)
    expected = reference(x)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # the original still runs densely
    torch.testing.assert_close(sparse(x, full()), expected, rtol=1e-12, atol=1e-12)
    grid = full()
    grid[0, 0, 1, 2] = False
    out = sparse(x + 1, grid)
    torch.testing.assert_close(out[0, :, 32:, 64:], expected[0, :, 32:, 64:], rtol=0, atol=0)


def test_original_model_stays_dense_after_sparse_frames():
    model = randomized(WithRootState(), 0)
    sparse = bc.convert(model, BLOCK)
    x = frames()
    sparse(x, full())
    sparse(frames(), torch.rand(STREAMS, 1, 2, 3) < 0.5)
    y = frames()
    torch.testing.assert_close(model(y), randomized(WithRootState(), 0)(y), rtol=0, atol=0)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_cast_of_the_converted_model_starts_a_new_clip():
    sparse = bc.convert(randomized(WithRootState(), 0), BLOCK)
    sparse(frames(), full())
    sparse.double()
    with pytest.raises(bc.InvalidInputError, match="first frame after reset"):
        sparse(frames(dtype=torch.float64), torch.rand(STREAMS, 1, 2, 3) < 0.5)


def test_training_mode_is_refused_naming_the_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    with pytest.raises(bc.UnsupportedOperationError, match=r"training mode.*model\.eval\(\)"):
        bc.convert(model, BLOCK)
    sparse = bc.convert(model.eval(), BLOCK)
    sparse.train()
    with pytest.raises(bc.UnsupportedOperationError, match=r"'<model> \(Sequential\)'.*training mode"):
        sparse(frames(), full())
    sparse.eval()
    model[1].train()  # one submodule switched back to training mode
    with pytest.raises(bc.UnsupportedOperationError, match=r"1 \(BatchNorm2d\)"):
        sparse(frames(), full())


def test_size_divisibility_and_attributes_of_the_original():
    class Backbone(nn.Module):
        size_divisibility = 32

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

        def forward(self, x):
            return self.conv(x)

        def output_shape(self):
            return {"out": 4}

    assert bc.convert(Backbone().eval(), 96).size_divisibility == 96
    assert bc.convert(Backbone().eval(), 64).output_shape() == {"out": 4}
    assert bc.convert(nn.Conv2d(3, 3, 1).eval(), 48).size_divisibility == 48
    assert bc.input_divisibility(128, 32) == 128 and bc.input_divisibility(64, 48) == 192
    with pytest.raises(bc.ConfigError, match="'block_size' = 48.*largest stride 32"):
        bc.convert(Backbone().eval(), 48)
    with pytest.raises(ValueError, match="already block-sparse"):
        bc.convert(bc.convert(Backbone().eval(), 64), 64)


# --- the configuration schema -----------------------------------------------------------------------

def test_config_defaults_are_the_methods():
    config = BlockCopyConfig()
    assert config.to_dict() == {
        "block_size": 128, "policy": "rl", "target": 0.3, "gamma": 5.0, "cost_momentum": 0.9, "lr": 1e-4,
        "weight_decay": 1e-3, "update_interval": 4, "buckets": 16, "cuda_graphs": True, "dense_when_full": True,
        "compile": False, "warmup_clips": 400, "online_learning": True, "capture_loop": False, "compile_loop": False}


@pytest.mark.parametrize("key, value, message", [
    ("target", 0.0, r"'target' = 0.0.*\(0, 1\]"), ("target", 1.5, "'target' = 1.5"),
    ("block_size", 0, "'block_size' = 0"), ("block_size", 64.0, "'block_size' = 64.0"),
    ("cost_momentum", 1.0, r"'cost_momentum'.*\[0, 1\)"), ("update_interval", 0, "'update_interval'"),
    ("lr", -1.0, "'lr'"), ("gamma", "5", "'gamma' = '5'"), ("buckets", 0, "'buckets'"),
    ("cuda_graphs", 1, "'cuda_graphs'"), ("warmup_clips", -1, "'warmup_clips'"),
    ("compile_loop", True, "'compile_loop'.*without capture_loop")])
def test_config_values_out_of_range_are_named(key, value, message):
    with pytest.raises(bc.ConfigError, match=message):
        BlockCopyConfig(**{key: value})


def test_config_from_framework_keys():
    config = BlockCopyConfig.from_dict({"BLOCK_SIZE": 64, "TARGET": 0.5, "update_interval": 2})
    assert (config.block_size, config.target, config.update_interval, config.gamma) == (64, 0.5, 2, 5.0)
    with pytest.raises(bc.ConfigError, match="'TAU'.*one of the BlockCopy settings"):
        BlockCopyConfig.from_dict({"TAU": 0.5})
    with pytest.raises(bc.ConfigError, match="'policy' = 'oracle'.*registered policies"):
        BlockCopy(tiny_model(), adapter(), block_size=BLOCK, policy="oracle")


def test_everything_is_built_from_one_config():
    config = BlockCopyConfig(block_size=BLOCK, target=0.4, gamma=2.0, cost_momentum=0.8, lr=1e-3,
                             weight_decay=0.0, update_interval=3, buckets=8, cuda_graphs=False,
                             dense_when_full=False)
    runner = BlockCopy(tiny_model(), adapter(), config, policy_options=SMALL_POLICY)
    policy, sparse = runner.policy, runner.sparse
    assert (sparse.block_size, sparse.buckets, sparse.cuda_graphs, sparse.dense_when_full) == (BLOCK, 8, False, False)
    assert (policy.target, policy.gamma, policy.mu, policy.update_every) == (0.4, 2.0, 0.8, 3)
    assert policy.optimizer.defaults["lr"] == 1e-3 and policy.optimizer.defaults["weight_decay"] == 0.0
    assert runner.config == config and runner.block_size == BLOCK
    engine = bc.convert(tiny_model(), config=config)
    assert (engine.block_size, engine.buckets, engine.cuda_graphs) == (BLOCK, 8, False)


# --- BlockCopy as an nn.Module ---------------------------------------------------------------------

def test_blockcopy_module_holds_the_policy_not_the_task_model():
    model = tiny_model()
    runner = BlockCopy(model, adapter(), block_size=BLOCK, policy_options=SMALL_POLICY)
    keys = list(runner.state_dict())
    assert keys and all(key.startswith("policy.") for key in keys)
    assert [m for m in runner.children()] == [runner.policy]
    runner.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in runner.policy.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the task model is the caller's"
    optimised = {id(p) for group in runner.policy.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in runner.policy.net.parameters()}


def test_task_parameters_exclude_the_policy():
    class Framework(nn.Module):
        def __init__(self):
            super().__init__()
            self.detector = tiny_model()
            self.blockcopy = BlockCopy(self.detector, adapter(), block_size=BLOCK, policy_options=SMALL_POLICY)

    framework = Framework()
    chosen = {id(p) for p in task_parameters(framework)}
    assert chosen == {id(p) for p in framework.detector.parameters()}
    framework.eval()
    assert framework.blockcopy.online_learning, "eval() on the framework's model keeps online learning"


def test_policy_saved_and_loaded_with_the_module():
    trained = BlockCopy(tiny_model(), adapter(), block_size=BLOCK, update_interval=1, lr=1e-2,
                        policy_options=SMALL_POLICY)
    for frame in clip(3):
        trained.step(frame)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh = BlockCopy(tiny_model(), adapter(), block_size=BLOCK, policy_options=SMALL_POLICY)
    fresh.load_state_dict(torch.load(buffer), strict=True)
    for a, b in zip(fresh.policy.parameters(), trained.policy.parameters()):
        assert torch.equal(a, b)


# --- select / observe ------------------------------------------------------------------------------

def run_two_phase(runner: BlockCopy, frame: torch.Tensor):
    """What a framework does: its own model call between select and observe."""
    grid = runner.select(frame)
    outputs = runner.sparse(frame, grid)
    result = runner.adapter.decode(outputs, frame.shape[-2:])
    return runner.observe(result, outputs=outputs)


def test_select_and_observe_equal_step():
    runners = []
    for _ in range(2):
        torch.manual_seed(3)
        runners.append(BlockCopy(tiny_model(), adapter(), block_size=BLOCK, update_interval=2, lr=1e-2,
                                 policy_options=SMALL_POLICY))
    video = clip(6)
    torch.manual_seed(4)
    steps = [runners[0].step(frame) for frame in video]
    torch.manual_seed(4)
    phases = [run_two_phase(runners[1], frame) for frame in video]
    for a, b in zip(steps, phases):
        assert torch.equal(a.grid, b.grid) and a.full_frame == b.full_frame
        if not a.full_frame:
            assert torch.equal(a.information_gain, b.information_gain)
            assert a.policy_stats["updated"] == b.policy_stats["updated"]
    assert any(s.policy_stats and s.policy_stats["updated"] for s in phases)
    for p, q in zip(runners[0].policy.parameters(), runners[1].policy.parameters()):
        assert torch.equal(p, q)
    assert runners[1].statistics.frames == 6 and runners[1].statistics.full_frames == 1
    assert set(phases[1].seconds) >= {"policy", "network", "postprocess", "information_gain", "update"}


def test_protocol_errors_are_named():
    runner = BlockCopy(tiny_model(), adapter(), block_size=BLOCK, policy="random")
    with pytest.raises(bc.ProtocolError, match="preceding select"):
        runner.observe([])
    frame = clip(1)[0]
    grid = runner.select(frame)
    with pytest.raises(bc.ProtocolError, match="twice without observe"):
        runner.select(frame)
    with pytest.raises(bc.ProtocolError, match="no new run of the block-sparse model"):
        runner.observe([])
    outputs = runner.sparse(frame, grid)
    runner.observe(runner.adapter.decode(outputs, frame.shape[-2:]))
    runner.select(frame)
    runner.reset()  # drops the pending frame
    assert runner.select(frame).all()


@pytest.mark.parametrize("shape", [(STREAMS, 1, HEIGHT, WIDTH), (STREAMS, 4, HEIGHT, WIDTH), (3, HEIGHT, WIDTH)])
def test_frames_of_the_wrong_shape_are_named(shape):
    runner = BlockCopy(tiny_model(), adapter(), block_size=BLOCK, policy="random")
    with pytest.raises(bc.InvalidInputError, match=r"\(N, (3|C), H, W\)"):
        runner.select(torch.rand(shape))


def test_registered_policy_by_name():
    class EveryOther(RandomPolicy):
        pass

    register_policy("every_other_test", EveryOther)
    try:
        runner = BlockCopy(tiny_model(), adapter(), block_size=BLOCK, policy="every_other_test", target=0.5)
        assert type(runner.policy) is EveryOther and runner.policy.target == 0.5
        with pytest.raises(ValueError, match="already registered"):
            register_policy("every_other_test", EveryOther)
        with pytest.raises(TypeError, match="BlockPolicy subclass"):
            register_policy("not_a_policy", object)
    finally:
        POLICIES.pop("every_other_test", None)


# --- input formats ---------------------------------------------------------------------------------

DETECTRON2 = InputFormat(pixel_mean=(103.53, 116.28, 123.675), channel_order="BGR")
MMDET = InputFormat((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


@pytest.mark.parametrize("fmt", [DETECTRON2, MMDET, InputFormat(max_value=1.0)])
def test_input_format_recovers_the_rgb_frame(fmt):
    rgb = torch.rand(2, 3, 8, 12, dtype=torch.float64)
    pixels = rgb.flip(1) if fmt.channel_order == "BGR" else rgb
    mean = torch.tensor(fmt.pixel_mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(fmt.pixel_std, dtype=torch.float64).view(1, 3, 1, 1)
    encoded = (pixels * fmt.max_value - mean) / std
    torch.testing.assert_close(fmt.to_rgb(encoded), rgb, rtol=1e-12, atol=1e-12)


def test_policy_sees_rgb_while_the_frame_state_stays_in_the_models_space():
    """A Detectron2-style model (BGR, mean subtracted) and an RGB 0..255 model: the policy gets the same
    frames, so it picks the same blocks; the engine's frame state holds what the model was fed."""
    class FromDetectron2Format(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_model()

        def forward(self, x):
            mean = torch.tensor(DETECTRON2.pixel_mean).view(1, 3, 1, 1)
            return self.inner((x + mean)[:, [2, 1, 0]])

    rgb_runner = BlockCopy(tiny_model(), adapter(), block_size=BLOCK, policy_options=SMALL_POLICY)
    d2_adapter = CenterNetAdapter(classes=(0, 1), score_threshold=0.5)
    d2_adapter.input_format = DETECTRON2
    d2_runner = BlockCopy(FromDetectron2Format().eval(), d2_adapter, block_size=BLOCK,
                          policy_options=SMALL_POLICY)
    mean = torch.tensor(DETECTRON2.pixel_mean).view(1, 3, 1, 1)
    for frame in clip(4):
        d2_frame = frame.flip(1) - mean
        torch.manual_seed(5)
        a = rgb_runner.step(frame)
        torch.manual_seed(5)
        b = d2_runner.step(d2_frame)
        assert torch.equal(a.grid, b.grid)
        torch.testing.assert_close(d2_runner.sparse.frame_state, rgb_runner.sparse.frame_state.flip(1) - mean)


# --- the shared protocol ---------------------------------------------------------------------------

class CountingRunner(DenseRunner):
    def __init__(self):
        super().__init__(tiny_model(), adapter(), BLOCK)
        self.resets = 0

    def reset(self):
        self.resets += 1


def test_warm_up_draws_clips_in_epochs_and_restarts_statistics():
    runner = CountingRunner()
    video = [frame for frame in clip(5)]
    clips = [video[:2], video[2:4], video[4:]]
    seen = []
    original = runner.step
    runner.step = lambda frames: seen.append(frames) or original(frames)
    warm_up(runner, clips, num_clips=4, seed=0)
    generator = torch.Generator().manual_seed(0)
    order = (torch.randperm(3, generator=generator).tolist() + torch.randperm(3, generator=generator).tolist())[:4]
    expected = [frame for index in order for frame in clips[index]]
    assert len(seen) == len(expected) and all(a is b for a, b in zip(seen, expected))
    assert runner.resets == 5 and runner.statistics.frames == 0


def test_run_clips_starts_each_clip_and_yields_every_frame():
    runner = BlockCopy(tiny_model(), adapter(), block_size=BLOCK, policy="random")
    video = clip(5)
    steps = list(run_clips(runner, [video[:3], video[3:]], desc="test"))
    assert [(c, f) for c, f, _, _ in steps] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert [s.full_frame for _, _, _, s in steps] == [True, False, False, True, False]
    assert runner.statistics.frames == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cast_through", ["converted", "original"])
def test_convert_then_cuda_half_runs_with_cuda_graphs(cast_through):
    """convert on the CPU, then .cuda().half() through either object (what Detectron2's build_model does
    after the plugin converted): the CUDA-graph engine runs the one fp16 model, equal to the CPU engine."""
    model = randomized(WithRootState(), 0)
    cpu = bc.convert(randomized(WithRootState(), 0), BLOCK)
    sparse = bc.convert(model, BLOCK)
    (sparse if cast_through == "converted" else model).cuda().half()
    assert all(t.is_cuda and t.dtype == torch.float16 for t in [*model.parameters(), *model.buffers()])
    video = [frames() for _ in range(4)]
    grids = [full()] + [torch.rand(STREAMS, 1, 2, 3) < 0.5 for _ in range(3)]
    for x, grid in zip(video, grids):
        out = sparse(x.cuda().half(), grid.cuda())
        expected = cpu(x, sparse.executed_grid.cpu())  # the blocks that ran, bucket extras included
        torch.testing.assert_close(out.float().cpu(), expected, rtol=1e-2, atol=1e-2)  # fp16: 11-bit mantissa
    torch.testing.assert_close(model(video[0].cuda().half()).float().cpu(), cpu.model(video[0]),
                               rtol=1e-2, atol=1e-2)


def test_statistics_of_several_runs_add_up():
    runs = []
    for frames in (3, 2):
        runner = BlockCopy(tiny_model(), adapter(), block_size=BLOCK, policy="random")
        for frame in clip(frames):
            runner.step(frame)
        runs.append(runner.statistics)
    total = RunStatistics.total(runs)
    assert (total.frames, total.full_frames) == (5, 2)
    assert total.executed_blocks == runs[0].executed_blocks + runs[1].executed_blocks
    assert total.seconds["network"] == pytest.approx(runs[0].seconds["network"] + runs[1].seconds["network"])
