"""Clip bookkeeping for ordered video loading, shared by the framework plugins (no framework imports).

A video dataset here is a flat list of frames, clip after clip, frames in order. BlockCopy needs each
clip whole on one process, frame after frame (its first frame runs densely, every later one depends on
the frames before), and runs N clips at once as N streams. These functions turn the frames' clip ids
and positions into clip lengths, deal whole clips to processes, and group a process's clips into
batches of N streams; the plugins wrap them in their frameworks' samplers.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence


def clip_lengths(keys: Iterable[tuple[Hashable, int]], *, item: str = "item",
                 frame_field: str = "frame index") -> list[int]:
    """Frames per clip of a video dataset, from each frame's ``(clip id, position in the clip)``.

    Args:
        keys: ``(clip_id, frame_index)`` of every frame, in dataset order.
        item, frame_field: what a frame and its position are called in the caller's framework, for the
            error messages (e.g. ``"dataset dict"``, ``"frame_index"``).

    Returns:
        The length of each clip, in dataset order.

    Raises:
        ValueError: a clip's positions are not ``0, 1, 2, ...`` in order, or its frames are not contiguous
            (a clip id appearing again after another clip).
    """
    lengths: list[int] = []
    current: Hashable = None
    seen: set[Hashable] = set()
    for position, (clip, index) in enumerate(keys):
        if not lengths or clip != current:
            if clip in seen:
                raise ValueError(f"clip {clip!r} is not contiguous: it appears again at {item} {position}")
            seen.add(clip)
            current = clip
            lengths.append(0)
        if index != lengths[-1]:
            raise ValueError(f"clip {clip!r}: {item} {position} has {frame_field} {index}, expected "
                             f"{lengths[-1]} (frames must be in order)")
        lengths[-1] += 1
    return lengths


def shard_clips(lengths: Sequence[int], rank: int, world_size: int) -> tuple[range, list[range]]:
    """The whole clips of one process: a contiguous run of clips, as even as whole clips allow.

    With ``C`` clips and world size ``w``, rank ``r`` gets clips ``[b_r, b_{r+1})`` where the shard sizes
    are ``C // w`` plus one for the first ``C % w`` ranks (how Detectron2's ``InferenceSampler`` shards
    frames). All ranks together hold every frame exactly once: nothing is padded or repeated, so ranks
    may get unequal numbers of frames (and a rank gets none when there are fewer clips than ranks).

    Args:
        lengths: frames per clip, in dataset order (the dataset is these clips back to back).
        rank, world_size: this process and the number of processes.

    Returns:
        ``(clip_indices, clip_ranges)``: the rank's clips (positions in ``lengths``) and, per clip, its
        dataset indices.

    Raises:
        ValueError: no clips, an empty clip, or a rank outside ``[0, world_size)``.
    """
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"need at least one clip, each of at least one frame; got {lengths[:10]}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    shard, left = divmod(len(lengths), world_size)
    sizes = [shard + int(r < left) for r in range(world_size)]
    begin = sum(sizes[:rank])
    clip_indices = range(begin, begin + sizes[rank])
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    return clip_indices, [range(starts[c], starts[c + 1]) for c in clip_indices]


def group_streams(clip_ranges: Sequence[range], clip_indices: Sequence[int], streams: int) -> list[list[range]]:
    """A process's clips taken ``streams`` at a time: each group runs as one batch of N streams.

    Args:
        clip_ranges: the dataset indices of each of the process's clips, in order.
        clip_indices: the same clips' positions in the dataset, for error messages.
        streams: N, clips per batch; the last group may hold fewer.

    Raises:
        ValueError: ``streams < 1``, or the clips of one group differ in length (a stream would run into
            the next clip while the others are still in theirs); the message names them.
    """
    if streams < 1:
        raise ValueError(f"the number of streams (clips per batch) must be >= 1, got {streams}")
    groups = []
    for start in range(0, len(clip_ranges), streams):
        group = list(clip_ranges[start: start + streams])
        lengths = [len(frames) for frames in group]
        if len(set(lengths)) > 1:
            clips = list(clip_indices[start: start + streams])
            raise ValueError(f"clips {clips} would run as {len(group)} streams together but have "
                             f"{lengths} frames: streams must start and end their clips together; "
                             "use one clip per batch or clips of equal length")
        groups.append(group)
    return groups


def stream_batches(groups: Sequence[Sequence[range]]) -> Iterator[list[int]]:
    """Batch ``t`` of a group holds frame ``t`` of each of its clips, so all its streams start (with a full
    frame) and end their clips together; groups follow each other."""
    for group in groups:
        for t in range(len(group[0])):
            yield [frames[t] for frames in group]


def stream_batch_count(groups: Sequence[Sequence[range]]) -> int:
    """The number of batches :func:`stream_batches` yields."""
    return sum(len(group[0]) for group in groups)
