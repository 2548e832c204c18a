"""``BlockCopyDetector``: any MMDetection detector run block-sparse over video, configured by
``blockcopy=dict(...)``.

::

    model = dict(type="BlockCopyDetector",
                 detector=dict(type="CSP", ...),          # the plain detector's config, unchanged
                 blockcopy=dict(block_size=128, target=0.3))

Single-stage detectors (CSP, RetinaNet, FCOS, ...) run every convolution block-sparse: backbone, neck and
the head's ``forward``; the head's ``predict_by_feat`` decodes the dense maps as usual. Two-stage
detectors (MGAN, Faster R-CNN) run backbone, neck and the RPN head block-sparse, the proposals and the
ROI head densely on the dense features. Per time step (a batch = frame t of N clips) the policy selects
blocks before the network (:meth:`blockcopy_core.BlockCopy.select`) and learns from the detections
after post-processing (:meth:`~blockcopy_core.BlockCopy.observe`, box information gain).

A new clip starts whenever the data samples' ``clip_id`` changes (samples without one are each a clip of
their own, so single images run completely); :class:`blockcopy_mmdet.hooks.BlockCopyHook` warms the
policy up before testing and logs the statistics. Inference only: train the plain detector and load its
checkpoint, which loads unchanged (the parameter names are the plain detector's).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from mmdet.models.detectors import BaseDetector, SingleStageDetector, TwoStageDetector
from mmdet.registry import MODELS
from mmdet.structures import SampleList
from mmengine.logging import print_log
from mmengine.structures import InstanceData
from torch import nn

from blockcopy_core.blockcopy import BlockCopy
from blockcopy_core.clips import VideoModel
from blockcopy_core.config import BlockCopyConfig
from blockcopy_core.engine import BlockSparseModel, convert
from blockcopy_core.errors import ConfigError, InvalidInputError

from .adapter import InstanceDataAdapter, input_format

__all__ = ["BlockCopyDetector"]

TRAINING_NOT_SUPPORTED = ("BlockCopyDetector runs inference only: train the plain detector and load its checkpoint "
                          "(it loads unchanged); the block policy trains itself online")


class _SingleStageTrunk(nn.Module):
    """Backbone, neck and dense head of a single-stage detector as one network: frames (N, 3, H, W) ->
    the head's raw maps (a tuple of per-level lists, as ``head.forward`` returns them)."""

    def __init__(self, detector: SingleStageDetector) -> None:
        super().__init__()
        self.backbone = detector.backbone
        if detector.with_neck:
            self.neck = detector.neck
        self.bbox_head = detector.bbox_head

    def forward(self, frames: torch.Tensor):
        features = self.backbone(frames)
        if hasattr(self, "neck"):
            features = self.neck(features)
        return self.bbox_head(features)


class _TwoStageTrunk(nn.Module):
    """Backbone, neck and RPN head of a two-stage detector as one network: frames (N, 3, H, W) ->
    ``(features, rpn_maps)``, the feature maps the ROI head reads and the RPN head's raw maps."""

    def __init__(self, detector: TwoStageDetector) -> None:
        super().__init__()
        self.backbone = detector.backbone
        if detector.with_neck:
            self.neck = detector.neck
        self.rpn_head = detector.rpn_head

    def forward(self, frames: torch.Tensor):
        features = self.backbone(frames)
        if hasattr(self, "neck"):
            features = self.neck(features)
        return features, self.rpn_head(features)


@MODELS.register_module()
class BlockCopyDetector(VideoModel, BaseDetector):
    """An MMDetection detector accelerated by BlockCopy (see the module docstring).

    The wrapper *is* the plain detector's module tree (its ``backbone``, ``neck``, heads and data
    preprocessor are the wrapper's children under the same names), so ``state_dict()`` has exactly the
    plain detector's keys. The block policy (``self.blockcopy``, a :class:`blockcopy_core.BlockCopy`) is
    not a child: save it with ``self.blockcopy.state_dict()`` (the hook writes ``policy.pt``), load one
    with ``policy_weights``.

    Args:
        detector: the config of the detector to accelerate (a ``SingleStageDetector`` or
            ``TwoStageDetector`` subclass, e.g. ``CSP``, ``MGAN``, ``RetinaNet``, ``FasterRCNN``).
        blockcopy: the BlockCopy settings, the fields of :class:`blockcopy_core.BlockCopyConfig`
            (``block_size``, ``policy``, ``target``, ``gamma``, ``cost_momentum``, ``lr``, ``weight_decay``,
            ``update_interval``, ``buckets``, ``cuda_graphs``, ``dense_when_full``, ``warmup_clips``,
            ``online_learning``); missing ones keep the method's defaults.
        classes: the detector's labels the policy sees (one input mask each) and the information gain
            counts; default all of the detector's classes.
        score_threshold: detections below it are ignored by the information gain and the policy's masks.
        independent_clips: every clip starts from the policy as it was after the warm-up, with samples
            seeded by the clip ids, so a clip's results do not depend on the clips before it (and any
            number of processes gives the same results); otherwise the policy keeps learning across clips.
        policy_weights: a ``policy.pt`` saved by an earlier run to start the policy from.
    """

    def __init__(self, detector: dict, blockcopy: dict | None = None, classes: list[int] | None = None,
                 score_threshold: float = 0.3, independent_clips: bool = False, policy_weights: str | None = None,
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        plain = MODELS.build(detector)
        if isinstance(plain, BlockCopyDetector):
            raise ValueError("BlockCopyDetector's detector is already a BlockCopyDetector: wrap the plain detector")
        if isinstance(plain, TwoStageDetector):
            trunk = _TwoStageTrunk(plain)
            num_classes = plain.roi_head.bbox_head.num_classes
        elif isinstance(plain, SingleStageDetector):
            trunk = _SingleStageTrunk(plain)
            num_classes = plain.bbox_head.num_classes
        else:
            raise TypeError(f"BlockCopyDetector accelerates single-stage and two-stage detectors "
                            f"(SingleStageDetector / TwoStageDetector subclasses), got {type(plain).__name__}")
        # The plain detector's children become the wrapper's (the same dict): same names, same state_dict.
        self._modules = plain._modules
        object.__setattr__(self, "detector", plain)
        config = BlockCopyConfig.from_dict(blockcopy or {})
        self._raise_padding(config.block_size)
        classes = list(range(num_classes)) if classes is None else list(classes)
        if not classes or min(classes) < 0 or max(classes) >= num_classes:
            raise ConfigError("classes", classes, f"labels of the detector's {num_classes} classes (0..{num_classes - 1})")
        self.eval()
        sparse = convert(trunk.eval(), config=config)
        adapter = InstanceDataAdapter(classes, score_threshold, input_format(self.data_preprocessor))
        self._set_blockcopy(BlockCopy(sparse, adapter, config))
        self._init_video()
        self.independent_clips = independent_clips
        if policy_weights:
            self.load_policy(policy_weights)

    @property
    def runner(self) -> BlockCopy:
        return self.blockcopy

    @property
    def sparse(self) -> BlockSparseModel:
        """The block-sparse part of the detector (shares the detector's modules)."""
        return self.blockcopy.sparse

    @property
    def config(self) -> BlockCopyConfig:
        return self.blockcopy.config

    def _raise_padding(self, block_size: int) -> None:
        """Frames must be a multiple of the block size: raise the data preprocessor's ``pad_size_divisor``
        to the least common multiple of its own and the block size (as Detectron2's plugin raises
        ``size_divisibility``)."""
        preprocessor = self.data_preprocessor
        divisor = getattr(preprocessor, "pad_size_divisor", None)
        if divisor is None:
            return
        padded = math.lcm(max(int(divisor), 1), block_size)
        if padded != divisor:
            print_log(f"BlockCopy: data_preprocessor.pad_size_divisor raised from {divisor} to {padded} (a multiple "
                      f"of blockcopy.block_size={block_size})", logger="current", level=logging.INFO)
            preprocessor.pad_size_divisor = padded

    def load_policy(self, path: str) -> None:
        """Load a policy saved by :class:`~blockcopy_mmdet.hooks.BlockCopyHook` (``policy.pt``)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            self.blockcopy.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{path} is not a BlockCopy policy for this model (blockcopy settings and classes "
                             f"must match the run that saved it): {error}") from error

    def start_clips_from_current_policy(self) -> None:
        """With ``independent_clips``, every clip from now on starts from the policy as it is now."""
        if self.independent_clips:
            super().start_clips_from_current_policy()

    def train(self, mode: bool = True):
        if mode:
            raise NotImplementedError(TRAINING_NOT_SUPPORTED)
        return super().train(False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if "blockcopy" in self.__dict__:
            self.reset()  # the engine's clip state stays where it was: start afresh on the new device or dtype
        return self

    def loss(self, batch_inputs, batch_data_samples):
        raise NotImplementedError(TRAINING_NOT_SUPPORTED)

    def _forward(self, batch_inputs: torch.Tensor, batch_data_samples: SampleList | None = None):
        """The detector's raw outputs on full frames (mmdet's ``mode="tensor"``), dense."""
        return self.detector._forward(batch_inputs, batch_data_samples)

    def extract_feat(self, batch_inputs: torch.Tensor):
        return self.detector.extract_feat(batch_inputs)

    @torch.no_grad()
    def predict(self, batch_inputs: torch.Tensor, batch_data_samples: SampleList, rescale: bool = True) -> SampleList:
        """One time step of N streams: (N, 3, H, W) preprocessed frames, one data sample per stream.

        Returns the data samples with ``pred_instances`` as the plain detector gives them.
        """
        self._check_frames(batch_inputs)
        self._start_time_step(tuple(sample.metainfo.get("clip_id") for sample in batch_data_samples))
        metas = [sample.metainfo for sample in batch_data_samples]
        grid = self.blockcopy.select(batch_inputs)
        outputs = self.sparse(batch_inputs, grid)
        if isinstance(self.detector, TwoStageDetector):
            features, rpn_maps = outputs
            proposals = self.rpn_head.predict_by_feat(*rpn_maps, batch_img_metas=metas, rescale=False)
            results = self.roi_head.predict(features, proposals, batch_data_samples, rescale=rescale)
        else:
            results = self.bbox_head.predict_by_feat(*outputs, batch_img_metas=metas, rescale=rescale)
        frame_results = [_in_frame_pixels(r, meta) if rescale else r for r, meta in zip(results, metas)]
        step = self.blockcopy.observe(self.blockcopy.adapter.detect(frame_results, tuple(batch_inputs.shape[-2:])))
        self._count(step, any(meta.get("annotated", True) for meta in metas))
        return self.add_pred_to_datasample(batch_data_samples, results)

    def _check_frames(self, frames: torch.Tensor) -> None:
        block = self.config.block_size
        height, width = frames.shape[-2:]
        if height % block or width % block:
            raise InvalidInputError(
                f"frame size {height}x{width} after padding is not a multiple of blockcopy.block_size={block}; "
                f"pad frames to a multiple of {block} (the data preprocessor's pad_size_divisor does it: "
                f"it is {getattr(self.data_preprocessor, 'pad_size_divisor', None)})")

    def warm_up_clip(self, frames: list[dict[str, Any]]) -> None:
        """Run one clip (a list of pipeline outputs, ``{"inputs", "data_samples"}`` each, frames in order)
        through the model for the policy's warm-up, starting it as a new clip."""
        self.reset()
        for frame in frames:
            batch = self.data_preprocessor({"inputs": [frame["inputs"]], "data_samples": [frame["data_samples"]]},
                                           False)
            self.predict(batch["inputs"], batch["data_samples"])


def _in_frame_pixels(result: InstanceData, meta: dict) -> InstanceData:
    """``result`` with its boxes mapped back from original-image to network-input pixels (undoing the
    rescale by the metainfo's ``scale_factor``), as the information gain compares them on the frame."""
    scale = meta.get("scale_factor")
    if scale is None:
        return result
    frame = result.clone()
    frame.bboxes = result.bboxes * result.bboxes.new_tensor(scale).repeat(2)
    return frame
