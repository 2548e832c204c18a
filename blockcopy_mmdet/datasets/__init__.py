"""MMDetection datasets and samplers for BlockCopy's clip protocol; importing this package registers
``CityPersonsVideoDataset`` (mmdet's ``DATASETS``) and ``ClipSampler`` / ``ClipBatchSampler`` (mmengine's
``DATA_SAMPLERS``)."""
from .citypersons import CityPersonsVideoDataset
from .samplers import ClipBatchSampler, ClipSampler, clip_lengths_of

__all__ = ["CityPersonsVideoDataset", "ClipBatchSampler", "ClipSampler", "clip_lengths_of"]
