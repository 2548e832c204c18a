"""The CityPersons miss rate on hand-computed cases, and its MMEngine metric.

Expected values are built from the 9 recall samples read at FPPI 0.0100, 0.0178, 0.0316, 0.0562, 0.1000,
0.1778, 0.3162, 0.5623 and 1.0000: each sample is the recall of the last operating point (a prefix of the
counted detections by descending score) whose FPPI = FP / images is <= the reference value.
"""
import json
import math
import random

import numpy as np
import pytest
import torch

from blockcopy_core.evaluation import CITYPERSONS_SETUPS, CityPersonsSetup, citypersons_miss_rates

FULL = 1 - (1 - 1e-6)
"""Miss rate of a sample with recall 1: the official evaluation clips recall to 1 - 1e-6."""


def log_average(recalls):
    """Log-average miss rate from the 9 recall samples."""
    assert len(recalls) == 9
    return math.exp(sum(math.log(1 - min(recall, 1 - 1e-6)) for recall in recalls) / 9)


def gt(image_id, bbox, vis=1.0, **extra):
    """A category-1 ground-truth annotation whose height is its bbox height."""
    return {"image_id": image_id, "category_id": 1, "bbox": bbox, "height": bbox[3], "vis_ratio": vis,
            "ignore": 0, **extra}


def dataset(num_images, *annotations):
    """Ground truth with images 1..num_images; annotation ids 1, 2, ... unless given."""
    return {"images": [{"id": i, "height": 1024, "width": 2048} for i in range(1, num_images + 1)],
            "annotations": [{"id": index + 1, **annotation} for index, annotation in enumerate(annotations)],
            "categories": [{"id": 1, "name": "pedestrian"}]}


def det(image_id, bbox, score, category_id=1):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def far(index, height=100.0):
    """A box in image row 600+ that overlaps no other box of these tests."""
    return [1000.0 + 50 * index, 600.0, 40.0, height]


# Three scored pedestrians, 100 px tall, side by side (pairwise IoU 0).
G1, G2, G3 = [0.0, 0.0, 40.0, 100.0], [60.0, 0.0, 40.0, 100.0], [120.0, 0.0, 40.0, 100.0]

# TP at FPPI 0, one FP at 1 / 50 = 0.02, then a second TP, with 3 scored boxes: the samples at 0.0100 and
# 0.0178 see only the first TP, the 7 from 0.0316 on both TPs.
ONE_FP_BETWEEN_TPS = log_average([1 / 3] * 2 + [2 / 3] * 7)


# ------------------------------------------------------------------------------------------------------------
# The core function


def test_perfect_detections_and_setups_without_scored_boxes():
    """One fully visible 100 px pedestrian found exactly: recall 1 at every sample, clipped -> FULL. It is too
    tall for Reasonable_small and too visible for Heavy and Partial, which score nothing -> nan."""
    result = citypersons_miss_rates(dataset(2, gt(1, G1)), [det(1, G1, 0.9)])
    assert list(result) == list(CITYPERSONS_SETUPS)
    for name in ("Reasonable", "All", "Bare"):
        assert result[name] == pytest.approx(FULL, rel=1e-9)
    for name in ("Reasonable_small", "Heavy", "Partial"):
        assert math.isnan(result[name])


def test_no_detections():
    """No detection: recall 0 at every sample -> miss rate exactly 1."""
    assert citypersons_miss_rates(dataset(3, gt(1, G1), gt(2, G2)), [], ["Reasonable"]) == {"Reasonable": 1.0}


# Ground-truth boxes (height, vis_ratio) around each setup's limits, and the setups that score them.
RANGE_BOXES = [
    ((50, 0.65), {"Reasonable", "Reasonable_small", "Heavy", "All", "Partial"}),  # both lower ends included
    ((49.9, 1.0), {"All"}),
    ((75, 0.9), {"Reasonable", "Reasonable_small", "All", "Bare", "Partial"}),  # 75 and 0.9 included
    ((75.1, 0.2), {"Heavy", "All"}),
    ((20, 0.19), set()),
    ((20, 0.2), {"All"}),
    ((1000, 0.64), {"Heavy", "All"}),
    ((60, 0.95), {"Reasonable", "Reasonable_small", "All", "Bare"}),
    ((76, 1.0), {"Reasonable", "All", "Bare"}),
]
PROBES = {"Reasonable": (100, 1.0), "Reasonable_small": (60, 1.0), "Heavy": (100, 0.5), "All": (30, 0.3),
          "Bare": (100, 0.95), "Partial": (100, 0.8)}


@pytest.mark.parametrize("setup", list(CITYPERSONS_SETUPS))
def test_setup_height_and_visibility_ranges(setup):
    """Undetected boxes at the range limits plus one detected probe box that the setup scores. With n scored
    boxes, recall is 1 / n at every sample (no false positive) -> miss rate 1 - 1 / n. The flagged box
    (ignore=1) is in range for every setup but never scored."""
    annotations = [gt(1, [100.0 * i, 0.0, 40.0, height], vis) for i, ((height, vis), _) in enumerate(RANGE_BOXES)]
    annotations.append(gt(1, [2000.0, 0.0, 40.0, 100.0], 0.8, ignore=1))
    probe_height, probe_vis = PROBES[setup]
    probe = [1500.0, 0.0, 40.0, probe_height]
    annotations.append(gt(1, probe, probe_vis))
    scored = 1 + sum(setup in setups for _, setups in RANGE_BOXES)
    result = citypersons_miss_rates(dataset(1, *annotations), [det(1, probe, 0.9)], [setup])
    assert result[setup] == pytest.approx(1 - 1 / scored, rel=1e-12)


def test_missing_ignore_field_means_scored():
    """G2 has no ignore field: it is scored, so finding only G1 gives recall 1/2 -> miss rate 1/2."""
    second = gt(1, G2)
    del second["ignore"]
    result = citypersons_miss_rates(dataset(1, gt(1, G1), second), [det(1, G1, 0.9)], ["Reasonable"])
    assert result["Reasonable"] == pytest.approx(0.5, rel=1e-12)


def test_height_field_not_bbox_decides_the_setup():
    """The box is 80 px tall (outside [50, 75]) but annotated height 60: scored in Reasonable_small, and
    found by an exact detection (80 px passes that setup's detection filter [40, 93.75)) -> FULL."""
    box = [0.0, 0.0, 40.0, 80.0]
    annotation = {**gt(1, box), "height": 60}
    result = citypersons_miss_rates(dataset(1, annotation), [det(1, box, 0.9)], ["Reasonable_small"])
    assert result["Reasonable_small"] == pytest.approx(FULL, rel=1e-9)


@pytest.mark.parametrize("setup, gt_height, kept, dropped", [
    ("Reasonable", 100.0, 40.0, 39.9),  # 50 / 1.25 = 40 is the inclusive lower end
    ("Reasonable_small", 60.0, 93.7, 93.75),  # 75 * 1.25 = 93.75 is the exclusive upper end
])
def test_detection_height_filter(setup, gt_height, kept, dropped):
    """50 images; a TP (0.95), a kept far FP (0.9), a dropped far FP (0.85), a TP (0.5); 3 scored boxes.
    Kept: points (0, 1/3) (0.02, 1/3) (0.02, 2/3) -> ONE_FP_BETWEEN_TPS. Counting the dropped FP too
    would move the second TP to FPPI 0.04 and change the sample at 0.0316."""
    boxes = [[x, 0.0, 40.0, gt_height] for x in (0.0, 60.0, 120.0)]
    detections = [det(1, boxes[0], 0.95), det(2, far(0, kept), 0.9), det(2, far(1, dropped), 0.85),
                  det(1, boxes[1], 0.5)]
    result = citypersons_miss_rates(dataset(50, *(gt(1, box) for box in boxes)), detections, [setup])
    assert result[setup] == pytest.approx(ONE_FP_BETWEEN_TPS, rel=1e-12)


def test_ignored_boxes_absorb_by_intersection_over_detection_area():
    """Ignored region R = [300, 700] x [0, 400]. Detections of area 100 x 100 (or 40 x 100) that lie inside R
    (IoA 1, IoU 0.025) or half inside (IoA exactly 0.5) are dropped, any number of them; one with IoA 0.4 is a
    false positive. Counted: TP, FP, TP over 50 images -> ONE_FP_BETWEEN_TPS. Were R matched by IoU, all
    three would be FPs."""
    region = gt(1, [300.0, 0.0, 400.0, 400.0], ignore=1)
    detections = [det(1, G1, 0.95), det(1, [400.0, 100.0, 40.0, 100.0], 0.9),
                  det(1, [250.0, 0.0, 100.0, 100.0], 0.85), det(1, [240.0, 200.0, 100.0, 100.0], 0.8),
                  det(1, G2, 0.5)]
    result = citypersons_miss_rates(dataset(50, gt(1, G1), gt(1, G2), gt(1, G3), region), detections,
                                    ["Reasonable"])
    assert result["Reasonable"] == pytest.approx(ONE_FP_BETWEEN_TPS, rel=1e-12)


def test_scored_boxes_are_matched_before_ignored_ones():
    """An ignored box identical to the scored one: the first detection still matches the scored box (TP),
    the duplicate falls on the ignored box and is dropped. Recall 1, no FP -> FULL (matching the ignored
    box first would drop both -> 1)."""
    annotations = [gt(1, G1, ignore=1), gt(1, G1)]
    detections = [det(1, G1, 0.9), det(1, G1, 0.8)]
    result = citypersons_miss_rates(dataset(1, *annotations), detections, ["Reasonable"])
    assert result["Reasonable"] == pytest.approx(FULL, rel=1e-9)


# Two scored boxes 20 px apart; a detection halfway has IoU 3000 / 5000 = 0.6 with each.
LEFT, RIGHT, BETWEEN = [0.0, 0.0, 40.0, 100.0], [20.0, 0.0, 40.0, 100.0], [10.0, 0.0, 40.0, 100.0]


def test_equal_iou_goes_to_the_later_box():
    """BETWEEN (0.9) ties at IoU 0.6 and takes RIGHT, the later box; LEFT (0.8) then takes LEFT: 2 TPs ->
    FULL. Taking the first of the tied boxes would leave the second detection with IoU 1/3 -> miss rate 1/2."""
    detections = [det(1, BETWEEN, 0.9), det(1, LEFT, 0.8)]
    result = citypersons_miss_rates(dataset(1, gt(1, LEFT), gt(1, RIGHT)), detections, ["Reasonable"])
    assert result["Reasonable"] == pytest.approx(FULL, rel=1e-9)


def test_detections_match_greedily_by_score():
    """BETWEEN (0.9) goes first and takes RIGHT (tie -> later box); exact RIGHT (0.8) finds RIGHT taken and
    LEFT at IoU 1/3: FP. Points (0, 1/2) (1, 1/2) -> miss rate 1/2. Matching RIGHT (IoU 1) first would give
    2 TPs."""
    detections = [det(1, RIGHT, 0.8), det(1, BETWEEN, 0.9)]
    result = citypersons_miss_rates(dataset(1, gt(1, LEFT), gt(1, RIGHT)), detections, ["Reasonable"])
    assert result["Reasonable"] == pytest.approx(0.5, rel=1e-12)


def test_iou_threshold_is_inclusive():
    """The upper half of G1 has IoU 2000 / 4000 = 0.5 exactly with it: a TP -> FULL."""
    detection = [0.0, 0.0, 40.0, 50.0]
    result = citypersons_miss_rates(dataset(1, gt(1, G1)), [det(1, detection, 0.9)], ["All"])
    assert result["All"] == pytest.approx(FULL, rel=1e-9)


def test_fppi_sampling_and_log_average():
    """100 images (most empty), 4 scored boxes. By score: TP, FP, TP, FP, FP, TP, 55 more FPs, TP.
    Points (FPPI, recall): (0, .25) (.01, .25) (.01, .5) (.02, .5) (.03, .5) (.03, .75) ... (.58, .75)
    (.58, 1). Samples: 0.0100 and 0.0178 -> .5 (FPPI .01 <= .01 counts), 0.0316 .. 0.5623 -> .75, 1.0 -> 1
    (clipped)."""
    boxes = [G1, G2, G3, [180.0, 0.0, 40.0, 100.0]]
    outcomes = ["TP", "FP", "TP", "FP", "FP", "TP"] + ["FP"] * 55 + ["TP"]
    detections, found, false = [], 0, 0
    for rank, outcome in enumerate(outcomes):
        score = 1 - rank / 100
        if outcome == "TP":
            detections.append(det(1, boxes[found], score))
            found += 1
        else:
            detections.append(det(2 + false, far(false), score))
            false += 1
    result = citypersons_miss_rates(dataset(100, *(gt(1, box) for box in boxes)), detections, ["Reasonable"])
    assert result["Reasonable"] == pytest.approx(log_average([0.5] * 2 + [0.75] * 6 + [1.0]), rel=1e-12)


def test_reference_fppi_below_the_first_point_reads_the_final_recall():
    """10 images, 2 scored boxes. By score: FP (FPPI .1), TP, 4 FPs, TP: points (.1, 0) (.1, .5) ... (.5, .5)
    (.5, 1). No point has FPPI <= 0.0100 .. 0.0562, where the official code reads recall[-1], the final
    recall 1; 0.1000 .. 0.3162 read .5; 0.5623 and 1.0 read 1."""
    detections = [det(2, far(0), 0.9), det(1, G1, 0.8)] + [det(3 + i, far(i), 0.7 - i / 100) for i in range(4)]
    detections.append(det(1, G2, 0.1))
    result = citypersons_miss_rates(dataset(10, gt(1, G1), gt(1, G2)), detections, ["Reasonable"])
    assert result["Reasonable"] == pytest.approx(log_average([1.0] * 4 + [0.5] * 3 + [1.0] * 2), rel=1e-12)


def test_fppi_counts_every_image_of_the_ground_truth():
    """As ONE_FP_BETWEEN_TPS, with the FP in an image without ground truth and 48 images without anything:
    the 50 images make the FP cost 0.02. Over 20 images it costs 0.05: the sample at 0.0316 also reads 1/3."""
    detections = [det(1, G1, 0.95), det(2, far(0), 0.9), det(1, G2, 0.5)]
    annotations = [gt(1, G1), gt(1, G2), gt(1, G3)]
    assert citypersons_miss_rates(dataset(50, *annotations), detections, ["Reasonable"])["Reasonable"] == \
        pytest.approx(ONE_FP_BETWEEN_TPS, rel=1e-12)
    assert citypersons_miss_rates(dataset(20, *annotations), detections, ["Reasonable"])["Reasonable"] == \
        pytest.approx(log_average([1 / 3] * 3 + [2 / 3] * 6), rel=1e-12)


def test_score_ties_across_images_go_by_image_id():
    """Two scored boxes (images 2 and 3), 50 images. TP in image 3 (0.9), then at equal score 0.5 a TP in
    image 2 and an FP in image 1: image 1 comes first whatever the list order. Points (0, .5) (.02, .5)
    (.02, 1): samples 0.0100 and 0.0178 read .5, the rest 1."""
    detections = [det(3, G1, 0.9), det(2, G1, 0.5), det(1, far(0), 0.5)]
    result = citypersons_miss_rates(dataset(50, gt(2, G1), gt(3, G1)), detections, ["Reasonable"])
    assert result["Reasonable"] == pytest.approx(log_average([0.5] * 2 + [1.0] * 7), rel=1e-12)


def test_match_with_annotation_id_zero_counts_as_false_positive():
    """Official quirk: the match is stored as the box's id and id 0 reads as "no match". Boxes id 0 and id 1
    both found, 1 image: the id-0 hit is an FP at FPPI 1 ahead of the TP, so every sample reads the final
    recall 1/2."""
    annotations = [gt(1, G1, id=0), gt(1, G2, id=1)]
    result = citypersons_miss_rates({**dataset(1), "annotations": annotations},
                                    [det(1, G1, 0.9), det(1, G2, 0.8)], ["Reasonable"])
    assert result["Reasonable"] == pytest.approx(0.5, rel=1e-12)


def test_only_the_first_1000_detections_per_image_count():
    """1000 tiny detections (height 10, removed by the height filter only after the cut) outscore the exact
    hit, which is cut: nothing is counted -> miss rate 1."""
    detections = [det(1, [500.0, 0.0, 4.0, 10.0], 0.9)] * 1000 + [det(1, G1, 0.1)]
    assert citypersons_miss_rates(dataset(1, gt(1, G1)), detections, ["Reasonable"])["Reasonable"] == 1.0
    assert citypersons_miss_rates(dataset(1, gt(1, G1)), detections[-1:], ["Reasonable"])["Reasonable"] == \
        pytest.approx(FULL, rel=1e-9)


def test_other_categories_are_not_scored():
    """A category-2 box (never found) and a category-2 detection between the two TPs (50 images) are left
    out: recall 1 without FP -> FULL (else recall 2/3, or an FP at 0.02)."""
    annotations = [gt(1, G1), gt(1, G2), {**gt(1, G3), "category_id": 2}]
    detections = [det(1, G1, 0.95), det(2, far(0), 0.9, category_id=2), det(1, G2, 0.5)]
    result = citypersons_miss_rates(dataset(50, *annotations), detections, ["Reasonable"])
    assert result["Reasonable"] == pytest.approx(FULL, rel=1e-9)


def test_custom_setup_and_json_paths(tmp_path):
    """Files give the same result as dicts; a custom setup scoring heights [90, 110] only scores G1 (100 px),
    not the 60 px box -> FULL."""
    ground_truth = dataset(1, gt(1, G1), gt(1, [60.0, 0.0, 40.0, 60.0]))
    detections = [det(1, G1, 0.9)]
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    (tmp_path / "dt.json").write_text(json.dumps(detections))
    from_files = citypersons_miss_rates(tmp_path / "gt.json", str(tmp_path / "dt.json"))
    assert from_files == citypersons_miss_rates(ground_truth, detections)
    custom = {"tall": CityPersonsSetup(height=(90, 110), visibility=(0.0, 1.0))}
    assert citypersons_miss_rates(ground_truth, detections, custom)["tall"] == pytest.approx(FULL, rel=1e-9)


def _without(record, key):
    return {k: v for k, v in record.items() if k != key}


@pytest.mark.parametrize("ground_truth, detections, message", [
    (dataset(1, _without(gt(1, G1), "vis_ratio")), [], "annotation 0 has no 'vis_ratio'"),
    (dataset(1, _without(gt(1, G1), "height")), [], "annotation 0 has no 'height'"),
    (dataset(1, {**gt(1, G1), "bbox": [0.0, 0.0, 40.0]}), [], "annotation 0: bbox must be"),
    (dataset(1, gt(1, [0.0, 0.0, 40.0, "tall"])), [], "not a number"),
    (dataset(1, gt(5, G1)), [], "refers to image id 5"),
    (_without(dataset(1), "images"), [], "no 'images'"),
    ({**dataset(1), "images": [{"id": 1}, {"id": 1}]}, [], "more than once"),
    (dataset(1, gt(1, G1)), [det(7, G1, 0.9)], "detection 0 refers to image id 7"),
    (dataset(1, gt(1, G1)), [_without(det(1, G1, 0.9), "score")], "detection 0 has no 'score'"),
    (dataset(1, gt(1, G1)), [det(1, G1, 0.9), det(1, G1 + [1.0], 0.9)], "detection 1: bbox must be"),
    (dataset(1, gt(1, G1)), [det(1, G1, float("nan"))], "not finite"),
])
def test_malformed_input(ground_truth, detections, message):
    with pytest.raises(ValueError, match=message):
        citypersons_miss_rates(ground_truth, detections)


def test_wrong_container_types_and_unknown_setup():
    with pytest.raises(TypeError, match="detections must be a list"):
        citypersons_miss_rates(dataset(1), {"image_id": 1})
    with pytest.raises(TypeError, match="not a dict"):
        citypersons_miss_rates(dataset(1), [[1, 1, [0, 0, 1, 1], 0.5]])
    with pytest.raises(ValueError, match="unknown CityPersons setup"):
        citypersons_miss_rates(dataset(1, gt(1, G1)), [], ["Occluded"])


# ------------------------------------------------------------------------------------------------------------
# The MMEngine metric

@pytest.fixture
def metric_class():
    pytest.importorskip("mmdet")
    from blockcopy_mmdet.evaluation import CityPersonsMetric
    return CityPersonsMetric


# Two annotated frames: image 1 has G1 and G2, image 2 has G3; image 3 is never evaluated.
METRIC_GT = dataset(3, gt(1, G1), gt(1, G2), gt(2, G3), gt(3, G1))


def xyxy(bbox):
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def sample(img_id, annotated, boxes=(), scores=(), labels=None):
    """A data sample as MMEngine hands it to metrics: a DetDataSample turned into a dict."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    data_sample = DetDataSample(metainfo={"img_id": img_id, "annotated": annotated, "ori_shape": (1024, 2048)})
    data_sample.pred_instances = InstanceData(
        bboxes=torch.tensor([xyxy(box) for box in boxes], dtype=torch.float32).reshape(-1, 4),
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor([0] * len(boxes) if labels is None else labels, dtype=torch.int64))
    return data_sample.to_dict()


def clip_samples():
    """Per clip, non-annotated frames (whose perfect predictions must not count) and the annotated frame.
    Image 1: G1 found, and G2 only by a label-1 box (not a person). Image 2: nothing. Counted: one TP of 3
    scored boxes, no FP -> recall 1/3 everywhere -> miss rate 2/3."""
    return [
        sample(1, False, [G1, G2], [0.9, 0.9]),
        sample(1, True, [G1, G2], [0.8, 0.95], labels=[0, 1]),
        sample(2, False, [G3], [0.9]),
        sample(2, True),
    ]


def test_metric_scores_annotated_frames_only(metric_class, tmp_path):
    (tmp_path / "gt.json").write_text(json.dumps(METRIC_GT))
    metric = metric_class(ann_file=str(tmp_path / "gt.json"), setups=["Reasonable", "Heavy"],
                          outfile_prefix=str(tmp_path / "out" / "results"))
    samples = clip_samples()
    metric.process({}, samples[:2])
    metric.process({}, samples[2:])
    result = metric.evaluate(size=len(samples))
    assert set(result) == {"citypersons/MR_Reasonable", "citypersons/MR_Heavy"}
    assert result["citypersons/MR_Reasonable"] == pytest.approx(2 / 3, rel=1e-12)
    assert math.isnan(result["citypersons/MR_Heavy"])
    dumped = json.loads((tmp_path / "out" / "results.bbox.json").read_text())
    assert dumped == [{"image_id": 1, "category_id": 1, "bbox": G1, "score": pytest.approx(0.8)}]


def test_metric_does_not_depend_on_result_order(metric_class, tmp_path):
    """Many images with random boxes; shuffled results give the same miss rates as the core function on
    the COCO results of the annotated frames (the ground truth then restricted to the scored images)."""
    rng = random.Random(0)
    annotations, samples, coco_results = [], [], []
    for image_id in range(1, 41):
        truth = [[rng.uniform(0, 1500), rng.uniform(0, 500), 40.0, rng.uniform(30, 200)] for _ in range(3)]
        annotations += [gt(image_id, box, rng.random()) for box in truth]
        boxes = [[x + rng.gauss(0, 5), y + rng.gauss(0, 5), w, h] for x, y, w, h in truth]
        boxes.append([rng.uniform(0, 1500), rng.uniform(0, 500), 40.0, 100.0])
        scores = [round(rng.random(), 1) for _ in boxes]  # ties within and across images
        float32 = np.asarray([xyxy(box) for box in boxes], dtype=np.float32).astype(np.float64)
        coco_results += [det(image_id, [x1, y1, x2 - x1, y2 - y1], float(np.float32(score)))
                         for (x1, y1, x2, y2), score in zip(float32.tolist(), scores)]
        samples += [sample(image_id, False, boxes[:1], [0.99]), sample(image_id, True, boxes, scores)]
    ground_truth = dataset(45, *annotations)
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    expected = citypersons_miss_rates({**ground_truth, "images": ground_truth["images"][:40]}, coco_results)
    for seed in range(3):
        metric = metric_class(ann_file=str(tmp_path / "gt.json"))
        shuffled = random.Random(seed).sample(samples, len(samples))
        metric.process({}, shuffled)
        result = metric.compute_metrics(metric.results)
        assert list(result) == [f"MR_{name}" for name in expected]
        np.testing.assert_array_equal(list(result.values()), list(expected.values()))


def test_metric_registered_and_input_errors(metric_class, tmp_path):
    from mmdet.registry import METRICS
    (tmp_path / "gt.json").write_text(json.dumps(METRIC_GT))
    metric = METRICS.build({"type": "CityPersonsMetric", "ann_file": str(tmp_path / "gt.json")})
    assert isinstance(metric, metric_class)
    with pytest.raises(KeyError, match="annotated"):
        metric.process({}, [{"img_id": 1, "pred_instances": {}}])
    with pytest.raises(ValueError, match="unknown CityPersons setup"):
        metric_class(ann_file=str(tmp_path / "gt.json"), setups=["Occluded"])

    metric.process({}, [sample(9, True)])
    with pytest.raises(ValueError, match=r"img_id\(s\) \[9\]"):
        metric.compute_metrics(metric.results)


def test_metric_repeated_frames(metric_class, tmp_path):
    """Sampler padding may deliver a frame twice: identical copies count once (image 1 only: G1 of G1, G2
    found -> miss rate 1/2); copies that disagree are an error."""
    (tmp_path / "gt.json").write_text(json.dumps(METRIC_GT))
    metric = metric_class(ann_file=str(tmp_path / "gt.json"), setups=["Reasonable"])
    metric.process({}, [sample(1, True, [G1], [0.9]), sample(1, True, [G1], [0.9])])
    assert metric.compute_metrics(metric.results) == {"MR_Reasonable": pytest.approx(0.5, rel=1e-12)}
    metric.process({}, [sample(1, True, [G2], [0.9])])
    with pytest.raises(ValueError, match="scored twice"):
        metric.compute_metrics(metric.results)
