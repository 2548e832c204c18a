"""Clip-ordered test sampling for mmengine: whole clips per process, N clips at once as N streams.

mmengine's ``DefaultSampler`` deals frame indices round-robin to the processes, which tears every clip
apart; BlockCopy needs each clip whole on one process, frame after frame, its first frame (run densely)
first. Config use (mmengine 0.10's ``Runner.build_dataloader`` builds ``sampler`` with ``dataset=`` and
``seed=``, then ``batch_sampler`` with ``sampler=`` and ``batch_size=``)::

    test_dataloader = dict(
        batch_size=2, num_workers=2,  # 2 clips at once, as 2 streams
        dataset=dict(type='CityPersonsVideoDataset', ...),
        sampler=dict(type='ClipSampler'),
        batch_sampler=dict(type='ClipBatchSampler'))

With ``batch_size=1`` the ``batch_sampler`` can be left out (a plain DataLoader over :class:`ClipSampler`
yields the frames one by one, in order); with a larger batch size it is needed, since a plain DataLoader
would batch consecutive frames of one clip.

Uneven shards: clips are dealt whole, so processes may get unequal numbers of frames; nothing is padded
or repeated (no frame is scored twice). mmengine 0.10.7 copes: its test loop runs each process's own
loader to its end (no collective call per iteration), and ``collect_results`` (``BaseMetric.evaluate``)
joins the processes' results with ``zip_longest`` - interleaved rank by rank, not in dataset order - and
cuts the joined list to ``len(dataset)``, which a metric storing at most one result per frame never
exceeds. A metric must therefore key its results by ``img_id``, not by position.
"""
from __future__ import annotations

from collections.abc import Iterator, Sized

from mmengine.dist import get_dist_info
from mmengine.registry import DATA_SAMPLERS
from torch.utils.data import Sampler

from blockcopy_core.data import clips as video_clips


def clip_lengths_of(dataset) -> list[int]:
    """Frames per clip of a video dataset whose data items carry ``clip_id`` and ``frame_id`` (0, 1, ...),
    clip after clip, frames in order (e.g. :class:`CityPersonsVideoDataset`).

    Raises:
        KeyError: an item lacks ``clip_id`` or ``frame_id`` (not a video dataset).
        ValueError: a clip's frames are out of order or not contiguous.
    """
    keys = []
    for index in range(len(dataset)):
        info = dataset.get_data_info(index)
        if "clip_id" not in info or "frame_id" not in info:
            raise KeyError(f"data item {index} ({info.get('img_path', '?')}) of {type(dataset).__name__} has no "
                           "'clip_id' / 'frame_id': not a video dataset (e.g. CityPersonsVideoDataset)")
        keys.append((info["clip_id"], info["frame_id"]))
    return video_clips.clip_lengths(keys, item="data item", frame_field="frame_id")


@DATA_SAMPLERS.register_module()
class ClipSampler(Sampler[int]):
    """Dataset indices of whole clips for this process: a contiguous run of clips, frames in order.

    With ``C`` clips and ``w`` processes, the first ``C % w`` ranks get ``C // w + 1`` clips and the others
    ``C // w`` (a rank gets none when there are fewer clips than processes); all ranks together yield
    every frame exactly once, without padding (see the module docstring for how mmengine's evaluation
    handles the unequal counts).

    Args:
        dataset: a video dataset (items with ``clip_id`` and ``frame_id``).
        seed: passed by mmengine's ``Runner``; unused, the order is fixed.
        rank, world_size: default: mmengine's ``get_dist_info()``.

    Attributes:
        clip_indices (range): this rank's clips (positions among the dataset's clips).
        clip_ranges (list[range]): their dataset indices, one range per clip.
    """

    def __init__(self, dataset: Sized, seed: int | None = None, *, rank: int | None = None,
                 world_size: int | None = None) -> None:
        dist_rank, dist_world_size = get_dist_info()
        rank = dist_rank if rank is None else rank
        world_size = dist_world_size if world_size is None else world_size
        self.clip_indices, self.clip_ranges = video_clips.shard_clips(clip_lengths_of(dataset), rank, world_size)

    def __iter__(self) -> Iterator[int]:
        for frames in self.clip_ranges:
            yield from frames

    def __len__(self) -> int:
        return sum(len(frames) for frames in self.clip_ranges)


@DATA_SAMPLERS.register_module()
class ClipBatchSampler(Sampler[list[int]]):
    """Batches of N streams: batch ``t`` of a group holds frame ``t`` of N different clips.

    The process's clips (from a :class:`ClipSampler`) are taken N at a time; each group yields ``clip
    length`` batches ``[frame t of clip c, ..., frame t of clip c+N-1]``, so all streams start (with a full
    frame) and end their clips together. The last group may hold fewer clips: its batches are smaller.
    A batch never holds two frames of one clip.

    Args:
        sampler: the process's :class:`ClipSampler`.
        batch_size: N, the number of streams (the dataloader's ``batch_size``).

    Raises:
        TypeError: ``sampler`` is not a :class:`ClipSampler`.
        ValueError: ``batch_size < 1``, or clips of one group differ in length.
    """

    def __init__(self, sampler: ClipSampler, batch_size: int) -> None:
        if not isinstance(sampler, ClipSampler):
            raise TypeError(f"ClipBatchSampler needs a ClipSampler (sampler=dict(type='ClipSampler')), got "
                            f"{type(sampler).__name__}")
        self.batch_size = batch_size
        self.groups = video_clips.group_streams(sampler.clip_ranges, sampler.clip_indices, batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        return video_clips.stream_batches(self.groups)

    def __len__(self) -> int:
        return video_clips.stream_batch_count(self.groups)
