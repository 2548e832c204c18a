"""Detectron2's InstancesAdapter: results padded to fixed shapes (what BlockCopy's captured loop takes) give
the information gain and policy masks of the Instances themselves, by box and by mask IoU, eagerly and as
in a CUDA graph capture (irrelevant detections masked, not dropped); on a GPU also compiled and captured."""
import pytest
import torch

pytest.importorskip("detectron2")
from detectron2.structures import Boxes, Instances  # noqa: E402

from blockcopy_core import adapters  # noqa: E402
from blockcopy_core.adapters import InputFormat  # noqa: E402
from blockcopy_core.captured_loop import captured_function  # noqa: E402
from blockcopy_d2.modeling.adapters import InstancesAdapter  # noqa: E402

SIZE = (256, 512)
CLASSES = 8
BLOCK = 64


def instances(gen: torch.Generator, count: int, device: str = "cpu") -> Instances:
    """``count`` random instances on a SIZE frame: boxes 10-110 px, scores in [0, 1), 28x28 mask
    probabilities (blobs around the box centre, so masks overlap like real ones)."""
    corner = torch.rand(count, 2, generator=gen) * torch.tensor([SIZE[1] - 120.0, SIZE[0] - 120.0])
    extent = 10 + torch.rand(count, 2, generator=gen) * 100
    grid = torch.linspace(-1, 1, 28)
    blob = 1 - (grid[None, :, None] ** 2 + grid[None, None, :] ** 2) * (0.5 + torch.rand(count, 1, 1, generator=gen))
    result = Instances(SIZE)
    result.pred_boxes = Boxes(torch.cat([corner, corner + extent], dim=1).to(device))
    result.scores = torch.rand(count, generator=gen).to(device)
    result.pred_classes = torch.randint(0, CLASSES, (count,), generator=gen).to(device)
    result.pred_masks = blob[:, None].clamp(0, 1).to(device)
    return result


def moved(result: Instances, gen: torch.Generator, keep: int) -> Instances:
    """The first ``keep`` instances of ``result`` 4 px to the right with new scores: the same objects a
    frame earlier, so that detections of both frames overlap, relevant or not."""
    earlier = result[:keep]
    earlier.pred_boxes = Boxes(earlier.pred_boxes.tensor + torch.tensor([4.0, 0.0, 4.0, 0.0]))
    earlier.scores = torch.rand(keep, generator=gen)
    return earlier


def adapter(use_masks: bool) -> InstancesAdapter:
    return InstancesAdapter(CLASSES, 0.3, InputFormat(), use_masks=use_masks, max_detections=12)


@pytest.fixture(params=["eager", "as captured"])
def mode(request, monkeypatch):
    if request.param == "as captured":
        monkeypatch.setattr(adapters, "capturing", lambda device: True)
        monkeypatch.setattr("blockcopy_d2.modeling.adapters.capturing", lambda device: True)
    return request.param


@pytest.mark.parametrize("use_masks", [False, True], ids=["boxes", "masks"])
def test_fixed_results_give_the_information_gain_and_masks_of_the_instances(use_masks, mode):
    gen = torch.Generator().manual_seed(0)
    adapt = adapter(use_masks)
    for counts, prev_counts in (((7, 12), (5, 0)), ((15, 1), (12, 1))):  # 15 > 12: the best 12 are kept
        given = [instances(gen, count) for count in counts]
        previous = [moved(r, gen, count) for r, count in zip(given, prev_counts)]
        current = [r[r.scores.argsort(descending=True)[:12]] for r in given]  # what padding keeps of 15
        # the reference: the Instances themselves, eagerly
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(adapters, "capturing", lambda device: False)
            patch.setattr("blockcopy_d2.modeling.adapters.capturing", lambda device: False)
            expected_ig = adapt.information_gain(current, previous, SIZE)
            expected_masks = adapt.output_masks(current, SIZE)
        fixed, prev_fixed = adapt.fixed_result(given, SIZE), adapt.fixed_result(previous, SIZE)
        assert {tuple(d["scores"].shape) for d in fixed + prev_fixed} == {(12,)}
        torch.testing.assert_close(adapt.information_gain(fixed, prev_fixed, SIZE), expected_ig, rtol=1e-6,
                                   atol=1e-7)
        torch.testing.assert_close(adapt.output_masks(fixed, SIZE), expected_masks, rtol=1e-6, atol=1e-7)
        block_ig = adapt.block_information_gain(fixed, prev_fixed, SIZE, BLOCK)
        assert block_ig.shape == (2, 1, SIZE[0] // BLOCK, SIZE[1] // BLOCK) and block_ig.max() > 0
        torch.testing.assert_close(block_ig, torch.nn.functional.max_pool2d(expected_ig[:, None], BLOCK // 4),
                                   rtol=1e-6, atol=1e-7)


def test_mask_results_keep_their_masks_padded():
    gen = torch.Generator().manual_seed(1)
    fixed = adapter(True).fixed_result([instances(gen, 5)], SIZE)[0]
    assert fixed["masks"].shape == (12, 28, 28) and not fixed["masks"][5:].any()
    assert fixed["labels"][5:].eq(-1).all() and fixed["scores"][5:].eq(0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("use_masks", [False, True], ids=["boxes", "masks"])
def test_compiled_captured_information_gain_and_masks_equal_the_eager_ones(use_masks):
    """What BlockCopy's compiled captured loop replays for Detectron2 results: O_t and the block IG of the
    padded results, traced with fixed shapes, compiled and replayed as a CUDA graph."""
    gen = torch.Generator().manual_seed(2)
    adapt = adapter(use_masks)

    def stage(pair):
        result, prev_result = pair
        return adapt.output_masks(result, SIZE), adapt.block_information_gain(result, prev_result, SIZE, BLOCK)

    def pair(counts, prev_counts):
        return tuple(adapt.fixed_result([instances(gen, c, "cuda") for c in cs], SIZE) for cs in (counts, prev_counts))

    replay = captured_function(stage, pair((4, 9), (6, 2)))
    for counts, prev_counts in (((12, 3), (0, 7)), ((5, 5), (11, 1))):
        inputs = pair(counts, prev_counts)
        masks, block_ig = replay(inputs)
        expected_masks, expected_ig = stage(inputs)  # eager: irrelevant detections dropped
        torch.testing.assert_close(masks, expected_masks, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(block_ig, expected_ig, rtol=1e-5, atol=1e-6)
        assert block_ig.max() > 0
