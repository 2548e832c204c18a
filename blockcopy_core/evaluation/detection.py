"""Person-detection metrics over a sequence of frames.

Shared input format, one entry per frame and all lists of the same length:

* ``detections``: ``{"boxes": (K, 4) float x1y1x2y2 tensor, "scores": (K,) tensor}`` per frame, already
  restricted to the person class.
* ``ground_truth``: (M, 4) x1y1x2y2 tensor per frame (the scored boxes).
* ``ignore`` (optional): (G, 4) x1y1x2y2 tensor per frame of ignore regions, e.g. MOTChallenge boxes
  marked not-considered. A detection that matches no scored box but covers an ignore region counts
  neither as a true nor as a false positive.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_area, box_iou

Detections = Sequence[dict[str, torch.Tensor]]
Boxes = Sequence[torch.Tensor]

MR_FPPI_POINTS = np.logspace(-2.0, 0.0, 9)
"""The 9 FPPI values at which the log-average miss rate samples the curve: 10^-2, 10^-1.75, ..., 10^0."""

MR_FLOOR = 1e-10
"""Miss rates are clamped to at least this before taking logs (a zero miss rate has no logarithm)."""

PERSON_CATEGORY_ID = 1


def miss_rate_curve(detections: Detections, ground_truth: Boxes, iou_threshold: float = 0.5,
                    ignore: Boxes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Miss rate against false positives per image, over all score thresholds.

    Per frame, detections are taken by descending score and each is matched to the not yet matched
    ground-truth box with which it has the highest IoU, if that IoU is ``>= iou_threshold``
    (``torchvision.ops.box_iou``): a true positive. An unmatched detection whose intersection with an
    ignore region covers ``>= iou_threshold`` of the detection's own area is dropped; any other
    unmatched detection is a false positive. Ignore regions can absorb any number of detections.

    Over the whole sequence, the kept detections are sorted by descending score. Keeping those with
    score ``>= s`` gives the operating point ``FPPI = FP(s) / num_frames``,
    ``MR = 1 - TP(s) / num_ground_truth``; one point is made per distinct score, so tied detections
    enter together. The curve starts at ``(0, 1)``: no detection kept.

    Returns:
        ``(fppi, miss_rate)``, float64 arrays of the same length (>= 1), FPPI non-decreasing and miss
        rate non-increasing.

    Raises:
        ValueError: the lists differ in length, or there is no ground-truth box.
    """
    ignore = _check_inputs(detections, ground_truth, ignore)
    num_ground_truth = sum(len(boxes) for boxes in ground_truth)
    if num_ground_truth == 0:
        raise ValueError("miss rate is undefined without ground-truth boxes")
    outcomes = [_frame_outcomes(det, gt, ign, iou_threshold)
                for det, gt, ign in zip(detections, ground_truth, ignore)]
    scores = np.concatenate([np.zeros(0)] + [frame_scores for frame_scores, _ in outcomes])
    is_tp = np.concatenate([np.zeros(0, dtype=bool)] + [frame_tp for _, frame_tp in outcomes])
    order = np.argsort(-scores, kind="stable")
    scores, is_tp = scores[order], is_tp[order]
    last_of_tie = np.append(scores[1:] != scores[:-1], True) if len(scores) else np.zeros(0, bool)
    tp = np.cumsum(is_tp)[last_of_tie]
    fp = np.cumsum(~is_tp)[last_of_tie]
    fppi = np.concatenate([[0.0], fp / len(ground_truth)])
    miss_rate = np.concatenate([[1.0], 1.0 - tp / num_ground_truth])
    return fppi, miss_rate


def log_average_miss_rate(detections: Detections, ground_truth: Boxes, iou_threshold: float = 0.5,
                          ignore: Boxes | None = None) -> float:
    """The Caltech / CityPersons log-average miss rate (lower is better), in [MR_FLOOR, 1].

    Definition implemented, on the curve of :func:`miss_rate_curve`:

    1. For each of the 9 reference values ``f = 10^-2, 10^-1.75, ..., 10^0`` (``MR_FPPI_POINTS``), take
       the miss rate of the last operating point with ``FPPI <= f`` (the lowest miss rate reachable
       with at most ``f`` false positives per image). Because the curve starts at ``(0, 1)``, a
       reference below the curve's first FPPI gets miss rate 1; a reference beyond the curve's last
       FPPI gets the curve's final (lowest) miss rate.
    2. Clamp each sample to ``>= MR_FLOOR`` and return their geometric mean,
       ``exp(mean(log(max(MR_i, 1e-10))))``.

    Perfect detections therefore give ``1e-10`` (0.00 %), and no detections give 1 (100 %).
    All ground-truth boxes count (no height or visibility filtering, unlike Caltech's "reasonable"
    subset).
    """
    fppi, miss_rate = miss_rate_curve(detections, ground_truth, iou_threshold, ignore)
    last_within = np.searchsorted(fppi, MR_FPPI_POINTS, side="right") - 1
    samples = np.maximum(miss_rate[last_within], MR_FLOOR)
    return float(np.exp(np.mean(np.log(samples))))


def average_precision_50(detections: Detections, ground_truth: Boxes, ignore: Boxes | None = None,
                         max_detections: int = 100) -> float:
    """COCO-style average precision at IoU 0.5 for one class, computed by ``pycocotools``.

    Frames become COCO images, ground-truth boxes annotations of category "person"; ignore regions are
    annotations with ``iscrowd=1``, which COCOeval matches by intersection over detection area and
    leaves out of both true and false positives. ``COCOeval`` runs with ``iouThrs=[0.5]``, one area
    range (all) and ``maxDets=[max_detections]`` per frame; the result is the mean of its 101-point
    interpolated precision, the quantity it reports as ``stats[1]`` (AP at IoU=.50).

    Raises:
        ValueError: the lists differ in length, or there is no ground-truth box.
    """
    ignore = _check_inputs(detections, ground_truth, ignore)
    if sum(len(boxes) for boxes in ground_truth) == 0:
        raise ValueError("average precision is undefined without ground-truth boxes")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = _coco_from_dataset(_coco_ground_truth(ground_truth, ignore))
        coco_dt = _coco_from_dataset(_coco_detections(detections))
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.iouThrs = np.array([0.5])
        evaluator.params.areaRng = [[0.0, float("inf")]]
        evaluator.params.areaRngLbl = ["all"]
        evaluator.params.maxDets = [max_detections]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][0, :, 0, 0, 0]
    return float(precision.mean())


@dataclass(frozen=True)
class Agreement:
    """How well a candidate detector reproduces a reference detector's confident boxes.

    Attributes:
        f1: ``2 * matched / (num_candidate + num_reference)``; 1 when both have no box.
        precision: ``matched / num_candidate``, the share of candidate boxes the reference also has.
        recall: ``matched / num_reference``, the share of reference boxes the candidate reproduces.
        matched, num_candidate, num_reference: box counts over all frames.
    """

    f1: float
    precision: float
    recall: float
    matched: int
    num_candidate: int
    num_reference: int


def detection_agreement(detections: Detections, reference_detections: Detections,
                        iou_threshold: float = 0.5, score_threshold: float = 0.5) -> Agreement:
    """Agreement between two detectors' outputs on the same frames, e.g. a sparse and a dense run.

    Both sides keep only boxes with ``score >= score_threshold``. Per frame, the kept candidate boxes
    are taken by descending score and greedily matched one-to-one to the kept reference box with the
    highest IoU, if ``>= iou_threshold`` (the same matching as :func:`miss_rate_curve`, with the
    reference as ground truth). Counts are summed over all frames before forming the ratios of
    :class:`Agreement`. When a side has no box at all, precision (no candidate box) or recall (no
    reference box) is 1 if the other side has none either, else 0.
    """
    if len(detections) != len(reference_detections):
        raise ValueError(f"{len(detections)} frames of detections but {len(reference_detections)} "
                         "of reference detections")
    matched = num_candidate = num_reference = 0
    for candidate, reference in zip(detections, reference_detections):
        boxes, _ = _sorted_by_score(candidate, score_threshold)
        reference_boxes, _ = _sorted_by_score(reference, score_threshold)
        matched += int((_greedy_match(boxes, reference_boxes, iou_threshold) >= 0).sum())
        num_candidate += len(boxes)
        num_reference += len(reference_boxes)
    total = num_candidate + num_reference
    return Agreement(
        f1=2 * matched / total if total else 1.0,
        precision=matched / num_candidate if num_candidate else float(num_reference == 0),
        recall=matched / num_reference if num_reference else float(num_candidate == 0),
        matched=matched, num_candidate=num_candidate, num_reference=num_reference)


def _check_inputs(detections: Detections, ground_truth: Boxes, ignore: Boxes | None) -> Boxes:
    """Check that the per-frame lists align; return ``ignore`` with empty regions when ``None``."""
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} frames of detections but {len(ground_truth)} of ground truth")
    if ignore is None:
        return [torch.zeros((0, 4))] * len(ground_truth)
    if len(ignore) != len(ground_truth):
        raise ValueError(f"{len(ignore)} frames of ignore regions but {len(ground_truth)} of ground truth")
    return ignore


def _as_boxes(boxes: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Any (K, 4) box array -> float32 CPU tensor (K, 4)."""
    return torch.as_tensor(boxes, dtype=torch.float32).detach().cpu().reshape(-1, 4)


def _sorted_by_score(detections: dict[str, torch.Tensor],
                     score_threshold: float | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """One frame's detections -> boxes (K, 4) and float64 scores (K,), by descending score.

    With ``score_threshold``, only detections with ``score >= score_threshold`` are kept.
    """
    boxes = _as_boxes(detections["boxes"])
    scores = torch.as_tensor(detections["scores"]).detach().cpu().double().reshape(-1).numpy()
    if len(scores) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores in one frame")
    order = np.argsort(-scores, kind="stable")
    if score_threshold is not None:
        order = order[scores[order] >= score_threshold]
    return boxes[torch.from_numpy(order)], scores[order]


def _greedy_match(boxes: torch.Tensor, targets: torch.Tensor, iou_threshold: float) -> np.ndarray:
    """Match score-sorted boxes (K, 4) one-to-one to targets (M, 4).

    Each box in turn takes the still unmatched target of highest IoU, if that IoU is
    ``>= iou_threshold``. Returns (K,) int64: the matched target's index, or -1.
    """
    matches = np.full(len(boxes), -1, dtype=np.int64)
    if len(boxes) == 0 or len(targets) == 0:
        return matches
    iou = box_iou(boxes, _as_boxes(targets)).numpy()
    taken = np.zeros(len(targets), dtype=bool)
    for k in np.flatnonzero(iou.max(axis=1) >= iou_threshold):
        available = np.where(taken, -1.0, iou[k])
        best = int(available.argmax())
        if available[best] >= iou_threshold:
            matches[k] = best
            taken[best] = True
    return matches


def _covers_ignore_region(boxes: torch.Tensor, regions: torch.Tensor, threshold: float) -> np.ndarray:
    """(K,) bool: intersection with some region (G, 4) is ``>= threshold`` of the box's own area."""
    regions = _as_boxes(regions)
    if len(boxes) == 0 or len(regions) == 0:
        return np.zeros(len(boxes), dtype=bool)
    top_left = torch.maximum(boxes[:, None, :2], regions[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], regions[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    area = box_area(boxes)[:, None]
    covered = (intersection >= threshold * area) & (area > 0)
    return covered.any(dim=1).numpy()


def _frame_outcomes(detections: dict[str, torch.Tensor], ground_truth: torch.Tensor,
                    ignore: torch.Tensor, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One frame -> scores (D,) and true-positive flags (D,) of its detections, ignored ones left out."""
    boxes, scores = _sorted_by_score(detections)
    is_tp = _greedy_match(boxes, ground_truth, iou_threshold) >= 0
    keep = is_tp | ~_covers_ignore_region(boxes, ignore, iou_threshold)
    return scores[keep], is_tp[keep]


def _xywh(boxes: torch.Tensor | np.ndarray) -> list[list[float]]:
    """(K, 4) x1y1x2y2 -> COCO ``[x, y, width, height]`` lists."""
    xyxy = _as_boxes(boxes).double().numpy()
    return np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1).tolist()


def _coco_images_and_categories(num_frames: int) -> dict[str, list]:
    """COCO ``images`` (ids 1..num_frames) and the single ``person`` category."""
    return {"images": [{"id": i + 1} for i in range(num_frames)],
            "categories": [{"id": PERSON_CATEGORY_ID, "name": "person"}]}


def _coco_ground_truth(ground_truth: Boxes, ignore: Boxes) -> dict[str, list]:
    """COCO ground-truth dataset: scored boxes with ``iscrowd=0``, ignore regions with ``iscrowd=1``."""
    annotations = []
    for image_id, (scored, regions) in enumerate(zip(ground_truth, ignore), start=1):
        for iscrowd, boxes in ((0, scored), (1, regions)):
            for x, y, w, h in _xywh(boxes):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": PERSON_CATEGORY_ID, "bbox": [x, y, w, h],
                                    "area": w * h, "iscrowd": iscrowd})
    return {**_coco_images_and_categories(len(ground_truth)), "annotations": annotations}


def _coco_detections(detections: Detections) -> dict[str, list]:
    """COCO result dataset: every detection as a scored ``person`` annotation."""
    annotations = []
    for image_id, frame in enumerate(detections, start=1):
        boxes, scores = _sorted_by_score(frame)
        for (x, y, w, h), score in zip(_xywh(boxes), scores.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": PERSON_CATEGORY_ID, "bbox": [x, y, w, h],
                                "area": w * h, "score": score})
    return {**_coco_images_and_categories(len(detections)), "annotations": annotations}


def _coco_from_dataset(dataset: dict[str, list]) -> COCO:
    """An in-memory ``COCO`` object (the constructor only reads from files)."""
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco
