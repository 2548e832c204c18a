"""What every framework model that runs BlockCopy over video shares: clips and statistics.

A framework's batch is one time step of N streams. Its items carry a clip id (any hashable; None for an
item outside any clip) and whether the frame is scored (annotated); a new clip starts whenever the
batch's clip ids differ from the previous call's, and items without a clip id are each a clip of their
own (every frame then runs completely). Used by the Detectron2 meta-architectures and the MMDetection
detector of the plugins.
"""
from __future__ import annotations

import copy
import zlib

import torch

from .blockcopy import RunStatistics, StepResult


class VideoModel:
    """Mixin for framework models that run over video clips.

    Subclasses provide :attr:`runner` (a :class:`blockcopy_core.BlockCopy` or
    :class:`blockcopy_core.protocol.DenseRunner`: ``reset()``, ``statistics``, ``reset_statistics()``),
    call :meth:`_init_video` in their constructor, :meth:`_start_time_step` before running a batch and
    :meth:`_count` with the batch's :class:`StepResult` after it. A block policy is kept as
    ``self.blockcopy`` set with :meth:`_set_blockcopy`: not a child module, so the model's ``state_dict``
    is the task model's (checkpoints load unchanged), yet ``.to()`` moves it to the model's device (its dtype
    stays fp32) and starts new clips.

    Attributes:
        annotated_statistics, unannotated_statistics: :class:`RunStatistics` of the time steps whose batch
            holds an annotated (scored) frame, and of the others, since :meth:`reset_statistics`.
    """

    def _init_video(self) -> None:
        self._clip_ids: tuple | None = None
        self._clip_start_policy: dict | None = None
        self.annotated_statistics = RunStatistics()
        self.unannotated_statistics = RunStatistics()

    @property
    def runner(self):
        """The object that runs the time steps and counts them."""
        raise NotImplementedError

    def _set_blockcopy(self, blockcopy) -> None:
        object.__setattr__(self, "blockcopy", blockcopy)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        parameter = next(self.parameters(), None)
        if "blockcopy" in self.__dict__ and parameter is not None:
            # The device only: the policy keeps training in fp32 when the task model runs in fp16 or bf16.
            self.blockcopy.to(parameter.device)
            self.reset()  # the clip state (previous results, masks, engine state) stays behind: start afresh
        return self

    @property
    def statistics(self) -> RunStatistics:
        """The runner's totals over every time step since :meth:`reset_statistics`."""
        return self.runner.statistics

    def reset_statistics(self) -> None:
        """Restart all counts (the runner's and the annotated/unannotated split)."""
        self.annotated_statistics = RunStatistics()
        self.unannotated_statistics = RunStatistics()
        self.runner.reset_statistics()

    def reset(self) -> None:
        """Start new clips: the next time step runs every block."""
        self._clip_ids = None
        self.runner.reset()

    def start_clips_from_current_policy(self) -> None:
        """From now on every clip starts from the block policy as it is now (e.g. after the warm-up), its
        samples seeded by the clip ids, so that a clip's results do not depend on the clips run before it
        (``MODEL.BLOCKCOPY.INDEPENDENT_CLIPS``). Nothing for a model without a learned policy."""
        blockcopy = getattr(self, "blockcopy", None)
        if blockcopy is not None and any(True for _ in blockcopy.policy.parameters()):
            self._clip_start_policy = copy.deepcopy(blockcopy.state_dict())

    def _start_time_step(self, clip_ids: tuple) -> None:
        """Start a new clip if the batch's clip ids (one per stream) say so."""
        if None in clip_ids or clip_ids != self._clip_ids:
            self.reset()
            if self._clip_start_policy is not None:
                self.blockcopy.load_state_dict(self._clip_start_policy)
                torch.manual_seed(zlib.crc32(repr(clip_ids).encode()))
        self._clip_ids = None if None in clip_ids else clip_ids

    def _count(self, step: StepResult, annotated: bool) -> None:
        """Add a time step to the statistics; ``annotated``: the batch holds a scored frame."""
        (self.annotated_statistics if annotated else self.unannotated_statistics).add(step)
