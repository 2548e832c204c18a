"""PETS 2009 S2L1 as Detectron2 video datasets, with the main job's protocol and metrics.

Two datasets (registered on import with the main job's settings; :func:`add_pets09_config` and
``cfg.DATASETS.PETS09`` change them for a run, see :func:`register_pets09_s2l1`):

* ``pets09_s2l1_warmup``: frames 1..WARMUP_FRAMES cut into clips of CLIP_LENGTH frames (the last one
  shorter when they do not divide): 15 clips of 20 frames of frames 1..300 by default. Put it in
  ``DATASETS.TRAIN``: the block policy trains on these clips before evaluation
  (``MODEL.BLOCKCOPY.WARMUP_CLIPS``; 45 = 3 epochs, as the main job).
* ``pets09_s2l1_eval``: frames 1..FRAMES (all 795 by default) as ONE clip; ``annotated`` is True for the
  frames after WARMUP_FRAMES (301..795), the only ones scored. Frames 1..300 run again at its start, so
  the scored frames see the state the video itself leads to.

Each dataset dict: ``file_name`` (the video), ``video_frame`` (0-based index of the frame in the file;
MOTChallenge frame = ``video_frame + 1``), ``image_id`` (the MOTChallenge frame number), ``height``,
``width``, the video fields ``clip_id``, ``frame_index``, ``annotated``, and ``annotations``: the
ground-truth persons of the frame (``category_id`` 0, COCO's person, XYXY_ABS boxes), the
MOTChallenge boxes marked not considered as ``iscrowd=1`` (ignore regions).

:class:`VideoFrameMapper` reads the frames from the video file (Detectron2's ``read_image`` reads
image files only), keeping the file open between consecutive frames. :class:`PETS09Evaluator` scores the
person detections of the annotated frames: log-average miss rate and AP50 with the core's functions,
the not-considered boxes as ignore regions (the main job's metrics).

Files: ``DATASETS.PETS09.VIDEO`` / ``GROUND_TRUTH``, by default ``data/pets09_s2l1/vtest.avi`` and
``gt.txt`` in the shared folder (``$BLOCKCOPY_SHARED`` or ``../shared``), else in the blockcopy cache;
a missing file raises :class:`FileNotFoundError` naming the paths tried (nothing is downloaded here:
``blockcopy_core.data.pets09_s2l1_paths`` fetches the video into the cache).
"""
from __future__ import annotations

import copy
import itertools
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from detectron2.config import CfgNode as CN
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm

from blockcopy_core.data import VideoReader, load_mot_ground_truth, load_mot_ignore_boxes
from blockcopy_core.evaluation import average_precision_50, log_average_miss_rate
from blockcopy_core.models.centernet import COCO_CLASSES, PERSON_CLASS
from blockcopy_core.paths import cache_dir, shared_dir

from .catalog import register_video_dataset_type

__all__ = ["PETS09Evaluator", "PETS09_EVALUATOR_TYPE", "PETS09_EVAL", "PETS09_WARMUP", "VideoFrameMapper",
           "add_pets09_config", "load_pets09_s2l1", "pets09_s2l1_files", "register_pets09_s2l1",
           "register_pets09_s2l1_from_config"]

logger = logging.getLogger(__name__)

PETS09_WARMUP = "pets09_s2l1_warmup"
PETS09_EVAL = "pets09_s2l1_eval"
PETS09_EVALUATOR_TYPE = "pets09_mot"
_SUBDIR = "data/pets09_s2l1"
_VIDEO, _GROUND_TRUTH = "vtest.avi", "gt.txt"
DEFAULT_WARMUP_FRAMES = 300
DEFAULT_CLIP_LENGTH = 20


def add_pets09_config(cfg: CN) -> None:
    """Add ``cfg.DATASETS.PETS09``, the settings of the PETS09-S2L1 datasets; call it after ``get_cfg()``."""
    cfg.DATASETS.PETS09 = CN()
    _C = cfg.DATASETS.PETS09
    # The video (768x576, 795 frames); "" = data/pets09_s2l1/vtest.avi in the shared folder or the cache.
    _C.VIDEO = ""
    # MOTChallenge 2D MOT 2015 ground truth of PETS09-S2L1; "" = gt.txt next to the default video.
    _C.GROUND_TRUTH = ""
    # Use only frames 1..FRAMES of the video (0 = all): pets09_s2l1_eval is that one clip.
    _C.FRAMES = 0
    # Frames 1..WARMUP_FRAMES are the warm-up clips (pets09_s2l1_warmup) and are not scored.
    _C.WARMUP_FRAMES = DEFAULT_WARMUP_FRAMES
    # Frames per warm-up clip (the last clip keeps the remainder).
    _C.CLIP_LENGTH = DEFAULT_CLIP_LENGTH


def pets09_s2l1_files(video: str | Path = "", ground_truth: str | Path = "") -> tuple[Path, Path]:
    """The video and ground-truth files: the given paths, or the default locations.

    Raises:
        FileNotFoundError: naming the path(s) tried for a missing file.
    """
    folders = [shared_dir() / _SUBDIR, cache_dir() / "pets09_s2l1"]

    def find(candidates: list[Path], what: str, key: str) -> Path:
        for path in candidates:
            if path.is_file():
                return path
        raise FileNotFoundError(f"PETS09-S2L1 {what} not found: {' or '.join(map(str, candidates))} (put it there "
                                f"or set {key})")

    video_path = find([Path(video)] if video else [folder / _VIDEO for folder in folders],
                      "video (vtest.avi)", "DATASETS.PETS09.VIDEO")
    if ground_truth:
        gt_candidates = [Path(ground_truth)]
    elif video:
        gt_candidates = [video_path.parent / _GROUND_TRUTH]
    else:
        gt_candidates = [folder / _GROUND_TRUTH for folder in folders]
    gt_path = find(gt_candidates, "ground truth (gt.txt of MOTChallenge 2D MOT 2015 train/PETS09-S2L1)",
                   "DATASETS.PETS09.GROUND_TRUTH")
    return video_path, gt_path


def load_pets09_s2l1(name: str, video: str | Path = "", ground_truth: str | Path = "", frames: int = 0,
                     warmup_frames: int = DEFAULT_WARMUP_FRAMES,
                     clip_length: int = DEFAULT_CLIP_LENGTH) -> list[dict[str, Any]]:
    """The dataset dicts of :data:`PETS09_WARMUP` or :data:`PETS09_EVAL` (see the module docstring).

    Args:
        name: which of the two.
        video, ground_truth: the files ("" = the default locations).
        frames: use frames 1..frames of the video (0, or more than it has: all).
        warmup_frames: frames 1..warmup_frames warm up and are not scored.
        clip_length: frames per warm-up clip.
    """
    if name not in (PETS09_WARMUP, PETS09_EVAL):
        raise ValueError(f"unknown PETS09-S2L1 dataset {name!r}; expected {PETS09_WARMUP!r} or {PETS09_EVAL!r}")
    if clip_length < 1:
        raise ValueError(f"DATASETS.PETS09.CLIP_LENGTH must be >= 1, got {clip_length}")
    video_path, gt_path = pets09_s2l1_files(video, ground_truth)
    reader = VideoReader(video_path)
    total = len(reader) if frames <= 0 else min(frames, len(reader))
    if not 0 <= warmup_frames < total:
        raise ValueError(f"DATASETS.PETS09.WARMUP_FRAMES {warmup_frames} leaves no frame to score among frames "
                         f"1..{total}")
    if name == PETS09_WARMUP and warmup_frames == 0:
        raise ValueError("DATASETS.PETS09.WARMUP_FRAMES is 0: pets09_s2l1_warmup has no frames")
    persons, ignored = load_mot_ground_truth(gt_path), load_mot_ignore_boxes(gt_path)
    empty = torch.zeros((0, 4))
    width, height = reader.source_size
    numbers = range(1, (warmup_frames if name == PETS09_WARMUP else total) + 1)
    dicts = []
    for number in numbers:
        if name == PETS09_WARMUP:
            clip, frame_index = (number - 1) // clip_length, (number - 1) % clip_length
        else:
            clip, frame_index = 0, number - 1
        annotations = [{"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": PERSON_CLASS, "iscrowd": crowd}
                       for boxes, crowd in ((persons.get(number, empty), 0), (ignored.get(number, empty), 1))
                       for box in boxes.tolist()]
        dicts.append({
            "file_name": str(video_path), "video_frame": number - 1, "image_id": number,
            "height": height, "width": width,
            "clip_id": f"{name}/{clip}", "frame_index": frame_index,
            "annotated": name == PETS09_EVAL and number > warmup_frames,
            "annotations": annotations,
        })
    return dicts


def register_pets09_s2l1(video: str | Path = "", ground_truth: str | Path = "", frames: int = 0,
                         warmup_frames: int = DEFAULT_WARMUP_FRAMES, clip_length: int = DEFAULT_CLIP_LENGTH) -> None:
    """(Re)register :data:`PETS09_WARMUP` and :data:`PETS09_EVAL` with these settings (lazily: the files are
    read when a dataset is first asked for)."""
    settings = {"video": str(video), "ground_truth": str(ground_truth), "frames": int(frames),
                "warmup_frames": int(warmup_frames), "clip_length": int(clip_length)}
    for name in (PETS09_WARMUP, PETS09_EVAL):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda name=name: load_pets09_s2l1(name, **settings))
        MetadataCatalog.get(name).set(thing_classes=list(COCO_CLASSES), evaluator_type=PETS09_EVALUATOR_TYPE,
                                      pets09=dict(settings))


def register_pets09_s2l1_from_config(cfg: CN) -> None:
    """:func:`register_pets09_s2l1` with ``cfg.DATASETS.PETS09`` (defaults when the node is absent)."""
    node = cfg.DATASETS.get("PETS09")
    if node is None:
        return
    register_pets09_s2l1(node.VIDEO, node.GROUND_TRUTH, node.FRAMES, node.WARMUP_FRAMES, node.CLIP_LENGTH)


class _ForwardReader:
    """Frames of one video read forward; a frame behind the read position reopens the file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._frames: Iterator[np.ndarray] | None = None
        self._position = 0

    def read(self, index: int) -> np.ndarray:
        """The RGB (H, W, 3) uint8 frame ``index`` (0-based)."""
        if self._frames is None or index < self._position:
            self._frames, self._position = iter(VideoReader(self.path, start=index)), index
        for _ in range(index - self._position):
            next(self._frames)
        self._position = index + 1
        return next(self._frames)


class VideoFrameMapper:
    """Dataset dict -> model input: ``"image"`` the frame ``video_frame`` of ``file_name`` as a (3, H, W)
    uint8 tensor in ``cfg.INPUT.FORMAT`` ("BGR" or "RGB"), resized by ``INPUT.MIN_SIZE_TEST`` /
    ``MAX_SIZE_TEST`` (0: native size, PETS09's setting); the other fields are kept, ``annotations`` dropped
    (the evaluator reads them from the dataset).

    Frames are read forward from an open file, so consecutive frames cost one decode each.
    """

    def __init__(self, cfg: CN) -> None:
        if cfg.INPUT.FORMAT not in ("BGR", "RGB"):
            raise ValueError(f"INPUT.FORMAT must be 'BGR' or 'RGB' to read video frames, got {cfg.INPUT.FORMAT!r}")
        self.image_format = cfg.INPUT.FORMAT
        self.augmentations = T.AugmentationList(utils.build_augmentation(cfg, is_train=False))
        self._readers: dict[str, _ForwardReader] = {}

    def __getstate__(self) -> dict[str, Any]:  # data-loader workers open their own files
        return {**self.__dict__, "_readers": {}}

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        record = copy.copy(dataset_dict)
        record.pop("annotations", None)
        path = record["file_name"]
        if not Path(path).is_file():
            raise FileNotFoundError(f"video file not found: {path}")
        reader = self._readers.setdefault(path, _ForwardReader(path))
        record["image"] = self.to_image(reader.read(record["video_frame"]))
        return record

    def to_image(self, rgb: np.ndarray) -> torch.Tensor:
        """An (H, W, 3) uint8 RGB frame -> the model's (3, H', W') uint8 image: ``INPUT.FORMAT`` channel
        order, resized by the test augmentation."""
        image = np.ascontiguousarray(rgb[:, :, ::-1]) if self.image_format == "BGR" else rgb
        augmented = T.AugInput(image)
        self.augmentations(augmented)
        return torch.as_tensor(np.ascontiguousarray(augmented.image.transpose(2, 0, 1)))


class PETS09Evaluator(DatasetEvaluator):
    """Log-average miss rate and AP50 of the person detections on the annotated frames of a PETS09 dataset.

    ``process`` keeps, for each input with ``annotated`` True, the output instances of class 0 (person);
    ``evaluate`` scores them against the dataset's ground truth (``iscrowd`` boxes as ignore regions) with
    :func:`blockcopy_core.evaluation.log_average_miss_rate` and ``average_precision_50``, over all
    processes. Returns ``{"pedestrian": {"MR": %, "AP50": %, "frames": scored frames}}``; the main job's
    fractions are these / 100.
    """

    def __init__(self, dataset_name: str, output_dir: str | None = None, distributed: bool = True) -> None:
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self.distributed = distributed
        self.reset()

    def reset(self) -> None:
        self._detections: dict[int, dict[str, torch.Tensor]] = {}

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for item, output in zip(inputs, outputs):
            if not item.get("annotated", False):
                continue
            instances = output["instances"].to("cpu")
            person = instances.pred_classes == PERSON_CLASS
            self._detections[item["image_id"]] = {"boxes": instances.pred_boxes.tensor[person],
                                                  "scores": instances.scores[person]}

    def evaluate(self) -> OrderedDict | None:
        detections = self._detections
        if self.distributed:
            comm.synchronize()
            parts = comm.gather(self._detections, dst=0)
            if not comm.is_main_process():
                return None
            detections = dict(itertools.chain.from_iterable(part.items() for part in parts))
        scored = [record for record in DatasetCatalog.get(self.dataset_name) if record["annotated"]]
        if not scored:
            raise ValueError(f"{self.dataset_name} has no annotated frames to score")
        missing = [record["image_id"] for record in scored if record["image_id"] not in detections]
        if missing:
            raise ValueError(f"{self.dataset_name}: no predictions for {len(missing)} annotated frames "
                             f"(first: frame {missing[0]})")
        ground_truth, ignore = [], []
        for record in scored:
            for crowd, target in ((0, ground_truth), (1, ignore)):
                boxes = [ann["bbox"] for ann in record["annotations"] if ann["iscrowd"] == crowd]
                target.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        frames = [detections[record["image_id"]] for record in scored]
        miss_rate = log_average_miss_rate(frames, ground_truth, ignore=ignore)
        ap50 = average_precision_50(frames, ground_truth, ignore=ignore)
        return OrderedDict(pedestrian={"MR": 100.0 * miss_rate, "AP50": 100.0 * ap50, "frames": len(scored)})


register_pets09_s2l1()
register_video_dataset_type(PETS09_EVALUATOR_TYPE, VideoFrameMapper,
                            lambda cfg, name, output_dir: PETS09Evaluator(name, output_dir),
                            register_pets09_s2l1_from_config)
