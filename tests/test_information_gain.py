"""Tests for blockcopy_core.information_gain against maps computed by hand on tiny images.

Tolerance: every expected value is at most a product of a score and (1 - IoU) or a short sum of
log terms, each a few fp32 roundings (unit roundoff 6e-8) away from the exact value, so an absolute
1e-6 (about 8 ulps at 1.0) is tight and still robust. Results that involve no arithmetic (0, or a
score copied as is) and batched-versus-single comparisons of the same per-pair arithmetic are
compared exactly. GPU results are compared with CPU ones at 1e-6 too (their log and division kernels
may round differently), relative for the KL values, which reach -log(eps).
"""
import math

import pytest
import torch

from blockcopy_core import information_gain as ig_module
from blockcopy_core.information_gain import (
    batch_box_information_gain,
    box_information_gain,
    mask_information_gain,
    pool_to_blocks,
    semantic_information_gain,
)

ATOL = 1e-6
H, W = 8, 10


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)


def exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def boxes(*rows):
    """(K, 4) float boxes; boxes() is the empty (0, 4) set."""
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def scores(*values):
    return torch.tensor(values, dtype=torch.float32)


def painted(height, width, *rects):
    """Expected map: max-composition of (x1, y1, x2, y2, value) integer rectangles over zeros."""
    out = torch.zeros(height, width, dtype=torch.float64)
    for x1, y1, x2, y2, value in rects:
        out[y1:y2, x1:x2] = out[y1:y2, x1:x2].clamp_min(value)
    return out.float()


def rect_masks(height, width, *rects):
    """(K, H, W) bool masks of integer (x1, y1, x2, y2) rectangles."""
    masks = torch.zeros(len(rects), height, width, dtype=torch.bool)
    for k, (x1, y1, x2, y2) in enumerate(rects):
        masks[k, y1:y2, x1:x2] = True
    return masks


def box_ig(cur_boxes, cur_scores, prev_boxes, prev_scores, **kwargs):
    return box_information_gain(cur_boxes, cur_scores, prev_boxes, prev_scores, H, W, **kwargs)


def random_detections(generator, count, num_labels=3):
    xy = torch.randint(-2, 11, (count, 2), generator=generator).float()
    size = torch.randint(1, 7, (count, 2), generator=generator).float()
    jitter = torch.rand(count, 4, generator=generator)
    return {
        "boxes": torch.cat([xy, xy + size], dim=1) + jitter,
        "scores": torch.rand(count, generator=generator),
        "labels": torch.randint(0, num_labels, (count,), generator=generator),
    }


# Boxes: Algorithm 1 cases.

def test_static_object_gives_zero():
    out = box_ig(boxes([1, 2, 5, 6]), scores(0.9), boxes([1, 2, 5, 6]), scores(0.8))
    exact(out, torch.zeros(H, W))


def test_new_object_paints_its_score_in_its_box():
    out = box_ig(boxes([1, 2, 4, 6]), scores(0.8), boxes(), scores())
    exact(out, painted(H, W, (1, 2, 4, 6, 0.8)))


def test_vanished_object_paints_its_previous_score():
    out = box_ig(boxes(), scores(), boxes([3, 0, 9, 3]), scores(0.7))
    exact(out, painted(H, W, (3, 0, 9, 3, 0.7)))


def test_moved_object_paints_one_minus_iou_times_score_on_both_boxes():
    # Previous [0, 0, 4, 4], current [2, 0, 6, 4]: intersection 2 x 4 = 8, union 16 + 16 - 8 = 24.
    iou = 8 / 24
    out = box_ig(boxes([2, 0, 6, 4]), scores(0.9), boxes([0, 0, 4, 4]), scores(0.6))
    expected = painted(H, W, (2, 0, 6, 4, (1 - iou) * 0.9), (0, 0, 4, 4, (1 - iou) * 0.6))
    close(out, expected)
    close(out[0, :6], torch.tensor([0.4, 0.4, 0.6, 0.6, 0.6, 0.6]))


def test_overlapping_boxes_take_the_max():
    out = box_ig(boxes([0, 0, 5, 5], [3, 3, 8, 7]), scores(0.3, 0.6), boxes(), scores())
    expected = painted(H, W, (0, 0, 5, 5, 0.3), (3, 3, 8, 7, 0.6))
    exact(out, expected)
    assert out[4, 4].item() == pytest.approx(0.6)
    assert out[0, 0].item() == pytest.approx(0.3)


def test_disjoint_boxes_do_not_match():
    out = box_ig(boxes([0, 0, 2, 2]), scores(0.5), boxes([6, 5, 9, 8]), scores(0.4))
    exact(out, painted(H, W, (0, 0, 2, 2, 0.5), (6, 5, 9, 8, 0.4)))


def test_best_iou_match_is_chosen_and_other_previous_stays_unmatched():
    # Current [0, 0, 4, 4] vs previous A = [0, 0, 4, 2] (IoU 8/16) and B = [2, 0, 6, 4] (IoU 8/24).
    out = box_ig(boxes([0, 0, 4, 4]), scores(0.8), boxes([0, 0, 4, 2], [2, 0, 6, 4]),
                 scores(0.6, 0.3))
    expected = painted(H, W, (0, 0, 4, 4, 0.5 * 0.8), (0, 0, 4, 2, 0.5 * 0.6), (2, 0, 6, 4, 0.3))
    close(out, expected)


def test_previous_matched_twice_keeps_the_larger_value():
    # Previous P = [0, 0, 4, 4] is the best match of A = P (IoU 1) and of B = [0, 0, 4, 2] (IoU 0.5).
    out = box_ig(boxes([0, 0, 4, 4], [0, 0, 4, 2]), scores(1.0, 0.5), boxes([0, 0, 4, 4]),
                 scores(1.0))
    expected = painted(H, W, (0, 0, 4, 2, 0.5 * 0.5), (0, 0, 4, 4, 0.5 * 1.0))
    close(out, expected)


def test_unmatched_previous_next_to_static_object():
    out = box_ig(boxes([1, 1, 3, 3]), scores(0.9), boxes([1, 1, 3, 3], [5, 4, 8, 8]),
                 scores(0.9, 0.2))
    exact(out, painted(H, W, (5, 4, 8, 8, 0.2)))


@pytest.mark.parametrize("empty_current, empty_previous", [(True, True), (True, False),
                                                           (False, True)])
def test_empty_sets(empty_current, empty_previous):
    cur = (boxes(), scores()) if empty_current else (boxes([2, 2, 4, 5]), scores(0.4))
    prev = (boxes(), scores()) if empty_previous else (boxes([6, 1, 8, 3]), scores(0.3))
    out = box_ig(*cur, *prev)
    rects = ([] if empty_current else [(2, 2, 4, 5, 0.4)]) + (
        [] if empty_previous else [(6, 1, 8, 3, 0.3)])
    assert out.shape == (H, W)
    exact(out, painted(H, W, *rects))


def test_pixel_coverage_convention():
    # floor(x1) <= x < ceil(x2), floor(y1) <= y < ceil(y2): x1 = 1.5, x2 = 3.0 -> columns 1, 2;
    # y1 = 0.2, y2 = 2.7 -> rows 0, 1, 2.
    out = box_ig(boxes([1.5, 0.2, 3.0, 2.7]), scores(1.0), boxes(), scores())
    exact(out, painted(H, W, (1, 0, 3, 3, 1.0)))


def test_boxes_are_clipped_and_zero_width_integer_boxes_cover_nothing():
    out = box_ig(boxes([-3.0, -1.0, 20.0, 2.0], [4.0, 5.0, 4.0, 7.0]), scores(0.5, 0.9),
                 boxes(), scores())
    exact(out, painted(H, W, (0, 0, W, 2, 0.5)))


def test_labels_restrict_matching_to_the_same_class():
    args = (boxes([1, 1, 4, 4]), scores(0.9), boxes([1, 1, 4, 4]), scores(0.7))
    exact(box_ig(*args), torch.zeros(H, W))
    same = box_ig(*args, labels=torch.tensor([2]), prev_labels=torch.tensor([2]))
    exact(same, torch.zeros(H, W))
    other = box_ig(*args, labels=torch.tensor([2]), prev_labels=torch.tensor([5]))
    exact(other, painted(H, W, (1, 1, 4, 4, 0.9)))


def test_float64_inputs_stay_float64():
    out = box_information_gain(boxes([0, 0, 2, 2]).double(), scores(0.5).double(),
                               boxes().double(), scores().double(), 4, 4)
    assert out.dtype == torch.float64


def test_chunked_painting_matches_unchunked(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    cur, prev = random_detections(generator, 9), random_detections(generator, 7)
    masks, prev_masks = torch.rand(9, H, W, generator=generator), torch.rand(7, H, W,
                                                                             generator=generator)
    whole_boxes = box_ig(cur["boxes"], cur["scores"], prev["boxes"], prev["scores"])
    whole_masks = mask_information_gain(masks, cur["scores"], prev_masks, prev["scores"])
    # Two boxes or masks per chunk.
    monkeypatch.setattr(ig_module, "_PAINT_CHUNK_ELEMENTS", 2 * H * W)
    exact(box_ig(cur["boxes"], cur["scores"], prev["boxes"], prev["scores"]), whole_boxes)
    exact(mask_information_gain(masks, cur["scores"], prev_masks, prev["scores"]), whole_masks)


def reference_paint(height, width, box_tensor, values):
    """Slow per-box painter with the floor/ceil coverage convention, for comparison."""
    out = torch.zeros(height, width)
    for (x1, y1, x2, y2), value in zip(box_tensor.tolist(), values.tolist()):
        rows = slice(max(math.floor(y1), 0), max(math.ceil(y2), 0))
        cols = slice(max(math.floor(x1), 0), max(math.ceil(x2), 0))
        out[rows, cols] = out[rows, cols].clamp_min(value)
    return out


@pytest.mark.parametrize("height, width, count", [
    (8, 40, 10),  # one cell per pixel along rows, box-edge cells along columns
    (40, 8, 10),  # the other way round
    (37, 53, 3),  # box-edge cells along both axes
    (6, 7, 30),  # one cell per pixel along both axes
])
def test_painting_matches_reference_on_random_boxes(height, width, count):
    generator = torch.Generator().manual_seed(height * width + count)
    xy = torch.rand(count, 2, generator=generator) * torch.tensor([width + 4.0, height + 4.0]) - 2
    size = torch.rand(count, 2, generator=generator) * torch.tensor([width / 2, height / 2])
    box_tensor = torch.cat([xy, xy + size], dim=1)
    values = torch.rand(count, generator=generator)
    out = box_information_gain(box_tensor, values, boxes(), scores(), height, width)
    exact(out, reference_paint(height, width, box_tensor, values))


@pytest.mark.parametrize("call, message", [
    (lambda: box_ig(torch.zeros(2, 5), scores(0.1, 0.2), boxes(), scores()), r"\(K, 4\)"),
    (lambda: box_ig(boxes([0, 0, 1, 1]), scores(0.1, 0.2), boxes(), scores()), "scores"),
    (lambda: box_ig(boxes(), scores(), boxes(), scores(), labels=torch.zeros(0)), "together"),
    (lambda: box_information_gain(boxes(), scores(), boxes(), scores(), 0, 4), "height"),
])
def test_box_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# Boxes: several streams.

@pytest.mark.parametrize("with_labels", [False, True])
def test_batched_streams_equal_separate_calls(with_labels):
    generator = torch.Generator().manual_seed(1)
    counts = [(3, 4), (0, 2), (5, 0), (0, 0), (6, 6)]
    dets = [random_detections(generator, k) for k, _ in counts]
    prev = [random_detections(generator, p) for _, p in counts]
    if not with_labels:
        for d in (*dets, *prev):
            del d["labels"]
    out = batch_box_information_gain(dets, prev, H, W)
    assert out.shape == (len(counts), H, W)
    for i, (d, p) in enumerate(zip(dets, prev)):
        labels = {"labels": d["labels"], "prev_labels": p["labels"]} if with_labels else {}
        # Same per-pair IoU and per-pixel max as the single call: bitwise equal.
        exact(out[i], box_ig(d["boxes"], d["scores"], p["boxes"], p["scores"], **labels))


def test_batched_streams_never_match_across_streams():
    dets = [{"boxes": boxes([0, 0, 3, 3]), "scores": scores(0.6)}, {"boxes": boxes(),
                                                                    "scores": scores()}]
    prev = [{"boxes": boxes(), "scores": scores()}, {"boxes": boxes([0, 0, 3, 3]),
                                                     "scores": scores(0.4)}]
    out = batch_box_information_gain(dets, prev, H, W)
    exact(out, torch.stack([painted(H, W, (0, 0, 3, 3, 0.6)), painted(H, W, (0, 0, 3, 3, 0.4))]))


def test_batched_errors():
    one = [{"boxes": boxes(), "scores": scores()}]
    with pytest.raises(ValueError, match="streams"):
        batch_box_information_gain(one, one * 2, H, W)
    with pytest.raises(ValueError, match="at least one"):
        batch_box_information_gain([], [], H, W)
    labelled = [{"boxes": boxes(), "scores": scores(), "labels": torch.zeros(0)}]
    with pytest.raises(ValueError, match="labels"):
        batch_box_information_gain(labelled, one, H, W)


# Masks.

def mask_ig(cur_masks, cur_scores, prev_masks, prev_scores, **kwargs):
    return mask_information_gain(cur_masks, cur_scores, prev_masks, prev_scores, **kwargs)


def test_mask_static_new_vanished():
    blob = rect_masks(H, W, (1, 1, 4, 5))
    none = rect_masks(H, W)
    exact(mask_ig(blob, scores(0.9), blob, scores(0.9)), torch.zeros(H, W))
    exact(mask_ig(blob, scores(0.8), none, scores()), painted(H, W, (1, 1, 4, 5, 0.8)))
    exact(mask_ig(none, scores(), blob, scores(0.7)), painted(H, W, (1, 1, 4, 5, 0.7)))
    exact(mask_ig(none, scores(), none, scores()), torch.zeros(H, W))


def test_mask_moved_object_uses_mask_iou_and_paints_masks_only():
    # An L-shaped previous mask: a 3 x 3 square plus one extra pixel at (y, x) = (0, 3), 10 pixels.
    # The current mask is the square moved one column right (columns 1..3, rows 0..2), 9 pixels.
    # Intersection: columns 1..2 of the square (6) plus the extra pixel (1) = 7; union 10 + 9 - 7.
    prev = rect_masks(H, W, (0, 0, 3, 3))
    prev[0, 0, 3] = True
    cur = rect_masks(H, W, (1, 0, 4, 3))
    iou = 7 / 12
    out = mask_ig(cur, scores(0.9), prev, scores(0.6))
    expected = torch.zeros(H, W)
    expected[prev[0]] = (1 - iou) * 0.6
    expected[cur[0]] = (1 - iou) * 0.9
    close(out, expected)


def test_mask_overlap_takes_max_and_probabilities_are_thresholded():
    masks = torch.zeros(2, H, W)
    masks[0, 0:4, 0:4] = 0.5
    masks[0, 0, 0] = 0.49
    masks[1, 2:6, 2:6] = 0.9
    out = mask_ig(masks, scores(0.7, 0.2), torch.zeros(0, H, W), scores())
    expected = painted(H, W, (2, 2, 6, 6, 0.2), (0, 0, 4, 4, 0.7))
    expected[0, 0] = 0.0
    exact(out, expected)


def test_mask_labels_restrict_matching():
    blob = rect_masks(H, W, (2, 2, 5, 5))
    out = mask_ig(blob, scores(0.9), blob, scores(0.7), labels=torch.tensor([1]),
                  prev_labels=torch.tensor([0]))
    exact(out, painted(H, W, (2, 2, 5, 5, 0.9)))


def test_mask_variant_equals_box_variant_on_rectangles():
    generator = torch.Generator().manual_seed(2)
    cur, prev = random_detections(generator, 6), random_detections(generator, 5)

    def to_masks(box_tensor):
        integer = box_tensor.floor().clamp(min=0).long()
        integer[:, 2:] = box_tensor[:, 2:].ceil().long()
        return rect_masks(H, W, *integer.tolist())

    def snapped(box_tensor):
        low = box_tensor[:, :2].floor().clamp_min(0)
        high = torch.minimum(box_tensor[:, 2:].ceil(), torch.tensor([float(W), float(H)]))
        return torch.cat([low, high], dim=1)

    from_masks = mask_ig(to_masks(cur["boxes"]), cur["scores"], to_masks(prev["boxes"]),
                         prev["scores"])
    from_boxes = box_ig(snapped(cur["boxes"]), cur["scores"], snapped(prev["boxes"]),
                        prev["scores"])
    close(from_masks, from_boxes)


def test_mask_errors():
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        mask_ig(torch.zeros(H, W), scores(), torch.zeros(0, H, W), scores())
    with pytest.raises(ValueError, match="prev_masks"):
        mask_ig(torch.zeros(1, H, W), scores(0.1), torch.zeros(0, H, W + 1), scores())


# Semantic segmentation.

def two_class(p0, shape=(1, 1, 1)):
    """(N, 2, H, W) probabilities with class-0 probability p0 everywhere."""
    p = torch.full(shape, p0, dtype=torch.float32)
    return torch.stack([p, 1 - p], dim=1)


def test_kl_of_identical_distributions_is_zero():
    probs = torch.softmax(torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(3)), 1)
    out = semantic_information_gain(probs, probs.clone())
    assert out.shape == (2, 3, 4)
    close(out, torch.zeros(2, 3, 4))


def test_kl_two_classes_by_hand_is_current_relative_to_previous():
    # KL(p || q) = 0.75 ln(0.75 / 0.5) + 0.25 ln(0.25 / 0.5); the reverse direction differs.
    forward = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    out = semantic_information_gain(two_class(0.75), two_class(0.5))
    close(out, torch.full((1, 1, 1), forward))
    assert abs(forward - reverse) > 1e-2


def test_kl_is_finite_with_zero_probabilities():
    eps = 1e-8
    certain, ruled_out = two_class(1.0), two_class(0.0)
    close(semantic_information_gain(certain, two_class(0.5)), torch.full((1, 1, 1), math.log(2)))
    out = semantic_information_gain(certain, ruled_out, eps=eps)
    torch.testing.assert_close(out, torch.full((1, 1, 1), -math.log(eps)), rtol=1e-6, atol=0)
    exact(semantic_information_gain(ruled_out, ruled_out), torch.zeros(1, 1, 1))


def test_kl_errors():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        semantic_information_gain(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="differ"):
        semantic_information_gain(torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 3, 4))
    with pytest.raises(ValueError, match="eps"):
        semantic_information_gain(two_class(0.5), two_class(0.5), eps=0.0)


# Pooling to blocks.

def test_pool_to_blocks_by_hand():
    ig = torch.tensor([[0.0, 0.1, 0.0, 0.0, 0.5, 0.0],
                       [0.0, 0.0, 0.0, 0.2, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                       [0.9, 0.0, 0.0, 0.0, 0.0, 0.3]])
    expected = torch.tensor([[[[0.1, 0.2, 0.5], [0.9, 0.0, 0.3]]]])
    exact(pool_to_blocks(ig, 2), expected)
    exact(pool_to_blocks(ig[None], 2), expected)
    exact(pool_to_blocks(ig[None, None], 2), expected)
    exact(pool_to_blocks(torch.stack([ig, 2 * ig]), 2), torch.cat([expected, 2 * expected]))


def test_pool_to_blocks_equals_max_pool2d():
    ig = torch.rand(3, 1, 18, 12, generator=torch.Generator().manual_seed(5)).transpose(2, 3)
    exact(pool_to_blocks(ig, 6), torch.nn.functional.max_pool2d(ig, 6))


def test_pool_to_blocks_at_map_stride():
    # A 4 x 8 map at stride 4 of a 16 x 32 frame with 8-pixel blocks: pool with 8 // 4 = 2.
    ig = torch.arange(32, dtype=torch.float32).reshape(4, 8)
    out = pool_to_blocks(ig, 8 // 4)
    assert out.shape == (1, 1, 2, 4)
    exact(out[0, 0], torch.tensor([[9.0, 11.0, 13.0, 15.0], [25.0, 27.0, 29.0, 31.0]]))


def test_pool_to_blocks_errors():
    with pytest.raises(ValueError, match="does not divide"):
        pool_to_blocks(torch.zeros(6, 8), 4)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        pool_to_blocks(torch.zeros(1, 2, 4, 4), 2)
    with pytest.raises(ValueError, match="positive integer"):
        pool_to_blocks(torch.zeros(4, 4), 0)


# Device.

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    generator = torch.Generator().manual_seed(4)
    counts = [(7, 5), (0, 3), (4, 0)]
    dets = [random_detections(generator, k) for k, _ in counts]
    prev = [random_detections(generator, p) for _, p in counts]

    def to_cuda(ds):
        return [{key: value.cuda() for key, value in d.items()} for d in ds]

    cpu = batch_box_information_gain(dets, prev, H, W)
    gpu = batch_box_information_gain(to_cuda(dets), to_cuda(prev), H, W)
    assert gpu.device.type == "cuda"
    close(gpu.cpu(), cpu)

    masks = torch.rand(6, H, W, generator=generator)
    prev_masks = torch.rand(4, H, W, generator=generator)
    mask_scores, prev_mask_scores = torch.rand(6, generator=generator), torch.rand(
        4, generator=generator)
    cpu = mask_ig(masks, mask_scores, prev_masks, prev_mask_scores)
    gpu = mask_ig(masks.cuda(), mask_scores.cuda(), prev_masks.cuda(), prev_mask_scores.cuda())
    close(gpu.cpu(), cpu)

    probs = torch.softmax(torch.randn(2, 19, H, W, generator=generator), 1)
    prev_probs = torch.softmax(torch.randn(2, 19, H, W, generator=generator), 1)
    cpu = semantic_information_gain(probs, prev_probs)
    gpu = semantic_information_gain(probs.cuda(), prev_probs.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=ATOL)
    exact(pool_to_blocks(gpu, 2).cpu(), pool_to_blocks(gpu.cpu(), 2))
