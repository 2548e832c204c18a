"""Tests for the captured online loop (BlockCopy(..., capture_loop=True), blockcopy_core.captured_loop).

On the CPU: the fixed-shape pieces it replays (padded information gain, block IG from boxes, masked O_t
painting, top-k decoding, results padded by ``fixed_result``) equal the list-based ones they replace,
exactly. On a GPU: a captured run equals an eager run fed the same grids (results, block IG, rewards, the
policy's weights after three updates, across a clip boundary, a change of tau and a reloaded state),
driven by ``step`` or by ``select``/``observe`` with results of varying counts, with its stages compiled
too, and the captured draw stays random.
"""
import pytest
import torch

from blockcopy_core import adapters
from blockcopy_core.adapters import CenterNetAdapter, DetectionAdapter, InputFormat, paint_class_masks
from blockcopy_core.blockcopy import BlockCopy
from blockcopy_core.compiled import compile_function
from blockcopy_core.errors import ConfigError
from blockcopy_core.information_gain import batch_box_information_gain, padded_box_information_gain, pool_to_blocks
from blockcopy_core.models.centernet import decode_detections
from blockcopy_core.policy.reinforce import action_log_prob
from test_blockcopy_api import SMALL_POLICY, clip, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def random_detections(gen, streams, count, size=64.0, labels=3):
    """Per stream ``count`` detections; some boxes empty, reversed or outside the (size x size) map."""
    dets = []
    for _ in range(streams):
        corner = torch.rand(count, 2, generator=gen) * size * 1.2 - 0.1 * size
        extent = torch.rand(count, 2, generator=gen) * size / 3
        extent[::5] = 0.0  # empty boxes
        extent[1::7] *= -1  # reversed boxes
        boxes = torch.cat([corner, corner + extent], dim=1).round(decimals=1)
        dets.append({"boxes": boxes, "scores": torch.rand(count, generator=gen),
                     "labels": torch.randint(0, labels, (count,), generator=gen)})
    return dets


@pytest.mark.parametrize("with_labels", [False, True])
def test_padded_slots_outside_valid_equal_dropping_them(with_labels):
    gen = torch.Generator().manual_seed(3)
    current, previous = random_detections(gen, 3, 12), random_detections(gen, 3, 9)
    valid = torch.rand(3, 12, generator=gen) > 0.4
    prev_valid = torch.rand(3, 9, generator=gen) > 0.4
    keys = ("boxes", "scores", "labels") if with_labels else ("boxes", "scores")
    kept = [{k: d[k][v] for k in keys} for d, v in zip(current, valid)]
    prev_kept = [{k: d[k][v] for k in keys} for d, v in zip(previous, prev_valid)]
    expected = batch_box_information_gain(kept, prev_kept, 64, 64)
    stacked = {k: torch.stack([d[k] for d in current]) for k in keys}
    prev_stacked = {k: torch.stack([d[k] for d in previous]) for k in keys}
    labels = (stacked["labels"], prev_stacked["labels"]) if with_labels else (None, None)
    args = (stacked["boxes"], stacked["scores"], prev_stacked["boxes"], prev_stacked["scores"], 64, 64)
    options = {"valid": valid, "prev_valid": prev_valid, "labels": labels[0], "prev_labels": labels[1]}
    assert torch.equal(padded_box_information_gain(*args, **options), expected)
    assert torch.equal(padded_box_information_gain(*args, **options, block_size=16), pool_to_blocks(expected, 16))


@pytest.fixture(params=["eager", "as captured"])
def adapter_mode(request, monkeypatch):
    """The adapter as run eagerly (irrelevant detections dropped) and as in a CUDA graph capture (kept,
    masked)."""
    if request.param == "as captured":
        monkeypatch.setattr(adapters, "capturing", lambda device: True)
    return request.param


def test_adapter_block_information_gain_equals_pooled_map(adapter_mode):
    gen = torch.Generator().manual_seed(4)
    adapter = CenterNetAdapter(classes=(0, 2), score_threshold=0.3)
    for _ in range(5):
        current, previous = random_detections(gen, 2, 15, 256.0), random_detections(gen, 2, 11, 256.0)
        expected = batch_box_information_gain(*(
            [{**d, "boxes": d["boxes"] / 4} for d in adapter.relevant(dets)] for dets in (current, previous)), 64, 64)
        ig_map = adapter.information_gain(current, previous, (256, 256))
        blocks = adapter.block_information_gain(current, previous, (256, 256), 64)
        assert blocks.shape == (2, 1, 4, 4)
        assert torch.equal(ig_map, expected)
        assert torch.equal(blocks, pool_to_blocks(ig_map, 16))
        assert blocks.max() > 0


def test_output_masks_equal_painting_the_relevant_detections(adapter_mode):
    gen = torch.Generator().manual_seed(5)
    adapter = CenterNetAdapter(classes=(0, 2), score_threshold=0.3)
    detections = random_detections(gen, 2, 20, 256.0)
    masks = adapter.output_masks(detections, (256, 256))
    expected = paint_class_masks(adapter.relevant(detections), (0, 2), 256, 256, 4)
    assert masks.shape == (2, 2, 64, 64) and masks.max() > 0
    assert torch.equal(masks, expected)


def test_decoding_without_threshold_has_fixed_shapes():
    gen = torch.Generator().manual_seed(6)
    outputs = {"heatmap": torch.rand(2, 3, 16, 16, generator=gen), "wh": torch.rand(2, 4, 16, 16, generator=gen)}
    detections = decode_detections(outputs, max_detections=20)
    assert [d["scores"].shape for d in detections] == [(20,), (20,)]
    thresholded = decode_detections(outputs, score_threshold=1e-9, max_detections=20)
    for d, t in zip(detections, thresholded):
        assert all(torch.equal(d[k], t[k]) for k in d)


def test_compiled_decoding_and_block_ig_equal_the_adapters():
    """What compile_loop=True replays: the adapter's decoding, O_t and block IG traced with fixed shapes and
    compiled by inductor (on the CPU here: its C++ backend) give the eager adapter's values."""
    gen = torch.Generator().manual_seed(5)
    adapter = CenterNetAdapter(classes=(0, 2), score_threshold=0.3, max_detections=20)
    size = (64, 96)

    def outputs():
        return {"heatmap": torch.rand(2, 3, 16, 24, generator=gen) ** 4,
                "wh": torch.rand(2, 4, 16, 24, generator=gen) * 12}

    def decode_and_mask(out):
        result = adapter.decode(out, size)
        return result, adapter.output_masks(result, size)

    def block_gain(result, prev_result):
        return adapter.block_information_gain(result, prev_result, size, 32)

    example = outputs()
    with adapters.fixed_shapes():
        decode = compile_function(decode_and_mask, example)
        block_ig = compile_function(block_gain, decode(example)[0], decode(outputs())[0])
    previous = adapter.decode(outputs(), size)
    for _ in range(3):
        out = outputs()
        result, masks = decode(out)
        expected = adapter.decode(out, size)
        for got, want in zip(result, expected):
            assert got.keys() == want.keys()
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(masks, adapter.output_masks(expected, size), rtol=1e-5, atol=1e-6)
        gain = block_ig(result, previous)
        torch.testing.assert_close(gain, adapter.block_information_gain(expected, previous, size, 32), rtol=1e-5,
                                   atol=1e-6)
        assert gain.shape == (2, 1, 2, 3) and masks.amax() > 0.3
        previous = expected
    with pytest.raises(ValueError, match="compiled for arguments of another structure"):
        decode({"heatmap": example["heatmap"]})


class ThresholdedAdapter(DetectionAdapter):
    """Results of varying counts, as a framework's NMS gives them: the tiny CenterNet's top 30 peaks that
    score at least 0.2, padded to 30 for the captured loop."""

    def __init__(self, max_detections: int | None = 30) -> None:
        super().__init__((0, 1), 0.5, 4, True, InputFormat(), max_detections)

    def detect(self, outputs, frame_size):
        detections = decode_detections(outputs, max_detections=30, input_size=frame_size)
        return [{key: value[dets["scores"] >= 0.2] for key, value in dets.items()} for dets in detections]


def test_fixed_results_give_the_same_masks_and_information_gain(adapter_mode):
    gen = torch.Generator().manual_seed(8)
    adapter = ThresholdedAdapter(max_detections=16)
    size = (256, 256)
    for _ in range(3):
        current = [random_detections(gen, 1, count, 256.0)[0] for count in (11, 3)]
        previous = [random_detections(gen, 1, count, 256.0)[0] for count in (0, 16)]
        fixed, prev_fixed = adapter.fixed_result(current, size), adapter.fixed_result(previous, size)
        assert [tuple(d["boxes"].shape) for d in fixed + prev_fixed] == [(16, 4)] * 4
        assert [d["labels"][-1].item() for d in fixed] == [-1, -1]
        assert torch.equal(adapter.output_masks(fixed, size), adapter.output_masks(current, size))
        assert torch.equal(adapter.information_gain(fixed, prev_fixed, size),
                           adapter.information_gain(current, previous, size))
        gain = adapter.block_information_gain(fixed, prev_fixed, size, 64)
        assert torch.equal(gain, adapter.block_information_gain(current, previous, size, 64)) and gain.max() > 0


def test_fixed_results_keep_the_highest_scoring_detections():
    gen = torch.Generator().manual_seed(9)
    adapter = ThresholdedAdapter(max_detections=8)
    size = (256, 256)
    current, previous = random_detections(gen, 1, 21, 256.0), random_detections(gen, 1, 5, 256.0)
    top = current[0]["scores"].topk(8).indices
    best = [{key: value[top] for key, value in current[0].items()}]
    fixed = adapter.fixed_result(current, size)
    assert fixed[0]["scores"].shape == (8,) and set(fixed[0]["scores"].tolist()) == set(best[0]["scores"].tolist())
    assert torch.equal(adapter.information_gain(fixed, previous, size), adapter.information_gain(best, previous, size))
    assert adapter.fixed_result(current, size)[0]["scores"].shape == (8,)
    assert ThresholdedAdapter(None).fixed_result(current, size) is current


def test_capture_loop_needs_results_of_fixed_shapes():
    with pytest.raises(ConfigError, match="capture_loop.*fixes_results"):
        BlockCopy(tiny_model(), ThresholdedAdapter(max_detections=None), block_size=32, capture_loop=True)
    BlockCopy(tiny_model(), ThresholdedAdapter(), block_size=32, capture_loop=True)


def test_capture_loop_needs_the_rl_policy():
    with pytest.raises(ConfigError, match="capture_loop.*RandomPolicy"):
        BlockCopy(tiny_model(), CenterNetAdapter(classes=(0, 1)), block_size=32, policy="random",
                  capture_loop=True)


def test_capture_loop_changes_nothing_on_the_cpu():
    runs = []
    for capture in (False, True):
        torch.manual_seed(7)
        bc = BlockCopy(tiny_model(), CenterNetAdapter(classes=(0, 1), score_threshold=0.5), block_size=32,
                       policy_options=SMALL_POLICY, update_interval=2, capture_loop=capture)
        runs.append([bc.step(frame) for frame in clip(6)])
    for eager, captured in zip(*runs):
        assert torch.equal(eager.grid, captured.grid)
        assert torch.equal(eager.result[0]["boxes"], captured.result[0]["boxes"])


# --- on a GPU ---------------------------------------------------------------------------------------

def test_compile_loop_needs_capture_loop():
    with pytest.raises(ConfigError, match="compile_loop"):
        BlockCopy(tiny_model(), CenterNetAdapter(classes=(0, 1)), block_size=32, compile_loop=True)


def cuda_blockcopy(capture: bool, adapter: DetectionAdapter | None = None, **settings) -> BlockCopy:
    torch.manual_seed(11)
    adapter = adapter or CenterNetAdapter(classes=(0, 1), score_threshold=0.5)
    return BlockCopy(tiny_model().cuda(), adapter, block_size=32, policy_options=SMALL_POLICY, cuda_graphs=False,
                     capture_loop=capture, **settings)


def select_and_observe(bc: BlockCopy, frames: torch.Tensor):
    """One frame driven as a framework drives it: select, the block-sparse model, its own decoding, observe."""
    outputs = bc.sparse(frames, bc.select(frames))
    return bc.observe(bc.adapter.decode(outputs, tuple(frames.shape[-2:])), outputs=outputs)


# how a run is driven, and the adapter it uses: step() decodes in the graphs; select/observe pads the
# framework's results of varying counts
DRIVERS = {"step": (BlockCopy.step, lambda: None), "select_observe": (select_and_observe, ThresholdedAdapter)}


# compiled stages sum in another order: the policy's weights after three RMSprop steps (which divide by the
# gradients' running RMS, so small gradients move by their sign) agree to 1e-3
LOOP_TOLERANCE = {False: 1e-4, True: 1e-3}


@cuda
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("driver", list(DRIVERS))
@pytest.mark.parametrize("compile_loop", [False, True], ids=["captured", "compiled"])
def test_captured_loop_equals_the_eager_loop_fed_the_same_grids(compile_loop, driver):
    run, make_adapter = DRIVERS[driver]
    captured = cuda_blockcopy(True, make_adapter(), compile_loop=compile_loop)
    eager = cuda_blockcopy(False, make_adapter())
    tolerance = LOOP_TOLERANCE[compile_loop]
    forced = {}

    def sample(observation):  # the eager policy's draw replaced by the captured run's grid
        logits = eager.policy.net(observation.frame, observation.frame_state, observation.prev_output,
                                  observation.prev_grid)
        actions = forced["grid"].float()
        return actions, action_log_prob(logits, actions), torch.sigmoid(logits).detach()

    eager.policy.sample = sample
    frames = [f.cuda() for f in clip(14)]
    checked = 0
    for t, frame in enumerate(frames):
        if t == 8:  # a new clip: the captured graphs are reused
            loop = captured._loop
            captured.reset()
            eager.reset()
        if t == 6:
            captured.target = eager.target = 0.6
        if t == 10:  # new optimiser state tensors: the captured step is captured again on them
            for bc in (captured, eager):
                bc.load_state_dict(bc.state_dict())
        a = run(captured, frame)
        forced["grid"] = a.grid
        b = run(eager, frame)
        assert torch.equal(a.grid, b.grid)
        for da, db in zip(a.result, b.result):
            for key in da:
                torch.testing.assert_close(da[key], db[key], rtol=1e-5, atol=1e-5)
        if not a.full_frame:
            assert a.ig_map is None and b.ig_map is not None  # a ran captured, b eagerly
            torch.testing.assert_close(a.information_gain, b.information_gain, rtol=1e-5, atol=1e-6)
            for name, value in b.policy_stats.items():
                if name != "updated":
                    torch.testing.assert_close(a.policy_stats[name], value, rtol=tolerance, atol=1e-6)
            assert a.policy_stats["updated"] == b.policy_stats["updated"]
            checked += 1
    assert captured._loop is loop and loop.decodes == (driver == "step")
    assert checked == 12
    assert captured.policy.net.stem[1].num_batches_tracked.item() == eager.policy.net.stem[1].num_batches_tracked.item()
    for (name, pa), pb in zip(captured.policy.state_dict().items(), eager.policy.state_dict().values()):
        if isinstance(pa, torch.Tensor) and pa.is_floating_point():
            torch.testing.assert_close(pa, pb, rtol=tolerance, atol=tolerance / 100, msg=name)
    head = captured.policy.net.head.weight
    assert head.abs().max() > 0  # three updates moved the zero-initialised head


@cuda
@pytest.mark.parametrize("compile_loop", [False, True], ids=["captured", "compiled"])
def test_captured_draws_are_fresh_each_frame(compile_loop):
    # eval policy: every block at p = 0.5
    bc = cuda_blockcopy(True, target=0.5, online_learning=False, compile_loop=compile_loop)
    frames = [f.cuda() for f in clip(22)]
    grids = [bc.step(frame).grid for frame in frames][2:]
    assert bc._loop is not None
    distinct = {tuple(g.flatten().tolist()) for g in grids}
    assert len(distinct) == len(grids)
    executed = torch.stack(grids).float().mean().item()
    assert abs(executed - 0.5) < 0.1  # 960 draws: 6 standard deviations
