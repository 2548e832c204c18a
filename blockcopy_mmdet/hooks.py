"""``BlockCopyHook``: the BlockCopy protocol around mmengine's test loop.

* before testing: the policy's warm-up, ``warmup_clips`` clips (default ``blockcopy.warmup_clips``, the
  method's 400) of a training dataset drawn in epochs of random order
  (:func:`blockcopy_core.protocol.warmup_order`), each clip starting with a full frame; then new clips,
  fresh statistics, and with ``independent_clips`` the warmed-up policy as every clip's start;
* while testing: a progress bar over the time steps, and with ``video_clips`` a video of what the policy
  decided on the first clips;
* after testing: the statistics of the scored time steps and of the others, summed over processes
  (executed fraction, GMACs per frame, ms per frame and stage), logged and written with the metrics to
  ``<log_dir>/blockcopy_results.json``, and the learned policy saved as ``<work_dir>/policy.pt``.

Clip boundaries themselves are found by the detector from the data samples' ``clip_id``
(:class:`~blockcopy_mmdet.detector.BlockCopyDetector`), so they hold however the model is driven.
"""
from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path

import torch
from mmdet.registry import DATASETS, HOOKS
from mmengine.dist import all_gather_object, is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from tqdm import tqdm

from blockcopy_core.blockcopy import RunStatistics
from blockcopy_core.data import VideoWriter
from blockcopy_core.protocol import format_statistics, warmup_order, without_nan
from blockcopy_core.visualize import blockcopy_mosaic

from .detector import BlockCopyDetector

__all__ = ["BlockCopyHook"]


@HOOKS.register_module()
class BlockCopyHook(Hook):
    """Warm-up, statistics and the saved policy of a :class:`BlockCopyDetector` test run.

    Args:
        warmup_dataset: config of the dataset whose clips warm the policy up (e.g. CityPersons train
            clips, test pipeline); None: no warm-up (e.g. with ``policy_weights``).
        warmup_clips: number of clips; None: the model's ``blockcopy.warmup_clips``.
        seed: seed of the warm-up's clip order (the policy's own samples come from torch's RNG, which
            mmengine's ``randomness`` seeds).
        save_policy: write the learned policy to ``<work_dir>/policy.pt`` after testing.
        video_clips: write what the policy decided on the first N clips of the main process, one video
            each, ``<work_dir>/videos/clip_<clip_id>.mp4`` (first stream): per frame the selected blocks,
            the frame state, the information gain and the detections
            (:func:`blockcopy_core.visualize.blockcopy_mosaic`).
        video_scale: size of the video's panels relative to the frame.
    """

    priority = "NORMAL"

    def __init__(self, warmup_dataset: dict | None = None, warmup_clips: int | None = None, seed: int = 0,
                 save_policy: bool = True, video_clips: int = 0, video_scale: float = 0.5) -> None:
        if warmup_clips is not None and warmup_clips < 0:
            raise ValueError(f"warmup_clips must be >= 0, got {warmup_clips}")
        self.warmup_dataset = warmup_dataset
        self.warmup_clips = warmup_clips
        self.seed = seed
        self.save_policy = save_policy
        self.video_clips = video_clips
        self.video_scale = video_scale
        self._videos: dict = {}

    @staticmethod
    def _model(runner) -> BlockCopyDetector:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not isinstance(model, BlockCopyDetector):
            raise TypeError(f"BlockCopyHook needs model type BlockCopyDetector, got {type(model).__name__}")
        return model

    def before_test(self, runner) -> None:
        model = self._model(runner)
        num_clips = model.config.warmup_clips if self.warmup_clips is None else self.warmup_clips
        if self.warmup_dataset is not None and num_clips:
            self._warm_up(runner, model, num_clips)
        model.reset()
        model.reset_statistics()
        model.start_clips_from_current_policy()

    def _warm_up(self, runner, model: BlockCopyDetector, num_clips: int) -> None:
        dataset = DATASETS.build(self.warmup_dataset)
        if not hasattr(dataset, "clip_ranges"):
            raise TypeError(f"BlockCopyHook's warmup_dataset must be a video dataset with clips (clip_ranges(), e.g. "
                            f"CityPersonsVideoDataset), got {type(dataset).__name__}")
        clips = [list(indices) for indices in dataset.clip_ranges()]
        chosen = [clips[i] for i in warmup_order(len(clips), num_clips, self.seed)]
        runner.logger.info(f"BlockCopy: warming the policy up on {num_clips} clips of {len(clips)} "
                           f"({sum(map(len, chosen))} frames)")
        model.eval()
        with torch.no_grad(), tqdm(total=sum(map(len, chosen)), desc="policy warm-up", unit="frame",
                                   dynamic_ncols=True, disable=not is_main_process()) as bar:
            for clip in chosen:
                model.warm_up_clip([dataset[index] for index in clip])
                bar.update(len(clip))
        runner.logger.info(f"BlockCopy warm-up: {format_statistics(without_nan(model.statistics.as_dict()))}")

    def before_test_epoch(self, runner) -> None:
        self._bar = tqdm(total=len(runner.test_dataloader), desc="test", unit="step", dynamic_ncols=True,
                         disable=not is_main_process())

    def after_test_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._bar.update()
        if self.video_clips and is_main_process() and outputs:
            self._write_video_frame(runner, self._model(runner), outputs[0])

    def _write_video_frame(self, runner, model: BlockCopyDetector, sample) -> None:
        """Add the first stream's time step to its clip's video (the first ``video_clips`` clips)."""
        clip = sample.metainfo.get("clip_id")
        if clip not in self._videos:
            if len(self._videos) >= self.video_clips:
                return
            path = Path(runner.work_dir) / "videos" / f"clip_{clip}.mp4"
            self._videos[clip] = VideoWriter(path, fps=17.0)  # Cityscapes' sequences run at 17 Hz
        step, height, width = model.last_step, *sample.metainfo["img_shape"]
        frame = model.blockcopy.adapter.policy_frame(model.last_frames[:1])[0] * 255
        state = model.blockcopy.adapter.policy_frame(model.sparse.frame_state[:1])[0] * 255
        detections = step.result[0]
        keep = detections["scores"] >= model.blockcopy.adapter.score_threshold
        mosaic = blockcopy_mosaic(frame[:, :height, :width], step.grid[0, 0], state[:, :height, :width],
                                  None if step.ig_map is None else step.ig_map[0], detections["boxes"][keep],
                                  detections["scores"][keep], scale=self.video_scale,
                                  title=f"clip {clip} frame {sample.metainfo.get('frame_id')}",
                                  executed=model.sparse.executed_grid[0, 0])
        self._videos[clip].write(mosaic)

    def after_test_epoch(self, runner, metrics: dict[str, float] | None = None) -> None:
        self._bar.close()
        for writer in self._videos.values():
            writer.close()
        if self._videos:
            runner.logger.info(f"BlockCopy: {len(self._videos)} clip videos in {Path(runner.work_dir) / 'videos'}")
        model = self._model(runner)
        scored = RunStatistics.total(all_gather_object(model.annotated_statistics))
        others = RunStatistics.total(all_gather_object(model.unannotated_statistics))
        if not is_main_process():
            return
        summary = without_nan(scored.as_dict())
        if scored.frames:
            runner.logger.info(f"BlockCopy, {scored.frames} scored time steps: {format_statistics(summary)}")
        document = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": str(next(model.parameters()).device),
            "torch": torch.__version__,
            "blockcopy": dataclasses.asdict(model.config),
            "metrics": without_nan(dict(metrics or {})),
            "statistics": summary,
            "unannotated_statistics": without_nan(others.as_dict()),
        }
        path = Path(runner.log_dir) / "blockcopy_results.json"
        path.write_text(json.dumps(document, indent=2, default=str))
        runner.logger.info(f"BlockCopy results written to {path}")
        if self.save_policy:
            policy = Path(runner.work_dir) / "policy.pt"
            torch.save(model.blockcopy.state_dict(), policy)
            runner.logger.info(f"BlockCopy policy saved to {policy}")
