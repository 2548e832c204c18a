"""Detection metrics on hand-checkable cases."""
import math

import numpy as np
import pytest
import torch

from blockcopy_core.evaluation import (average_precision_50, detection_agreement,
                                       log_average_miss_rate, miss_rate_curve)

# Pedestrian-shaped boxes far apart from each other (pairwise IoU 0).
A = [0.0, 0.0, 20.0, 50.0]
B = [100.0, 0.0, 120.0, 50.0]
C = [200.0, 0.0, 220.0, 50.0]
FAR = [300.0, 300.0, 320.0, 350.0]
FAR2 = [400.0, 300.0, 420.0, 350.0]


def boxes(*rows):
    """(K, 4) float tensor from x1y1x2y2 lists."""
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def dets(*pairs):
    """One frame of detections from (box, score) pairs."""
    return {"boxes": boxes(*[box for box, _ in pairs]),
            "scores": torch.tensor([score for _, score in pairs], dtype=torch.float32)}


GT = [boxes(A, B), boxes(C), boxes()]


def test_perfect_detections():
    perfect = [dets((A, 0.9), (B, 0.8)), dets((C, 0.7)), dets()]
    assert log_average_miss_rate(perfect, GT) == pytest.approx(1e-10)
    assert average_precision_50(perfect, GT) == pytest.approx(1.0)


def test_no_detections():
    nothing = [dets(), dets(), dets()]
    assert log_average_miss_rate(nothing, GT) == 1.0
    assert average_precision_50(nothing, GT) == 0.0


def test_hand_computed_misses_and_false_positives():
    """3 boxes in 3 frames (the last empty). By descending score: TP 0.9, FP 0.8, TP 0.7, FP 0.6; B
    is never found.

    Curve (FPPI, MR): (0, 1) (0, 2/3) (1/3, 2/3) (1/3, 1/3) (2/3, 1/3). The 7 reference FPPIs up to
    10^-0.5 = 0.316 < 1/3 read MR 2/3, the two at 10^-0.25 and 10^0 read 1/3.
    COCO AP: recall/precision after each detection (1/3, 1) (1/3, 1/2) (2/3, 2/3) (2/3, 1/2);
    interpolated precision is 1 at the 34 recall thresholds 0..0.33, 2/3 at the 33 from 0.34..0.66 and
    0 above, so AP = (34 + 33 * 2/3) / 101 = 56/101.
    """
    detections = [dets((A, 0.9), (FAR, 0.8)), dets((C, 0.7), (FAR, 0.6)), dets()]
    fppi, miss_rate = miss_rate_curve(detections, GT)
    np.testing.assert_allclose(fppi, [0, 0, 1 / 3, 1 / 3, 2 / 3])
    np.testing.assert_allclose(miss_rate, [1, 2 / 3, 2 / 3, 1 / 3, 1 / 3])
    expected = math.exp((7 * math.log(2 / 3) + 2 * math.log(1 / 3)) / 9)
    assert log_average_miss_rate(detections, GT) == pytest.approx(expected)
    assert average_precision_50(detections, GT) == pytest.approx(56 / 101, abs=1e-6)


def test_curve_not_reaching_low_fppi_and_miss_rate_floor():
    """FP at 0.9 then TP at 0.8 in one frame: MR is 1 up to FPPI 1, then 0 (floored to 1e-10)."""
    detections = [dets((FAR, 0.9), (A, 0.8))]
    assert log_average_miss_rate(detections, [boxes(A)]) == pytest.approx(1e-10 ** (1 / 9))
    assert average_precision_50(detections, [boxes(A)]) == pytest.approx(0.5, abs=1e-6)


def test_tied_scores_enter_together_regardless_of_order():
    """A TP and an FP with equal scores give one point (FPPI 1, MR 1/2), never (0, 1/2)."""
    ground_truth = [boxes(A, B)]
    for pairs in (((A, 0.5), (FAR, 0.5)), ((FAR, 0.5), (A, 0.5))):
        fppi, miss_rate = miss_rate_curve([dets(*pairs)], ground_truth)
        np.testing.assert_allclose(fppi, [0, 1])
        np.testing.assert_allclose(miss_rate, [1, 0.5])
        assert log_average_miss_rate([dets(*pairs)], ground_truth) == pytest.approx(0.5 ** (1 / 9))


def test_duplicate_detection_is_a_false_positive():
    shifted_a = [2.0, 0.0, 22.0, 50.0]  # IoU with A = 18 * 50 / (22 * 50) > 0.5
    fppi, miss_rate = miss_rate_curve([dets((A, 0.9), (shifted_a, 0.8))], [boxes(A)])
    np.testing.assert_allclose(fppi, [0, 0, 1])
    np.testing.assert_allclose(miss_rate, [1, 0, 0])


def test_low_overlap_is_not_a_match():
    half_a = [10.0, 0.0, 30.0, 50.0]  # IoU with A = 1/3
    detections = [dets((half_a, 0.9))]
    assert log_average_miss_rate(detections, [boxes(A)]) == 1.0
    assert average_precision_50(detections, [boxes(A)]) == 0.0


def test_ignore_regions():
    """A high-scoring detection on a not-considered person is dropped, not counted as an FP.

    Without the ignore region it is an FP ranked above the TP: MR is 1 up to FPPI 1 and 0 (floored)
    at FPPI 1, AP is 0.5."""
    ground_truth, ignore = [boxes(A)], [boxes(B)]
    detections = [dets((B, 0.95), (A, 0.9))]
    assert log_average_miss_rate(detections, ground_truth, ignore=ignore) == pytest.approx(1e-10)
    assert average_precision_50(detections, ground_truth, ignore=ignore) == pytest.approx(1.0)
    assert log_average_miss_rate(detections, ground_truth) == pytest.approx(1e-10 ** (1 / 9))
    assert average_precision_50(detections, ground_truth) == pytest.approx(0.5, abs=1e-6)


def test_ignore_uses_intersection_over_detection_area():
    """Small boxes inside a large ignore region (IoU < 0.5) are all absorbed; a box mostly outside it
    (intersection 40% of its area) is a false positive."""
    ground_truth, ignore = [boxes(A)], [boxes([100.0, 0.0, 200.0, 100.0])]
    inside = [[110.0, 10.0, 130.0, 60.0], [150.0, 10.0, 170.0, 60.0]]
    mostly_outside = [[192.0, 10.0, 212.0, 60.0]]
    absorbed = [dets((inside[0], 0.95), (inside[1], 0.94), (A, 0.9))]
    assert log_average_miss_rate(absorbed, ground_truth, ignore=ignore) == pytest.approx(1e-10)
    assert average_precision_50(absorbed, ground_truth, ignore=ignore) == pytest.approx(1.0)
    not_absorbed = [dets((mostly_outside[0], 0.95), (A, 0.9))]
    assert log_average_miss_rate(not_absorbed, ground_truth, ignore=ignore) == pytest.approx(1e-10 ** (1 / 9))
    assert average_precision_50(not_absorbed, ground_truth, ignore=ignore) == pytest.approx(0.5, abs=1e-6)


def test_scored_box_takes_precedence_over_ignore_region():
    """A detection on a considered person that also lies in an ignore region is a true positive."""
    ground_truth, ignore = [boxes(A)], [boxes([0.0, 0.0, 40.0, 100.0])]
    fppi, miss_rate = miss_rate_curve([dets((A, 0.9))], ground_truth, ignore=ignore)
    np.testing.assert_allclose(miss_rate, [1, 0])


def test_input_checks():
    with pytest.raises(ValueError, match="frames"):
        log_average_miss_rate([dets()], GT)
    with pytest.raises(ValueError, match="ignore"):
        average_precision_50([dets()] * 3, GT, ignore=[boxes()])
    with pytest.raises(ValueError, match="without ground-truth"):
        log_average_miss_rate([dets((A, 0.5))], [boxes()])
    with pytest.raises(ValueError, match="without ground-truth"):
        average_precision_50([dets((A, 0.5))], [boxes()])


def test_agreement_identical_and_disjoint():
    run = [dets((A, 0.9), (B, 0.8)), dets((C, 0.7))]
    same = detection_agreement(run, run)
    assert (same.f1, same.precision, same.recall, same.matched) == (1.0, 1.0, 1.0, 3)
    disjoint = detection_agreement([dets((FAR, 0.9)), dets((FAR2, 0.9))], run)
    assert (disjoint.f1, disjoint.precision, disjoint.recall) == (0.0, 0.0, 0.0)
    empty = detection_agreement([dets(), dets()], [dets(), dets()])
    assert (empty.f1, empty.precision, empty.recall) == (1.0, 1.0, 1.0)


def test_agreement_hand_computed_with_score_threshold():
    """Kept candidates A, B, FAR (C is below 0.5) vs kept reference A, B: 2 matched of 3 and 2, so
    precision 2/3, recall 1 and F1 = 2 * 2 / (3 + 2) = 0.8. Without a threshold, C is kept on both
    sides but in different frames: still 2 matched, of 4 and 3, so F1 = 4/7."""
    candidate = [dets((A, 0.9), (FAR, 0.6)), dets((B, 0.55), (C, 0.4))]
    reference = [dets((A, 0.8), (C, 0.1)), dets((B, 0.95))]
    agreement = detection_agreement(candidate, reference)
    assert (agreement.matched, agreement.num_candidate, agreement.num_reference) == (2, 3, 2)
    assert agreement.precision == pytest.approx(2 / 3)
    assert agreement.recall == 1.0
    assert agreement.f1 == pytest.approx(0.8)
    assert detection_agreement(candidate, reference, score_threshold=0.0).f1 == pytest.approx(4 / 7)
