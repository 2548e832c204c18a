"""Clip-ordered test loading for video datasets: whole clips per process, N clips at once as N streams.

Detectron2's ``InferenceSampler`` gives each process a contiguous shard of frame indices, which can cut
a clip in two (the second half would then start without the full first frame BlockCopy needs). Here a
process gets whole clips, frames in order, and a batch holds the same frame position of N clips, so a
BlockCopy runner with N streams sees each stream's clip frame after frame.

A video dataset is a list of Detectron2 dataset dicts with ``clip_id`` (str) and ``frame_index`` (int,
0 .. clip length - 1), clip after clip, frames in order (e.g. ``cityscapes_video_fine_*``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.utils.data as torchdata
from detectron2.data import DatasetCatalog, DatasetFromList, DatasetMapper, MapDataset
from detectron2.data.build import trivial_batch_collator
from detectron2.utils import comm

from blockcopy_core.data import clips as video_clips

logger = logging.getLogger(__name__)


def clips_of(dataset_dicts: Sequence[dict]) -> list[list[dict]]:
    """Split a video dataset into its clips.

    Args:
        dataset_dicts: frames with ``clip_id`` and ``frame_index``, clip after clip, frames in order.

    Returns:
        One list of dicts per clip (the same dict objects), in dataset order.

    Raises:
        KeyError: a dict lacks ``clip_id`` or ``frame_index``.
        ValueError: a clip's frames are not ``0, 1, 2, ...`` in order, or its frames are not contiguous
            (a clip id appearing again after another clip).
    """
    for position, d in enumerate(dataset_dicts):
        if "clip_id" not in d or "frame_index" not in d:
            raise KeyError(f"dataset dict {position} ({d.get('file_name', '?')}) has no 'clip_id' / "
                           "'frame_index': not a video dataset (e.g. cityscapes_video_fine_*)")
    lengths = video_clips.clip_lengths(((d["clip_id"], d["frame_index"]) for d in dataset_dicts),
                                       item="dataset dict", frame_field="frame_index")
    clips, start = [], 0
    for n in lengths:
        clips.append(list(dataset_dicts[start: start + n]))
        start += n
    return clips


class ClipInferenceSampler(torchdata.Sampler):
    """Dataset indices of whole clips for this process: a contiguous range of clips, frames in order.

    With ``C`` clips and world size ``w``, rank ``r`` gets clips ``[b_r, b_{r+1})`` where the shard
    sizes are ``C // w`` plus one for the first ``C % w`` ranks (as Detectron2's ``InferenceSampler``
    shards frames); all ranks together yield every frame exactly once.

    Args:
        clip_lengths: frames per clip, in dataset order (the dataset is these clips back to back).
        rank, world_size: default ``detectron2.utils.comm.get_rank()`` / ``get_world_size()``.

    Attributes:
        clip_indices (range): the clips of this rank (positions in ``clip_lengths``).
        clip_ranges (list[range]): their dataset indices, one range per clip.
    """

    def __init__(self, clip_lengths: Sequence[int], *, rank: int | None = None,
                 world_size: int | None = None):
        rank = comm.get_rank() if rank is None else rank
        world_size = comm.get_world_size() if world_size is None else world_size
        self.clip_indices, self.clip_ranges = video_clips.shard_clips(clip_lengths, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        for frames in self.clip_ranges:
            yield from frames

    def __len__(self) -> int:
        return sum(len(frames) for frames in self.clip_ranges)


class ClipBatchSampler(torchdata.Sampler):
    """Batches of N streams: batch ``t`` of a group holds frame ``t`` of clips ``c .. c+N-1``.

    The process's clips (from a :class:`ClipInferenceSampler`) are taken N at a time; each group
    yields ``clip length`` batches, ``[frame t of clip c, ..., frame t of clip c+N-1]``, so all streams
    start (with a full frame) and end their clips together. The last group of a process may hold fewer
    than N clips.

    Args:
        sampler: the process's clips.
        clips_per_batch: N, the number of streams.

    Raises:
        ValueError: clips of one group differ in length (a stream would run into the next clip while
            the others are still in theirs); the message names them.
    """

    def __init__(self, sampler: ClipInferenceSampler, clips_per_batch: int = 1):
        if clips_per_batch < 1:
            raise ValueError(f"clips_per_batch must be >= 1, got {clips_per_batch}")
        self.clips_per_batch = clips_per_batch
        self.groups: list[list[range]] = video_clips.group_streams(sampler.clip_ranges, sampler.clip_indices,
                                                                   clips_per_batch)

    def __iter__(self) -> Iterator[list[int]]:
        return video_clips.stream_batches(self.groups)

    def __len__(self) -> int:
        return video_clips.stream_batch_count(self.groups)


class _NoSkipMapper:
    """Detectron2's ``MapDataset`` replaces an item whose mapper returns None by a random other one;
    in a clip that would silently put a foreign frame into the stream, so fail instead."""

    def __init__(self, mapper: Callable[[dict], Any]):
        self.mapper = mapper

    def __call__(self, dataset_dict: dict) -> Any:
        mapped = self.mapper(dataset_dict)
        if mapped is None:
            raise RuntimeError(f"the mapper returned None for {dataset_dict.get('file_name', '?')}; "
                               "a video clip cannot skip frames")
        return mapped


def build_clip_test_loader(cfg, dataset_name: str, clips_per_batch: int = 1,
                           mapper: Callable[[dict], Any] | None = None) -> torchdata.DataLoader:
    """A test loader over a registered video dataset: whole clips per process, N clips as N streams.

    Built like Detectron2's ``build_detection_test_loader`` (``DatasetFromList`` -> ``MapDataset`` with
    ``DatasetMapper(cfg, is_train=False)`` by default, ``cfg.DATALOADER.NUM_WORKERS`` workers, no
    collation), with :class:`ClipInferenceSampler` and :class:`ClipBatchSampler` instead of its
    ``InferenceSampler``.

    Args:
        cfg: a Detectron2 config.
        dataset_name: a registered video dataset (e.g. ``"cityscapes_video_fine_instance_seg_val"``).
        clips_per_batch: N, the number of clips run at once.
        mapper: dataset dict -> model input; must not return None.

    Returns:
        A DataLoader yielding lists of N mapped dicts (frame ``t`` of N clips; see
        :class:`ClipBatchSampler`), which keep ``clip_id``, ``frame_index`` and ``annotated``.
    """
    dataset_dicts = DatasetCatalog.get(dataset_name)
    if not len(dataset_dicts):
        raise ValueError(f"dataset {dataset_name!r} is empty")
    clips = clips_of(dataset_dicts)
    sampler = ClipInferenceSampler([len(clip) for clip in clips])
    batch_sampler = ClipBatchSampler(sampler, clips_per_batch)
    logger.info("%s: %d of %d clips (%d frames) on rank %d, %d per batch", dataset_name,
                len(sampler.clip_indices), len(clips), len(sampler), comm.get_rank(), clips_per_batch)
    if mapper is None:
        mapper = DatasetMapper(cfg, is_train=False)
    dataset = MapDataset(DatasetFromList(dataset_dicts, copy=False), _NoSkipMapper(mapper))
    # A private generator for the workers' seeds: iterating the loader leaves torch's global RNG, which
    # the block policy samples from, untouched (so runs repeat exactly).
    return torchdata.DataLoader(dataset, batch_sampler=batch_sampler,
                                num_workers=cfg.DATALOADER.NUM_WORKERS,
                                collate_fn=trivial_batch_collator, generator=torch.Generator().manual_seed(0))
