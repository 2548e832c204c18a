"""Cityscapes as video for Detectron2: the 20-frame clips that end at each annotated gtFine frame.

BlockCopy is evaluated on Cityscapes' video snippets (``leftImg8bit_sequence``): a clip is the 20
frames ``f-19 .. f`` ending at an annotated frame ``f``; it starts with a full execution and is scored
on its last frame only. :func:`register_cityscapes_video` registers that view of the train and val
splits under the names ``cityscapes_video_fine_{instance_seg,sem_seg}_{train,val}``; the annotated
frames carry exactly what Detectron2's own Cityscapes loaders give them, and the metadata is that of
Detectron2's Cityscapes datasets, so its ``CityscapesInstanceEvaluator`` / ``CityscapesSemSegEvaluator``
work unchanged once :class:`AnnotatedFramesEvaluator` hides the unannotated frames from them.

Every frame's dataset dict (a plain ``dict``) holds:

- ``file_name`` (str): the frame in ``leftImg8bit_sequence/<split>/<city>/``; for the annotated frame
  this has the same basename, ``<city>_<seq>_<frame>_leftImg8bit.png``, as the ``leftImg8bit`` image
  the evaluators key their ground truth on (the two files hold the same picture);
- ``height``, ``width`` (int): the annotated frame's size (from its polygons JSON), which every frame
  of a Cityscapes snippet shares: reading 10,000 PNG headers only to learn that would slow listing;
- ``image_id`` (str): the basename of ``file_name``, as Detectron2's Cityscapes loader sets it;
- ``clip_id`` (str): ``<city>_<seq>_<annotated frame>``, e.g. ``"frankfurt_000000_000294"``;
- ``frame_index`` (int): 0 .. 19, the position in the clip;
- ``annotated`` (bool): True only for the last frame, which also carries Detectron2's annotation
  fields: ``annotations`` (instance segmentation: polygons, boxes, contiguous ``category_id``,
  ``iscrowd``) or ``sem_seg_file_name`` (semantic segmentation: the ``labelTrainIds.png``).

Dicts come clip after clip (clips sorted by city, sequence and frame number), frames in order.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Sequence

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets.cityscapes import load_cityscapes_instances, load_cityscapes_semantic
from detectron2.evaluation import (CityscapesInstanceEvaluator, CityscapesSemSegEvaluator, COCOEvaluator,
                                   DatasetEvaluator, DatasetEvaluators)

from blockcopy_core.data.cityscapes import (CLIP_LENGTH, IMAGE_SUFFIX, SEQUENCE_FRAMES, clip_frame_paths,
                                            layout_error, list_folder, split_stem)

from .catalog import register_video_dataset_type

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
"""The splits registered: the test split has no public ground truth to score the last frame on."""

TASKS = {"instance_seg": "cityscapes_instance", "sem_seg": "cityscapes_sem_seg"}
"""Task part of a dataset name -> Detectron2 evaluator type, as for ``cityscapes_fine_*``."""

LAYOUT = (
    "Expected Cityscapes layout under the root folder (named 'cityscapes'; default "
    "$DETECTRON2_DATASETS/cityscapes):\n"
    f"  {SEQUENCE_FRAMES}  video frames "
    "(leftImg8bit_sequence_trainvaltest.zip)\n"
    "  leftImg8bit/<split>/<city>/<city>_<seq>_<frame:06d>_leftImg8bit.png  annotated frames "
    "(leftImg8bit_trainvaltest.zip)\n"
    "  gtFine/<split>/<city>/<city>_<seq>_<frame:06d>_gtFine_{polygons.json,instanceIds.png,"
    "labelIds.png,labelTrainIds.png}  annotations (gtFine_trainvaltest.zip; labelTrainIds.png is "
    "made by cityscapesscripts' createTrainIdLabelImgs)\n"
    f"A clip is the {CLIP_LENGTH} sequence frames <frame-{CLIP_LENGTH - 1}> .. <frame> ending at each "
    "annotated gtFine frame.")

# Ground-truth files each task needs per annotated frame: what Detectron2's loader reads plus what its
# evaluator reads (the semantic evaluator also opens instanceIds.png for its instance-level IoU).
_GT_FILES = {
    "instance_seg": ("polygons.json", "instanceIds.png", "labelIds.png"),
    "sem_seg": ("polygons.json", "labelTrainIds.png", "labelIds.png", "instanceIds.png"),
}
_POLYGONS_SUFFIX = "_gtFine_polygons.json"


def default_cityscapes_root() -> str:
    """``$DETECTRON2_DATASETS/cityscapes`` (``DETECTRON2_DATASETS`` defaulting to ``datasets``), the
    folder Detectron2's built-in Cityscapes datasets are registered under."""
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "cityscapes")


def cityscapes_video_dirs(root: str | os.PathLike, split: str) -> tuple[str, str, str]:
    """The folders of one split: ``(sequence_dir, image_dir, gt_dir)`` =
    ``root/leftImg8bit_sequence/<split>``, ``root/leftImg8bit/<split>``, ``root/gtFine/<split>``."""
    root = os.fspath(root)
    return (os.path.join(root, "leftImg8bit_sequence", split), os.path.join(root, "leftImg8bit", split),
            os.path.join(root, "gtFine", split))


def cityscapes_metadata() -> dict[str, list[str]]:
    """``thing_classes`` (8 names) and ``stuff_classes`` (19 names, in train-id order) of Cityscapes.

    Derived from cityscapesscripts' ``labels`` by the rule Detectron2's instance loader uses for its
    contiguous ``category_id`` (instance classes that count in evaluation), so names and ids agree;
    they equal Detectron2's built-in Cityscapes metadata.
    """
    from cityscapesscripts.helpers.labels import labels

    things = [label.name for label in labels if label.hasInstances and not label.ignoreInEval]
    stuff = [label.name for label in sorted(labels, key=lambda label: label.trainId)
             if 0 <= label.trainId < 255]
    return {"thing_classes": things, "stuff_classes": stuff}


def _missing(what: str, path: str) -> FileNotFoundError:
    return layout_error(what, path, LAYOUT)


def _listdir(path: str, what: str) -> list[str]:
    return list_folder(path, what, LAYOUT)


def _annotated_frames(image_dir: str, gt_dir: str, task: str) -> list[tuple[str, str, str]]:
    """The annotated frames ``(city, seq, frame)`` of a split, sorted, after checking that each has
    its ``leftImg8bit`` image and the ground-truth files ``task`` needs, and that every image in
    ``image_dir`` has ground truth (Detectron2's loaders walk ``image_dir`` and would otherwise fail
    inside a worker process)."""
    frames = []
    for city in _listdir(gt_dir, "ground-truth folder (gtFine/<split>)"):
        gt_city = os.path.join(gt_dir, city)
        if not os.path.isdir(gt_city):
            continue
        gt_names = set(os.listdir(gt_city))
        image_city = os.path.join(image_dir, city)
        image_names = set(_listdir(image_city, "annotated-image folder (leftImg8bit/<split>/<city>)"))
        for name in sorted(gt_names):
            if not name.endswith(_POLYGONS_SUFFIX):
                continue
            stem = name[: -len(_POLYGONS_SUFFIX)]
            key = split_stem(stem, os.path.join(gt_city, name), LAYOUT)
            for kind in _GT_FILES[task]:
                if f"{stem}_gtFine_{kind}" not in gt_names:
                    raise _missing("ground-truth file", os.path.join(gt_city, f"{stem}_gtFine_{kind}"))
            if stem + IMAGE_SUFFIX not in image_names:
                raise _missing("annotated image", os.path.join(image_city, stem + IMAGE_SUFFIX))
            frames.append(key)
    if not frames:
        raise _missing(f"annotated frame (no *{_POLYGONS_SUFFIX} file)", os.path.join(gt_dir, "*", "*"))
    annotated = {"_".join(key) for key in frames}
    for city in _listdir(image_dir, "annotated-image folder (leftImg8bit/<split>)"):
        image_city = os.path.join(image_dir, city)
        if not os.path.isdir(image_city):
            continue
        for name in sorted(os.listdir(image_city)):
            if not name.endswith(IMAGE_SUFFIX):  # Detectron2's loader asserts on any other file here
                raise ValueError(f"Cityscapes video: unexpected file (only *{IMAGE_SUFFIX} belong "
                                 f"there): {os.path.join(image_city, name)}\n{LAYOUT}")
            stem = name[: -len(IMAGE_SUFFIX)]
            if stem not in annotated:
                raise _missing(f"ground truth of the annotated image {os.path.join(image_city, name)}",
                               os.path.join(gt_dir, city, stem + _POLYGONS_SUFFIX))
    return sorted(frames, key=lambda key: (key[0], key[1], int(key[2])))


def load_cityscapes_video(root: str | os.PathLike, split: str, task: str = "instance_seg",
                          clip_length: int = CLIP_LENGTH) -> list[dict[str, Any]]:
    """Dataset dicts of every frame of every clip of one split (see the module docstring).

    Args:
        root: the ``cityscapes`` folder.
        split: ``"train"`` or ``"val"`` (any split with gtFine works).
        task: ``"instance_seg"`` (annotated frames from Detectron2's ``load_cityscapes_instances``,
            polygons from the JSON files, as its built-in datasets) or ``"sem_seg"`` (from
            ``load_cityscapes_semantic``).
        clip_length: frames per clip, ending at the annotated frame.

    Returns:
        ``len(annotated frames) * clip_length`` dicts, clip after clip, frames in order.

    Raises:
        FileNotFoundError: a folder, ground-truth file, annotated image or sequence frame is missing;
            the message names the path and describes the expected layout.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    sequence_dir, image_dir, gt_dir = cityscapes_video_dirs(root, split)
    # Check the folders in the order a user downloads and unpacks them, before any loader runs.
    _listdir(sequence_dir, "video-frame folder (leftImg8bit_sequence/<split>)")
    _listdir(gt_dir, "ground-truth folder (gtFine/<split>)")
    _listdir(image_dir, "annotated-image folder (leftImg8bit/<split>)")
    annotated = _annotated_frames(image_dir, gt_dir, task)
    listings: dict[str, set[str]] = {}
    clips = [(key, clip_frame_paths(sequence_dir, *key, clip_length, LAYOUT, listings)) for key in annotated]

    if task == "instance_seg":
        loaded = load_cityscapes_instances(image_dir, gt_dir, from_json=True, to_polygons=True)
    else:
        loaded = load_cityscapes_semantic(image_dir, gt_dir)
    by_name = {os.path.basename(d["file_name"]): d for d in loaded}

    dicts = []
    for (city, seq, frame), paths in clips:
        clip_id = f"{city}_{seq}_{frame}"
        annotation = by_name[clip_id + IMAGE_SUFFIX]
        for index, path in enumerate(paths):
            d = {"file_name": path, "height": annotation["height"], "width": annotation["width"],
                 "image_id": os.path.basename(path), "clip_id": clip_id, "frame_index": index,
                 "annotated": index == len(paths) - 1}
            if d["annotated"]:
                # Detectron2's annotation fields; its file_name (the leftImg8bit copy) is not used:
                # the sequence frame is the picture the clip's previous frames lead up to.
                d.update({k: v for k, v in annotation.items() if k not in d})
            dicts.append(d)
    logger.info("Cityscapes video %s (%s): %d clips, %d frames from %s", split, task, len(clips),
                len(dicts), sequence_dir)
    return dicts


def register_cityscapes_video(root: str | os.PathLike | None = None) -> list[str]:
    """Register ``cityscapes_video_fine_{instance_seg,sem_seg}_{train,val}`` in Detectron2's catalogs.

    Lazy: nothing is read until ``DatasetCatalog.get(name)``. Idempotent: registering again replaces
    the earlier registration (with the same root, nothing changes; with another root, it now points
    there). Metadata: ``thing_classes``, ``stuff_classes``, ``evaluator_type``
    (``"cityscapes_instance"`` / ``"cityscapes_sem_seg"``), ``image_dir`` and ``gt_dir`` as Detectron2's
    ``cityscapes_fine_*`` datasets (``ignore_label=255`` for semantic segmentation), plus
    ``sequence_dir`` (the split's ``leftImg8bit_sequence`` folder) and ``clip_length``.

    Args:
        root: the ``cityscapes`` folder; default :func:`default_cityscapes_root`.

    Returns:
        The registered dataset names.
    """
    root = os.fspath(root) if root is not None else default_cityscapes_root()
    classes = cityscapes_metadata()
    names = []
    for split in SPLITS:
        sequence_dir, image_dir, gt_dir = cityscapes_video_dirs(root, split)
        for task, evaluator_type in TASKS.items():
            name = f"cityscapes_video_fine_{task}_{split}"
            metadata = dict(classes, image_dir=image_dir, gt_dir=gt_dir, evaluator_type=evaluator_type,
                            sequence_dir=sequence_dir, clip_length=CLIP_LENGTH)
            if task == "sem_seg":
                metadata["ignore_label"] = 255
            # Detectron2's catalogs refuse a second registration (and a changed metadata value):
            # drop the earlier one so that registering is idempotent and can be re-pointed.
            if name in DatasetCatalog:
                DatasetCatalog.remove(name)
            if name in MetadataCatalog:
                MetadataCatalog.remove(name)
            DatasetCatalog.register(name, functools.partial(load_cityscapes_video, root, split, task))
            MetadataCatalog.get(name).set(**metadata)
            names.append(name)
            if task == "instance_seg":  # COCO-style AP needs ground truth of the annotated frames only
                annotated = f"{name}{ANNOTATED_SUFFIX}"
                for catalog in (DatasetCatalog, MetadataCatalog):
                    if annotated in catalog:
                        catalog.remove(annotated)
                DatasetCatalog.register(annotated, functools.partial(_annotated_frames_of, name))
                MetadataCatalog.get(annotated).set(**dict(metadata, evaluator_type="coco"))
    return names


ANNOTATED_SUFFIX = "_annotated"
"""``cityscapes_video_fine_instance_seg_<split>_annotated``: the annotated frames alone (registered beside
each instance dataset), the ground truth of Detectron2's ``COCOEvaluator``."""


def _annotated_frames_of(name: str) -> list[dict]:
    return [d for d in DatasetCatalog.get(name) if d["annotated"]]


def build_cityscapes_video_evaluator(cfg, dataset_name: str, output_dir: str | None) -> DatasetEvaluator:
    """The evaluator of a Cityscapes video dataset, fed the annotated frames only.

    Instance datasets: Detectron2's ``CityscapesInstanceEvaluator`` (mask AP and AP50 by the official
    script, reported as ``cityscapes_segm``; with ``MODEL.MASK_ON``) and ``COCOEvaluator`` (COCO-style box
    and mask AP with pycocotools, ``bbox`` and ``segm``).
    Semantic datasets: ``CityscapesSemSegEvaluator`` (mIoU). The Cityscapes evaluators run on a single
    machine only (Detectron2's restriction); cityscapesscripts writes its ``matches.json`` to the working
    directory.
    """
    evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type
    if evaluator_type == "cityscapes_sem_seg":
        return AnnotatedFramesEvaluator(CityscapesSemSegEvaluator(dataset_name))
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    evaluators = [COCOEvaluator(f"{dataset_name}{ANNOTATED_SUFFIX}", tasks=tasks, output_dir=output_dir)]
    if cfg.MODEL.MASK_ON:
        evaluators.insert(0, _RenamedTask(CityscapesInstanceEvaluator(dataset_name), "segm", "cityscapes_segm"))
    return AnnotatedFramesEvaluator(DatasetEvaluators(evaluators))


class _RenamedTask(DatasetEvaluator):
    """An evaluator whose result ``task`` is reported as ``name`` (both the official Cityscapes script
    and COCOEvaluator call theirs ``segm``, and Detectron2's ``DatasetEvaluators`` needs distinct keys)."""

    def __init__(self, evaluator: DatasetEvaluator, task: str, name: str):
        self.evaluator, self.task, self.name = evaluator, task, name

    def reset(self) -> None:
        self.evaluator.reset()

    def process(self, inputs, outputs) -> None:
        self.evaluator.process(inputs, outputs)

    def evaluate(self):
        results = self.evaluator.evaluate()
        if results is None:  # not the main process
            return None
        return {self.name if key == self.task else key: value for key, value in results.items()}


register_video_dataset_type("cityscapes_instance", lambda cfg: DatasetMapper(cfg, is_train=False),
                            build_cityscapes_video_evaluator)
register_video_dataset_type("cityscapes_sem_seg", lambda cfg: DatasetMapper(cfg, is_train=False),
                            build_cityscapes_video_evaluator)


class AnnotatedFramesEvaluator(DatasetEvaluator):
    """A Detectron2 evaluator that passes only the annotated frames on to another evaluator.

    Video datasets run the model on every frame, but ground truth exists only for frames whose dict
    has ``annotated=True`` (Cityscapes: a clip's last frame). The wrapped evaluator (e.g.
    ``CityscapesInstanceEvaluator``) sees those frames' ``(input, output)`` pairs only, in order;
    ``reset`` and ``evaluate`` are delegated unchanged (so it synchronises across processes as the
    wrapped one does).

    Args:
        evaluator: the evaluator to feed.
    """

    def __init__(self, evaluator: DatasetEvaluator):
        self.evaluator = evaluator

    def reset(self) -> None:
        self.evaluator.reset()

    def process(self, inputs: Sequence[dict], outputs: Sequence[Any]) -> None:
        """Args: ``inputs`` (list[dict]): the model's inputs, each with ``annotated`` (bool);
        ``outputs`` (list): the model's outputs, one per input."""
        if len(inputs) != len(outputs):  # zip would silently drop the tail of the longer one
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        kept = []
        for input, output in zip(inputs, outputs):
            if "annotated" not in input:
                raise KeyError(f"AnnotatedFramesEvaluator: input {input.get('file_name', '?')!r} has no "
                               "'annotated' field; it needs a video dataset such as "
                               "cityscapes_video_fine_*")
            if input["annotated"]:
                kept.append((input, output))
        if kept:
            self.evaluator.process([i for i, _ in kept], [o for _, o in kept])

    def evaluate(self):
        return self.evaluator.evaluate()
