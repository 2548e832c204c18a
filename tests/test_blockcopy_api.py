"""Tests for the high-level API (blockcopy_core.blockcopy) and the output adapters.

A tiny random CenterNet-shaped model (heatmap and box distances at stride 4) runs 2 streams of
128x192 frames, fast on a CPU. Grids, counts and restored states are compared exactly; IG maps are
compared exactly too, since the adapter and the reference paint the same values.
"""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockcopy_core.adapters import CenterNetAdapter, SemanticSegmentationAdapter, paint_class_masks
from blockcopy_core.blockcopy import STAGES, BlockCopy
from blockcopy_core.engine import convert
from blockcopy_core.errors import ConfigError
from blockcopy_core.information_gain import box_information_gain, pool_to_blocks, semantic_information_gain
from blockcopy_core.macs import count_macs
from blockcopy_core.policy import RandomPolicy, blocks_for_target

STREAMS, HEIGHT, WIDTH = 2, 128, 192
SMALL_POLICY = {"widths": (8, 16, 16, 32)}


class TinyCenterNet(nn.Module):
    """Heatmap (N, 3, H/4, W/4) in (0, 1) and box distances (N, 4, H/4, W/4) from 0..255 RGB frames."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
        self.heatmap = nn.Conv2d(8, classes, 1)
        self.wh = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        features = self.body(x / 255.0)
        return {"heatmap": torch.sigmoid(self.heatmap(features)), "wh": 8.0 + 4.0 * F.relu(self.wh(features))}


class TinySegmenter(nn.Module):
    """Class logits (N, 5, H/2, W/2) from [0, 1] frames."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 5, 3, 1, 1))

    def forward(self, x):
        return self.body(x)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model() -> nn.Module:
    torch.manual_seed(1)
    return TinyCenterNet().eval()


def clip(frames: int, seed: int = 0, scale: float = 255.0) -> list[torch.Tensor]:
    """(STREAMS, 3, HEIGHT, WIDTH) frames: a fixed background with a bright square moving right."""
    gen = torch.Generator().manual_seed(seed)
    background = torch.rand(STREAMS, 3, HEIGHT, WIDTH, generator=gen) * 0.5
    video = []
    for t in range(frames):
        frame = background + 0.02 * torch.rand(STREAMS, 3, HEIGHT, WIDTH, generator=gen)
        frame[:, :, 40:72, 10 + 12 * t:42 + 12 * t] = 1.0
        video.append(frame * scale)
    return video


def adapter() -> CenterNetAdapter:
    return CenterNetAdapter(classes=(0, 1), score_threshold=0.5)


def blockcopy(policy="rl", target=0.3, block_size=32, **settings) -> BlockCopy:
    options = SMALL_POLICY if policy == "rl" else None
    return BlockCopy(tiny_model(), adapter(), block_size=block_size, policy=policy, target=target,
                     policy_options=options, **settings)


@pytest.mark.parametrize("block_size", [32, 64])
def test_first_frame_full_then_policy_frames(block_size):
    bc = blockcopy(block_size=block_size)
    grid_shape = (STREAMS, 1, HEIGHT // block_size, WIDTH // block_size)
    frames = clip(3)
    first = bc.step(frames[0])
    assert first.full_frame and first.grid.all() and first.grid.shape == grid_shape
    assert first.information_gain is None and first.ig_map is None and first.policy_stats is None
    assert set(first.seconds) == {"network", "sparse_overhead", "postprocess"}
    second = bc(frames[1])
    assert not second.full_frame
    assert second.grid.shape == grid_shape and second.grid.dtype == torch.bool
    assert second.information_gain.shape == grid_shape
    assert second.ig_map.shape == (STREAMS, HEIGHT // 4, WIDTH // 4)
    assert set(second.seconds) == set(STAGES) - {"compile"}  # nothing compiled (eager engine)
    assert second.frame_stats.executed_blocks == int(second.grid.sum())
    assert len(second.result) == STREAMS
    assert second.outputs["heatmap"].shape == (STREAMS, 3, HEIGHT // 4, WIDTH // 4)
    bc.reset()
    again = bc.step(frames[2])
    assert again.full_frame and again.grid.all()


def test_statistics_are_sensible():
    bc = blockcopy()
    frames = clip(6)
    for frame in frames:
        bc.step(frame)
    stats = bc.statistics
    summary = stats.as_dict()
    assert set(summary) == {"frames", "full_frames", "executed_fraction", "policy_executed_fraction",
                            "policy_selected_fraction",
                            "gmacs_per_frame", "network_gmacs_per_frame", "policy_gmacs_per_frame", "ms_per_frame"}
    assert stats.frames == 6 and stats.full_frames == 1
    assert stats.total_blocks == 6 * STREAMS * (HEIGHT // 32) * (WIDTH // 32)
    assert 0.0 <= stats.policy_executed_fraction <= 1.0
    assert stats.policy_selected_fraction == stats.policy_executed_fraction, "no bucket rounding on the CPU"
    assert stats.executed_fraction == pytest.approx((stats.policy_executed_fraction * 5 + 1) / 6)
    dense_gmacs = count_macs(bc.sparse.model, frames[0]) / 1e9
    assert 0.0 < stats.gmacs_per_frame(include_policy=False) <= dense_gmacs
    policy_gmacs = stats.policy_macs / 1e9 / 5
    policy_input = (bc.adapter.policy_frame(frames[0]), bc.adapter.policy_frame(frames[0]),
                    torch.zeros(STREAMS, 2, HEIGHT // 4, WIDTH // 4), torch.ones(STREAMS, 1, 4, 6))
    assert policy_gmacs == pytest.approx(count_macs(bc.policy.net.eval(), *policy_input) / 1e9)
    network_gmacs = stats.gmacs_per_frame(include_policy=False)
    assert stats.gmacs_per_frame() == pytest.approx(network_gmacs + policy_gmacs * 5 / 6)
    times = stats.ms_per_frame()
    assert set(times) == {*STAGES, "total"} and all(value >= 0 for value in times.values())
    assert times["total"] == pytest.approx(sum(times[stage] for stage in STAGES))
    assert 0.0 < times["sparse_overhead"] < times["network"] + times["sparse_overhead"]
    bc.reset_statistics()
    assert bc.statistics.frames == 0
    bc.step(frames[0])
    assert bc.statistics.full_frames == 0, "reset_statistics keeps the clip going"
    bc.reset()
    bc.step(frames[0])
    assert (bc.statistics.frames, bc.statistics.full_frames) == (2, 1), "a new clip keeps counting"


def test_target_is_settable_while_running():
    bc = blockcopy(policy="random", target=0.25)
    frames = clip(6)
    blocks = (HEIGHT // 32) * (WIDTH // 32)
    executed = []
    for t, frame in enumerate(frames):
        if t == 3:
            bc.target = 0.75
        executed.append(bc.step(frame).grid.flatten(1).sum(1).tolist())
    assert bc.policy.target == 0.75
    assert executed[1] == executed[2] == [blocks_for_target(0.25, blocks)] * STREAMS
    assert executed[3] == executed[5] == [blocks_for_target(0.75, blocks)] * STREAMS
    with pytest.raises(ValueError):
        bc.target = 1.5


@pytest.mark.parametrize("policy", ["random", "residual", "lowfps", "rl"])
def test_policies_through_the_api_hit_the_target(policy):
    target = 0.5
    bc = blockcopy(policy=policy, target=target)
    for frame in clip(13):
        bc.step(frame)
    fraction = bc.statistics.policy_executed_fraction
    if policy in ("random", "residual"):
        assert fraction == blocks_for_target(target, 24) / 24
    elif policy == "lowfps":
        assert fraction == 6 / 12  # frames 2, 4, ..., 12 of the clip: every second one
    else:
        assert abs(fraction - target) < 0.1  # starts at p = tau; 12 * 48 Bernoulli draws


def test_residual_policy_follows_the_moving_square():
    bc = blockcopy(policy="residual", target=0.25)
    frames = clip(3, scale=255.0)
    bc.step(frames[0])
    grid = bc.step(frames[1]).grid
    change = pool_to_blocks((frames[1] - frames[0]).abs().mean(1), 32)
    moved = change > 50
    assert 0 < int(moved.sum()) <= int(grid.sum()) and bool(grid[moved].all())


def test_state_dict_round_trip_resumes_identically():
    frames = clip(9, seed=3)
    trained = blockcopy(update_interval=2, lr=1e-2)
    for frame in frames[:5]:
        step = trained.step(frame)
    assert bool(step.policy_stats["updated"]), "save right after an update: nothing pending is lost"
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)

    torch.manual_seed(123)
    resumed = blockcopy(update_interval=2, lr=1e-2)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    assert any(not torch.equal(a, b) for a, b in zip(resumed.policy.net.parameters(),
                                                     blockcopy().policy.net.parameters()))

    def run(bc):
        bc.reset()
        torch.manual_seed(7)
        steps = [bc.step(frame) for frame in frames[4:]]
        return steps, [p.detach().clone() for p in bc.policy.net.parameters()]

    (steps_a, params_a), (steps_b, params_b) = run(trained), run(resumed)
    assert any(bool(s.policy_stats["updated"]) for s in steps_a[1:])
    for a, b in zip(steps_a, steps_b):
        assert torch.equal(a.grid, b.grid)
        assert torch.equal(a.outputs["heatmap"], b.outputs["heatmap"])
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)


def test_online_learning_is_its_own_switch():
    """eval() (what frameworks call before testing) leaves the policy learning; online_learning=False
    freezes it."""
    bc = blockcopy(update_interval=1, lr=1e-2).eval()
    assert bc.online_learning and bc.policy.training and not bc.training
    before = [p.detach().clone() for p in bc.policy.net.parameters()]
    for frame in clip(3):
        bc.step(frame)
    assert any(not torch.equal(a, b) for a, b in zip(before, bc.policy.net.parameters())), "learns in eval()"
    bc.online_learning = False
    bc.train()
    assert bc.training and not bc.policy.training
    before = [p.detach().clone() for p in bc.policy.net.parameters()]
    for frame in clip(4):
        bc.step(frame)
    assert all(torch.equal(a, b) for a, b in zip(before, bc.policy.net.parameters()))
    assert not blockcopy(online_learning=False).online_learning


def test_policy_object_and_argument_errors():
    policy = RandomPolicy(32, 0.4)
    bc = BlockCopy(tiny_model(), adapter(), block_size=32, policy=policy)
    assert bc.policy is policy and bc.target == 0.4
    with pytest.raises(TypeError, match="adapter"):
        BlockCopy(tiny_model(), None, block_size=32)
    with pytest.raises(ValueError, match="policy settings"):
        BlockCopy(tiny_model(), adapter(), block_size=32, policy=policy, gamma=1.0)
    with pytest.raises(ConfigError, match="block_size.*policy's block size 32"):
        BlockCopy(tiny_model(), adapter(), block_size=64, policy=policy)


def fake_detections(seed: int, count: int = 6) -> list[dict[str, torch.Tensor]]:
    """Per stream: boxes partly outside the frame, scores around the threshold, labels 0..2."""
    gen = torch.Generator().manual_seed(seed)
    detections = []
    for _ in range(STREAMS):
        corner = torch.rand(count, 2, generator=gen) * torch.tensor([WIDTH + 20.0, HEIGHT + 20.0]) - 10
        size = torch.rand(count, 2, generator=gen) * 50 + 3
        detections.append({"boxes": torch.cat([corner, corner + size], 1),
                           "scores": torch.rand(count, generator=gen),
                           "labels": torch.randint(0, 3, (count,), generator=gen)})
    return detections


def test_detection_adapter_ig_equals_box_information_gain_pooled():
    detector = adapter()
    current, previous = fake_detections(0), fake_detections(1)
    ig_map = detector.information_gain(current, previous, (HEIGHT, WIDTH))
    assert ig_map.shape == (STREAMS, HEIGHT // 4, WIDTH // 4)
    for block_size in (32, 64):
        pooled = pool_to_blocks(ig_map, block_size // 4)
        for stream in range(STREAMS):
            cur, prev = (detector.relevant(d)[stream] for d in (current, previous))
            reference = box_information_gain(cur["boxes"], cur["scores"], prev["boxes"], prev["scores"],
                                             HEIGHT, WIDTH, cur["labels"], prev["labels"])
            assert torch.equal(pooled[stream], pool_to_blocks(reference, block_size)[0])
            assert float(reference.max()) > 0
            assert bool((cur["scores"] >= 0.5).all()) and set(cur["labels"].tolist()) <= {0, 1}


def test_detection_adapter_ig_in_the_loop_matches_decoded_detections():
    bc = blockcopy(policy="random", target=0.5)
    frames = clip(3)
    previous = bc.step(frames[0])
    step = bc.step(frames[1])
    for stream in range(STREAMS):
        cur, prev = (bc.adapter.relevant(s.result)[stream] for s in (step, previous))
        reference = box_information_gain(cur["boxes"], cur["scores"], prev["boxes"], prev["scores"],
                                         HEIGHT, WIDTH, cur["labels"], prev["labels"])
        assert torch.equal(step.information_gain[stream], pool_to_blocks(reference, 32)[0])


def test_paint_class_masks_by_hand():
    detections = [{"boxes": torch.tensor([[0.0, 0.0, 8.0, 4.0], [5.0, 2.0, 9.0, 6.0], [0.0, 0.0, 16.0, 16.0]]),
                   "scores": torch.tensor([0.6, 0.9, 0.7]), "labels": torch.tensor([2, 2, 5])}]
    masks = paint_class_masks(detections, classes=(2, 7), height=16, width=16, stride=4)
    expected = torch.zeros(1, 2, 4, 4)
    expected[0, 0, 0, 0:2] = 0.6
    expected[0, 0, 0:2, 1:3] = 0.9
    assert torch.equal(masks, expected)


def test_centernet_adapter_masks_and_decode_classes():
    model = tiny_model()
    frames = clip(1)[0]
    with torch.no_grad():
        outputs = model(frames)
    full = CenterNetAdapter(classes=(0, 1), score_threshold=0.0)
    subset = CenterNetAdapter(classes=(1,), decode_classes=(1, 2), score_threshold=0.0)
    masks = full.output_masks(full.decode(outputs, (HEIGHT, WIDTH)), (HEIGHT, WIDTH))
    assert masks.shape == (STREAMS, 2, HEIGHT // 4, WIDTH // 4) and full.output_channels == 2
    decoded = subset.decode(outputs, (HEIGHT, WIDTH))
    assert all(set(d["labels"].tolist()) <= {1, 2} for d in decoded)
    reference = full.decode({"heatmap": outputs["heatmap"][:, 1:3], "wh": outputs["wh"]}, (HEIGHT, WIDTH))
    for got, want in zip(decoded, reference):
        assert torch.equal(got["boxes"], want["boxes"]) and torch.equal(got["labels"], want["labels"] + 1)
    with pytest.raises(ValueError, match="include"):
        CenterNetAdapter(classes=(0,), decode_classes=(1,))


def test_semantic_segmentation_adapter_in_the_loop():
    torch.manual_seed(2)
    segmenter = TinySegmenter().eval()
    seg = SemanticSegmentationAdapter(num_classes=5)
    bc = BlockCopy(segmenter, seg, block_size=32, policy="rl", target=0.5, policy_options=SMALL_POLICY)
    frames = clip(3, scale=1.0)
    first = bc.step(frames[0])
    second = bc.step(frames[1])
    assert first.result.shape == (STREAMS, 5, HEIGHT // 2, WIDTH // 2)
    assert torch.allclose(second.result.sum(1), torch.ones(STREAMS, HEIGHT // 2, WIDTH // 2))
    assert torch.equal(seg.output_masks(second.result, (HEIGHT, WIDTH)), second.result)
    expected = semantic_information_gain(second.result, first.result)
    assert torch.equal(second.ig_map, expected)
    assert torch.equal(second.information_gain, pool_to_blocks(expected, 16))
    assert bc.policy.net.output_channels == 5
    with pytest.raises(ValueError, match="class maps"):
        seg.decode(torch.zeros(1, 4, 8, 8), (16, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_matches_the_cpu_engine_on_the_blocks_it_executed():
    """The whole loop on CUDA (policy, CUDA-graph buckets, IG, update) against the CPU reference engine
    fed the same frames and the grids that actually ran on the GPU (bucket extras included)."""
    gpu = BlockCopy(tiny_model().cuda(), adapter(), block_size=32, policy="rl", target=0.3,
                    policy_options=SMALL_POLICY)
    cpu = convert(tiny_model(), 32)
    for number, frame in enumerate(clip(8)):
        step = gpu.step(frame.cuda())
        executed = gpu.sparse.executed_grid.cpu()
        assert executed.shape == step.grid.shape and bool((executed | ~step.grid.cpu()).all()), \
            "every block the policy selected must have run"
        expected = cpu(frame, executed)
        for key in ("heatmap", "wh"):
            torch.testing.assert_close(step.outputs[key].cpu(), expected[key], rtol=1e-4, atol=1e-4)
        if number:
            assert step.ig_map.is_cuda and step.information_gain.shape == step.grid.shape
    assert gpu.statistics.frames == 8 and gpu.policy.net.training


def test_compiling_is_timed_apart_from_the_network():
    """With compile=True a bucket's first frame compiles its program inside the forward: the engine
    reports those seconds and BlockCopy moves them from ``network`` into ``compile``; a frame of a bucket
    compiled before has none."""
    bc = blockcopy(policy="random", target=0.5, compile=True, buckets=2)
    frames = clip(3)
    bc.step(frames[0])
    first, second = bc.step(frames[1]), bc.step(frames[2])
    assert first.frame_stats.executed_blocks == second.frame_stats.executed_blocks, "one bucket"
    assert first.frame_stats.compile_seconds > 0.1
    assert first.seconds["compile"] == pytest.approx(first.frame_stats.compile_seconds)
    assert first.seconds["network"] < first.seconds["compile"]
    assert second.frame_stats.compile_seconds == 0.0 and "compile" not in second.seconds
    assert set(bc.statistics.ms_per_frame()) == {*STAGES, "total"}
