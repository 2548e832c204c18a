"""The CityPersons log-average miss rate, computed as the benchmark's official evaluation script does.

Ground truth is the CityPersons COCO-style json (or its loaded dict): ``images`` (each with an ``id``) and
``annotations``, each with ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` in pixels, ``height``
(pixels), ``vis_ratio`` (visible fraction of the box) and optionally ``ignore`` (default 0) and ``id``.
Detections are in COCO result format (a json path or a list): ``image_id``, ``category_id``, ``bbox``
``[x, y, w, h]``, ``score``. Only category 1 (pedestrian) is scored, on both sides.

The rules, per setup (a height range in pixels and a visibility range, both closed):

1. A ground-truth box flagged ``ignore``, or whose ``height`` or ``vis_ratio`` lies outside the setup's
   ranges, is ignored: missing it costs nothing.
2. Per image, detections are sorted by descending score (ties keep their order in the detection list)
   and cut to the first 1000; then only those whose height ``h = bbox[3]`` satisfies
   ``h_min / 1.25 <= h < h_max * 1.25`` are kept.
3. Boxes span ``[x, x + w] x [y, y + h]`` (no +1 pixel). Each detection in turn takes the unmatched,
   not ignored ground-truth box of highest IoU if that IoU is ``>= 0.5``; among equal IoUs the box
   latest in the annotation list wins. A detection with no such box is dropped when its intersection
   with some ignored box covers ``>= 0.5`` of the detection's own area (ignored boxes can absorb any
   number of detections); otherwise it is a false positive.
4. Over all images, the kept detections are sorted by descending score (ties: ascending image id, then
   the per-image order) and each prefix is an operating point: ``FPPI = FP / num_images`` (every image
   of the ground truth counts) and ``recall = TP / num_scored_boxes``.
5. At each reference FPPI (:data:`FPPI_POINTS`) the recall of the last operating point with
   ``FPPI <= reference`` is read, clipped to at most ``1 - 1e-6``; the result is
   ``exp(mean(log(1 - recall)))``.

Quirks of the official script reproduced on purpose:

* the reference FPPIs are the 4-decimal values 0.0100, 0.0178, ... rather than ``10 ** -1.75`` etc.;
* when no operating point has ``FPPI <= reference`` (the top-scoring counted detection is a false
  positive and ``1 / num_images`` exceeds the reference, so only with fewer than 100 images), the
  official code indexes its recall list with -1 and so reads the *final* recall, not 0;
* a detection matched to a ground-truth box whose annotation ``id`` is 0 counts as a false positive,
  although it still uses up that box;
* a perfect detector scores ``1 - (1 - 1e-6)``, about 1e-6, not 0.

Where the official script would crash or print -1 this module defines the result instead: a setup with
no scored ground-truth box gives ``nan``; a setup with scored boxes but no counted detection gives 1.

The PETS09 miss rate of :mod:`.detection` follows different rules (log-spaced FPPI values, a 1e-10 floor,
tied scores as one operating point, first box on equal IoU), so only the category id is shared.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .detection import PERSON_CATEGORY_ID

GroundTruth = str | os.PathLike | Mapping[str, Any]
DetectionResults = str | os.PathLike | Sequence[Mapping[str, Any]]

UNBOUNDED = 1e10
"""The official script's open upper end of a range (``1e5 ** 2``); it also bounds detection heights."""

FPPI_POINTS = np.array([0.0100, 0.0178, 0.0316, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.0000])
"""The 9 false-positives-per-image values at which the miss rate is sampled (4-decimal, as official)."""

IOU_THRESHOLD = 0.5
MAX_DETECTIONS_PER_IMAGE = 1000
DETECTION_HEIGHT_MARGIN = 1.25
"""Detections count if ``h_min / 1.25 <= height < h_max * 1.25``: slightly wider than the scored range."""

MAX_RECALL = 1 - 1e-6
"""Recall samples are clipped to this, so the miss rate is never 0 and has a logarithm."""


@dataclass(frozen=True)
class CityPersonsSetup:
    """Which ground-truth boxes a setup scores: ``height`` (pixels) and ``visibility`` (fraction)
    ranges ``(low, high)``, both ends included."""

    height: tuple[float, float]
    visibility: tuple[float, float]


CITYPERSONS_SETUPS: dict[str, CityPersonsSetup] = {
    "Reasonable": CityPersonsSetup(height=(50, UNBOUNDED), visibility=(0.65, UNBOUNDED)),
    "Reasonable_small": CityPersonsSetup(height=(50, 75), visibility=(0.65, UNBOUNDED)),
    "Heavy": CityPersonsSetup(height=(50, UNBOUNDED), visibility=(0.2, 0.65)),
    "All": CityPersonsSetup(height=(20, UNBOUNDED), visibility=(0.2, UNBOUNDED)),
    "Bare": CityPersonsSetup(height=(50, UNBOUNDED), visibility=(0.9, UNBOUNDED)),
    "Partial": CityPersonsSetup(height=(50, UNBOUNDED), visibility=(0.65, 0.9)),
}
"""The official setups (Heavy is the official "Reasonable_occ=heavy"; Bare and Partial come from the
script's alternative visibility split)."""


def citypersons_miss_rates(ground_truth: GroundTruth, detections: DetectionResults,
                           setups: Sequence[str] | Mapping[str, CityPersonsSetup] | None = None,
                           ) -> dict[str, float]:
    """Log-average miss rate of ``detections`` per CityPersons setup (lower is better).

    Args:
        ground_truth: path of the CityPersons annotation json, or its loaded dict (module docstring).
        detections: path of a COCO result json, or its list of dicts; may be empty.
        setups: names from :data:`CITYPERSONS_SETUPS` (default: all six, in that order), or a mapping
            from name to a custom :class:`CityPersonsSetup`.

    Returns:
        ``{setup name: miss rate}``, each a fraction in (0, 1] (not a percentage), or ``nan`` for a
        setup in which no ground-truth box is scored.

    Raises:
        ValueError: malformed input (a missing field, a bbox not of 4 finite numbers, a non-finite
            score, height or visibility, a duplicate image id, an image id that is not in the ground
            truth's images) or an unknown setup name.
        TypeError: the ground truth is not a dict, the detections not a list, or an entry not a dict.
    """
    chosen = _resolve_setups(setups)
    image_ids, ground_truth_boxes = _parse_ground_truth(_load_json(ground_truth))
    per_image_detections = _parse_detections(_load_json(detections), set(image_ids))
    images = [_Image.build(ground_truth_boxes.get(image_id, []), per_image_detections.get(image_id, []))
              for image_id in image_ids]
    return {name: _setup_miss_rate(images, setup) for name, setup in chosen.items()}


def _resolve_setups(setups: Sequence[str] | Mapping[str, CityPersonsSetup] | None,
                    ) -> dict[str, CityPersonsSetup]:
    """The ``setups`` argument -> ``{name: setup}`` in the order given."""
    if setups is None:
        return dict(CITYPERSONS_SETUPS)
    if isinstance(setups, Mapping):
        return dict(setups)
    if isinstance(setups, str):
        setups = [setups]
    unknown = [name for name in setups if name not in CITYPERSONS_SETUPS]
    if unknown:
        raise ValueError(f"unknown CityPersons setup(s) {unknown}; known: {list(CITYPERSONS_SETUPS)}")
    return {name: CITYPERSONS_SETUPS[name] for name in setups}


def _load_json(source: Any) -> Any:
    if isinstance(source, (str, os.PathLike)):
        with open(source) as file:
            return json.load(file)
    return source


def _field(record: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(record, Mapping):
        raise TypeError(f"{where} is a {type(record).__name__}, not a dict")
    if key not in record:
        raise ValueError(f"{where} has no '{key}' field")
    return record[key]


def _finite(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} is {value!r}, not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{where} is {number}, not finite")
    return number


def _bbox(record: Mapping[str, Any], where: str) -> list[float]:
    bbox = _field(record, "bbox", where)
    if not isinstance(bbox, (list, tuple, np.ndarray)) or len(bbox) != 4:
        raise ValueError(f"{where}: bbox must be [x, y, w, h] (4 numbers), got {bbox!r}")
    return [_finite(value, f"{where}: bbox value") for value in bbox]


def _parse_ground_truth(dataset: Any) -> tuple[list, dict[Any, list[tuple]]]:
    """-> sorted image ids, and per image id its category-1 boxes in annotation order as tuples
    ``(bbox, height, vis_ratio, ignore, annotation id is not 0)``."""
    if not isinstance(dataset, Mapping):
        raise TypeError(f"ground truth must be a dict (or a json path), got a {type(dataset).__name__}")
    images = _field(dataset, "images", "ground truth")
    annotations = _field(dataset, "annotations", "ground truth")
    image_ids = [_field(image, "id", f"ground-truth image {index}") for index, image in enumerate(images)]
    if not image_ids:
        raise ValueError("ground truth has no images")
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("ground truth lists an image id more than once")
    known = set(image_ids)
    boxes: dict[Any, list[tuple]] = {}
    for index, annotation in enumerate(annotations):
        where = f"ground-truth annotation {index}"
        image_id = _field(annotation, "image_id", where)
        if image_id not in known:
            raise ValueError(f"{where} refers to image id {image_id!r}, which is not in the images")
        if _field(annotation, "category_id", where) != PERSON_CATEGORY_ID:
            continue
        boxes.setdefault(image_id, []).append((
            _bbox(annotation, where),
            _finite(_field(annotation, "height", where), f"{where}: height"),
            _finite(_field(annotation, "vis_ratio", where), f"{where}: vis_ratio"),
            bool(annotation.get("ignore", 0)),
            annotation.get("id") != 0))
    return sorted(image_ids), boxes


def _parse_detections(results: Any, known_image_ids: set) -> dict[Any, list[tuple[list[float], float]]]:
    """-> per image id its category-1 detections ``(bbox, score)`` in list order."""
    if isinstance(results, Mapping) or not isinstance(results, Sequence):
        raise TypeError(f"detections must be a list of dicts (or a json path), got a {type(results).__name__}")
    per_image: dict[Any, list[tuple[list[float], float]]] = {}
    for index, detection in enumerate(results):
        where = f"detection {index}"
        image_id = _field(detection, "image_id", where)
        if image_id not in known_image_ids:
            raise ValueError(f"{where} refers to image id {image_id!r}, which is not in the ground truth")
        category = _field(detection, "category_id", where)
        bbox = _bbox(detection, where)
        score = _finite(_field(detection, "score", where), f"{where}: score")
        if category == PERSON_CATEGORY_ID:
            per_image.setdefault(image_id, []).append((bbox, score))
    return per_image


@dataclass(frozen=True)
class _Image:
    """One image's setup-independent data. G ground-truth boxes in annotation order; D detections by
    descending score, at most MAX_DETECTIONS_PER_IMAGE."""

    gt_heights: np.ndarray       # (G,) the annotated heights (not bbox heights): they decide ignoring
    gt_visibility: np.ndarray    # (G,)
    gt_ignore: np.ndarray        # (G,) bool, the annotation's own ignore flag
    gt_counts_as_hit: np.ndarray  # (G,) bool, False for annotation id 0 (official quirk)
    scores: np.ndarray           # (D,) float64
    det_heights: np.ndarray      # (D,) bbox heights
    iou: np.ndarray              # (D, G) intersection over union
    ioa: np.ndarray              # (D, G) intersection over the detection's area

    @staticmethod
    def build(ground_truth: list[tuple], detections: list[tuple[list[float], float]]) -> _Image:
        scores = np.array([score for _, score in detections], dtype=np.float64)
        order = np.argsort(-scores, kind="stable")[:MAX_DETECTIONS_PER_IMAGE]
        det_boxes = np.array([bbox for bbox, _ in detections], dtype=np.float64).reshape(-1, 4)[order]
        gt_boxes = np.array([box[0] for box in ground_truth], dtype=np.float64).reshape(-1, 4)
        iou, ioa = _overlaps(det_boxes, gt_boxes)
        return _Image(
            gt_heights=np.array([box[1] for box in ground_truth], dtype=np.float64),
            gt_visibility=np.array([box[2] for box in ground_truth], dtype=np.float64),
            gt_ignore=np.array([box[3] for box in ground_truth], dtype=bool),
            gt_counts_as_hit=np.array([box[4] for box in ground_truth], dtype=bool),
            scores=scores[order], det_heights=det_boxes[:, 3], iou=iou, ioa=ioa)


def _overlaps(detections: np.ndarray, ground_truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """xywh boxes (D, 4) and (G, 4) -> IoU (D, G) and intersection over detection area (D, G).

    The arithmetic is done in the official order (``x + w`` ends, union ``det + gt - inter``), so the
    values agree bit for bit and IoUs sitting exactly on 0.5 are decided the same way.
    """
    dx, dy, dw, dh = (detections[:, i, None] for i in range(4))
    gx, gy, gw, gh = (ground_truth[None, :, i] for i in range(4))
    inter_w = np.minimum(dx + dw, gx + gw) - np.maximum(dx, gx)
    inter_h = np.minimum(dy + dh, gy + gh) - np.maximum(dy, gy)
    overlapping = (inter_w > 0) & (inter_h > 0)
    inter = inter_w * inter_h
    det_area = dw * dh
    union = det_area + gw * gh - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=overlapping)
    ioa = np.divide(inter, np.broadcast_to(det_area, inter.shape), out=np.zeros_like(inter), where=overlapping)
    return iou, ioa


def _in_range(values: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    return (values >= bounds[0]) & (values <= bounds[1])


def _match_image(image: _Image, setup: CityPersonsSetup) -> tuple[np.ndarray, np.ndarray, int]:
    """One image under one setup -> scores (K,) and true-positive flags (K,) of the counted detections
    (by descending score), and the number of scored ground-truth boxes."""
    ignored = image.gt_ignore | ~_in_range(image.gt_heights, setup.height) \
        | ~_in_range(image.gt_visibility, setup.visibility)
    kept = (image.det_heights >= setup.height[0] / DETECTION_HEIGHT_MARGIN) \
        & (image.det_heights < setup.height[1] * DETECTION_HEIGHT_MARGIN)
    scored = np.flatnonzero(~ignored)
    iou = image.iou[kept][:, scored]
    absorbed = (image.ioa[kept][:, ignored] >= IOU_THRESHOLD).any(axis=1)
    is_tp = np.zeros(len(iou), dtype=bool)
    is_counted = np.ones(len(iou), dtype=bool)
    taken = np.zeros(len(scored), dtype=bool)
    can_match = iou.max(axis=1, initial=-np.inf) >= IOU_THRESHOLD
    for k in range(len(iou)):
        available = np.where(taken, -np.inf, iou[k]) if can_match[k] else None
        best = available.max() if available is not None else -np.inf
        if best >= IOU_THRESHOLD:
            # the official loop replaces its candidate on ">=", so the last box of the highest IoU wins
            j = len(available) - 1 - int(np.argmax(available[::-1] == best))
            taken[j] = True
            is_tp[k] = image.gt_counts_as_hit[scored[j]]
        elif absorbed[k]:
            is_counted[k] = False
    return image.scores[kept][is_counted], is_tp[is_counted], len(scored)


def _setup_miss_rate(images: list[_Image], setup: CityPersonsSetup) -> float:
    """All images (ascending id) under one setup -> log-average miss rate, or nan without scored boxes."""
    matched = [_match_image(image, setup) for image in images]
    num_scored = sum(count for _, _, count in matched)
    if num_scored == 0:
        return math.nan
    scores = np.concatenate([np.zeros(0)] + [image_scores for image_scores, _, _ in matched])
    is_tp = np.concatenate([np.zeros(0, dtype=bool)] + [image_tp for _, image_tp, _ in matched])
    # images are concatenated in ascending id order, so a stable sort breaks score ties like the official
    is_tp = is_tp[np.argsort(-scores, kind="stable")]
    if len(is_tp) == 0:
        recall_samples = np.zeros(len(FPPI_POINTS))
    else:
        fppi = np.cumsum(~is_tp).astype(np.float64) / len(images)
        recall = np.cumsum(is_tp).astype(np.float64) / num_scored
        # index -1 (no operating point within the reference FPPI) reads the final recall: official quirk
        recall_samples = recall[np.searchsorted(fppi, FPPI_POINTS, side="right") - 1]
    miss_rates = 1 - np.clip(recall_samples, 0, MAX_RECALL)
    return float(np.exp(np.mean(np.log(miss_rates))))
