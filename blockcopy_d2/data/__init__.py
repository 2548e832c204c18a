"""Video datasets for blockcopy_d2: importing this package registers them with Detectron2's catalogs and,
per ``evaluator_type``, their mappers and evaluators (:mod:`blockcopy_d2.data.catalog`).

* PETS09-S2L1 (:mod:`.pets09`): ``pets09_s2l1_warmup``, ``pets09_s2l1_eval``;
* Cityscapes video (:mod:`.cityscapes_video`): ``cityscapes_video_fine_{instance_seg,sem_seg}_{train,val}``
  under ``$DETECTRON2_DATASETS/cityscapes`` (``register_cityscapes_video(root)`` points them elsewhere).
"""
from .catalog import VideoDatasetType, configure_video_datasets, register_video_dataset_type, video_dataset_type
from .cityscapes_video import (CLIP_LENGTH, AnnotatedFramesEvaluator, build_cityscapes_video_evaluator,
                               load_cityscapes_video, register_cityscapes_video)
from .pets09 import (PETS09_EVAL, PETS09_EVALUATOR_TYPE, PETS09_WARMUP, PETS09Evaluator, VideoFrameMapper,
                     add_pets09_config, load_pets09_s2l1, pets09_s2l1_files, register_pets09_s2l1,
                     register_pets09_s2l1_from_config)
from .sampler import ClipBatchSampler, ClipInferenceSampler, build_clip_test_loader, clips_of

register_cityscapes_video()  # lazy: reads nothing until a dataset is used

__all__ = [
    "AnnotatedFramesEvaluator", "CLIP_LENGTH", "ClipBatchSampler", "ClipInferenceSampler", "PETS09Evaluator",
    "PETS09_EVAL", "PETS09_EVALUATOR_TYPE", "PETS09_WARMUP", "VideoDatasetType", "VideoFrameMapper",
    "add_pets09_config", "build_cityscapes_video_evaluator", "build_clip_test_loader", "clips_of",
    "configure_video_datasets", "load_cityscapes_video", "load_pets09_s2l1", "pets09_s2l1_files",
    "register_cityscapes_video", "register_pets09_s2l1", "register_pets09_s2l1_from_config",
    "register_video_dataset_type", "video_dataset_type",
]
