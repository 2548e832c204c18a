"""The kinds of video datasets blockcopy_d2 evaluates: per ``evaluator_type`` (a dataset's
``MetadataCatalog`` entry), how its frames become model inputs and how they are scored.

A video dataset is a list of Detectron2 dicts with the video fields ``clip_id``, ``frame_index`` and
``annotated``, each clip's frames contiguous and in order; :mod:`blockcopy_d2.data.pets09` and
:mod:`blockcopy_d2.data.cityscapes_video` register theirs here, other datasets plug in the same way.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator

Mapper = Callable[[dict], dict]


@dataclass(frozen=True)
class VideoDatasetType:
    """How the engine reads and scores the datasets of one ``evaluator_type``.

    Attributes:
        build_mapper: ``cfg -> mapper``; the mapper turns a dataset dict into a model input dict (``"image"``
            a (3, H, W) uint8 tensor in ``cfg.INPUT.FORMAT``, the video fields kept).
        build_evaluator: ``(cfg, dataset_name, output_folder) -> DatasetEvaluator``.
        configure: ``cfg -> None``, called once before the datasets are read: (re)registers them with the
            config's settings (e.g. ``cfg.DATASETS.PETS09``); None when the names need no settings.
    """

    build_mapper: Callable[[CfgNode], Mapper]
    build_evaluator: Callable[[CfgNode, str, str | None], DatasetEvaluator]
    configure: Callable[[CfgNode], None] | None = None


_VIDEO_DATASET_TYPES: dict[str, VideoDatasetType] = {}


def register_video_dataset_type(evaluator_type: str, build_mapper: Callable[[CfgNode], Mapper],
                                build_evaluator: Callable[[CfgNode, str, str | None], DatasetEvaluator],
                                configure: Callable[[CfgNode], None] | None = None) -> None:
    """Make the engine handle the datasets whose metadata says ``evaluator_type`` (see :class:`VideoDatasetType`)."""
    _VIDEO_DATASET_TYPES[evaluator_type] = VideoDatasetType(build_mapper, build_evaluator, configure)


def video_dataset_type(dataset_name: str) -> VideoDatasetType:
    """The :class:`VideoDatasetType` of a registered dataset (by its metadata's ``evaluator_type``)."""
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(f"dataset {dataset_name!r} is not registered (import blockcopy_d2.data to register the "
                       f"video datasets); registered video types: {sorted(_VIDEO_DATASET_TYPES)}")
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
    if evaluator_type not in _VIDEO_DATASET_TYPES:
        raise KeyError(f"dataset {dataset_name!r} (evaluator_type {evaluator_type!r}) is not a video dataset known "
                       f"to blockcopy_d2.data.catalog; known evaluator types: {sorted(_VIDEO_DATASET_TYPES)}")
    return _VIDEO_DATASET_TYPES[evaluator_type]


def configure_video_datasets(cfg: CfgNode) -> None:
    """Run the ``configure`` hook of every dataset type in ``DATASETS.TRAIN`` and ``DATASETS.TEST``, once each."""
    done = set()
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        kind = video_dataset_type(name)
        if kind.configure is not None and id(kind) not in done:
            kind.configure(cfg)
            done.add(id(kind))
