"""CityPersons miss rates as an MMEngine metric, for detectors run on Cityscapes video clips."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from mmdet.registry import METRICS
from mmengine.evaluator import BaseMetric
from mmengine.fileio import load
from mmengine.logging import MMLogger

from blockcopy_core.evaluation.citypersons import CITYPERSONS_SETUPS, UNBOUNDED, citypersons_miss_rates
from blockcopy_core.evaluation.detection import PERSON_CATEGORY_ID

PERSON_LABEL = 0
"""The detector's label for a person (class 0 of CityPersons' single class, and of COCO)."""


@METRICS.register_module()
class CityPersonsMetric(BaseMetric):
    """Log-average miss rate per CityPersons setup (:func:`citypersons_miss_rates`), lower is better.

    Each data sample (a dict, as MMEngine passes them, or a ``DetDataSample``) must carry ``img_id``, the
    CityPersons image id of its clip's annotated frame, and ``annotated``, True only on that frame; other
    frames are not scored. ``pred_instances`` holds ``bboxes`` (K, 4) x1y1x2y2 in original-image pixels,
    ``scores`` (K,) and ``labels`` (K,); only label 0 (person) is scored.

    Only the images that were scored count: the ground truth is restricted to them (a warning names how
    many images of ``ann_file`` were left out), so evaluating a subset of the clips gives that subset's
    miss rate. The result is ``{"MR_<setup>": miss rate}`` with fractions in (0, 1], not percentages, and
    ``nan`` for a setup without scored ground truth. It does not depend on the order in which samples
    (or ranks) deliver their results.

    Args:
        ann_file: the CityPersons annotation json (e.g. ``val_gt.json``).
        setups: setup names from ``CITYPERSONS_SETUPS``; default all six.
        outfile_prefix: when set, the scored detections are also written to
            ``<outfile_prefix>.bbox.json`` in COCO result format.
        collect_device, prefix: as for :class:`mmengine.evaluator.BaseMetric`.
    """

    default_prefix = "citypersons"

    def __init__(self, ann_file: str, setups: Sequence[str] | None = None, outfile_prefix: str | None = None,
                 collect_device: str = "cpu", prefix: str | None = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.setups = list(CITYPERSONS_SETUPS) if setups is None else list(setups)
        unknown = [name for name in self.setups if name not in CITYPERSONS_SETUPS]
        if unknown:
            raise ValueError(f"unknown CityPersons setup(s) {unknown}; known: {list(CITYPERSONS_SETUPS)}")
        self.ground_truth = load(ann_file)
        missing = [key for key in ("images", "annotations") if key not in self.ground_truth]
        if missing:
            raise ValueError(f"{ann_file} is not a CityPersons annotation file: it has no {missing}")
        self.outfile_prefix = outfile_prefix

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """Keep one record per sample; a non-annotated frame's record has no predictions.

        Every sample leaves a record (never ``None``, which result collection would drop) so that the
        number of results matches the dataset size that MMEngine uses to cut sampler padding.
        """
        for sample in data_samples:
            if hasattr(sample, "to_dict"):
                sample = sample.to_dict()
            for key in ("img_id", "annotated"):
                if key not in sample:
                    raise KeyError(f"CityPersonsMetric needs '{key}' in every data sample's metainfo")
            if not sample["annotated"]:
                self.results.append({"annotated": False})
                continue
            pred = sample["pred_instances"]
            self.results.append({
                "annotated": True,
                "img_id": sample["img_id"],
                "bboxes": _numpy(pred["bboxes"]).reshape(-1, 4),
                "scores": _numpy(pred["scores"]).reshape(-1),
                "labels": _numpy(pred["labels"]).reshape(-1),
            })

    def compute_metrics(self, results: list) -> dict[str, float]:
        """Results of all ranks -> ``{"MR_<setup>": miss rate as a fraction}``."""
        scored = _unique_by_image([result for result in results if result["annotated"]])
        ground_truth = self._restricted_ground_truth(set(scored))
        detections = [detection for image_id in sorted(scored) for detection in _coco_results(scored[image_id])]
        if self.outfile_prefix is not None:
            _dump(detections, f"{self.outfile_prefix}.bbox.json")
        miss_rates = citypersons_miss_rates(ground_truth, detections, self.setups)
        MMLogger.get_current_instance().info(_table(miss_rates, len(scored)))
        return {f"MR_{name}": value for name, value in miss_rates.items()}

    def _restricted_ground_truth(self, image_ids: set) -> dict[str, Any]:
        images = self.ground_truth["images"]
        known = {image["id"] for image in images}
        unknown = sorted(image_ids - known)
        if unknown:
            raise ValueError(f"data samples have img_id(s) {unknown[:10]} that are not in the annotation file")
        left_out = len(known) - len(image_ids)
        if left_out:
            MMLogger.get_current_instance().warning(
                f"CityPersonsMetric: {left_out} of the {len(known)} annotated images were not evaluated; "
                "the miss rates cover the remaining ones only")
        return {"images": [image for image in images if image["id"] in image_ids],
                "annotations": [annotation for annotation in self.ground_truth["annotations"]
                                if annotation["image_id"] in image_ids]}


def _numpy(values: Any) -> np.ndarray:
    """A tensor or array -> numpy array on the CPU."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _unique_by_image(records: list[dict]) -> dict[Any, dict]:
    """Records keyed by image id. A frame delivered twice (sampler padding repeats samples) is kept once
    if both copies agree; copies that disagree would make the result depend on which arrives first."""
    by_image: dict[Any, dict] = {}
    for record in records:
        image_id = record["img_id"]
        previous = by_image.setdefault(image_id, record)
        if previous is not record and not all(
                np.array_equal(previous[key], record[key]) for key in ("bboxes", "scores", "labels")):
            raise ValueError(f"image {image_id!r} was scored twice with different predictions; each clip's "
                             "annotated frame must be evaluated once")
    return by_image


def _coco_results(record: dict) -> list[dict]:
    """One image's person predictions -> COCO result dicts (``bbox`` ``[x, y, w, h]``), in model order,
    which decides ties in score as in the official evaluation."""
    people = record["labels"] == PERSON_LABEL
    boxes = record["bboxes"][people].astype(np.float64)
    scores = record["scores"][people].astype(np.float64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    return [{"image_id": record["img_id"], "category_id": PERSON_CATEGORY_ID, "bbox": box, "score": score}
            for box, score in zip(xywh.tolist(), scores.tolist())]


def _dump(detections: list[dict], path: str) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as file:
        json.dump(detections, file, default=_json_scalar)


def _json_scalar(value: Any) -> Any:
    """numpy scalars (e.g. an ``img_id`` read as ``np.int64``) -> Python numbers for json."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _table(miss_rates: dict[str, float], num_images: int) -> str:
    """Miss rates as a small text table, in percent as papers report them."""
    lines = [f"CityPersons log-average miss rate on {num_images} images",
             f"{'setup':<18} {'height':>12} {'visibility':>12} {'MR (%)':>8}"]
    for name, value in miss_rates.items():
        setup = CITYPERSONS_SETUPS[name]
        lines.append(f"{name:<18} {_range(setup.height, '{:.0f}'):>12} {_range(setup.visibility, '{:.2f}'):>12} "
                     f"{'n/a' if math.isnan(value) else f'{100 * value:.2f}':>8}")
    return "\n".join(lines)


def _range(bounds: tuple[float, float], number: str) -> str:
    low, high = bounds
    return f"[{number.format(low)}, {'inf' if high >= UNBOUNDED else number.format(high)}]"
