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
from torch.utils import _pytree as pytree

from blockcopy_core.blockcopy import BlockCopy
from blockcopy_core.clips import VideoModel
from blockcopy_core.config import BlockCopyConfig
from blockcopy_core.engine import BlockSparseModel, convert
from blockcopy_core.errors import ConfigError, InvalidInputError

from .adapter import InstanceDataAdapter, input_format, max_detections

__all__ = ["BlockCopyDetector", "predict_from_trunk", "trunk_of"]

TRAINING_NOT_SUPPORTED = ("BlockCopyDetector runs inference only: train the plain detector and load its checkpoint "
                          "(it loads unchanged); the block policy trains itself online")


class _Trunk(nn.Module):
    """The block-sparse part of a detector as one network over frames (N, 3, H, W): backbone, neck and
    the dense head (single-stage: returns the head's raw maps, a tuple of per-level lists) or the RPN head
    (two-stage: returns ``(features, rpn_maps)``, the feature maps the ROI head reads and the RPN's raw
    maps). Its children keep the detector's names."""

    def __init__(self, detector: BaseDetector) -> None:
        super().__init__()
        self.two_stage = isinstance(detector, TwoStageDetector)
        self.backbone = detector.backbone
        if detector.with_neck:
            self.neck = detector.neck
        self.head_name = "rpn_head" if self.two_stage else "bbox_head"
        self.add_module(self.head_name, getattr(detector, self.head_name))

    def forward(self, frames: torch.Tensor):
        features = self.backbone(frames)
        if hasattr(self, "neck"):
            features = self.neck(features)
        maps = getattr(self, self.head_name)(features)
        return (features, maps) if self.two_stage else maps


def trunk_of(detector: BaseDetector) -> nn.Module:
    """The part of ``detector`` that runs block-sparse, as one network over (N, 3, H, W) frames: backbone,
    neck and dense head of a single-stage detector; backbone, neck and RPN head of a two-stage one."""
    if isinstance(detector, (SingleStageDetector, TwoStageDetector)):
        return _Trunk(detector)
    raise TypeError(f"BlockCopy accelerates single-stage and two-stage detectors (SingleStageDetector / "
                    f"TwoStageDetector subclasses), got {type(detector).__name__}")


def predict_from_trunk(detector: BaseDetector, outputs, batch_data_samples: SampleList,
                       rescale: bool = True) -> list[InstanceData]:
    """The detections of N frames from the outputs of :func:`trunk_of` ``(detector)``: the dense head's
    decoding and NMS, or the proposals and the ROI head on the features, as the detector's ``predict``
    does them.

    fp16/bf16 maps are decoded in fp32 (box coordinates of 2048-px frames need its precision); a two-stage
    detector's ROI head then runs under autocast in the network's dtype (RoIAlign in fp32, its convolutions
    and FC layers in fp16/bf16), whichever dtype its own weights have."""
    leaves = [t for t in pytree.tree_leaves(outputs) if torch.is_tensor(t) and t.is_floating_point()]
    dtype = leaves[0].dtype if leaves else torch.float32
    outputs = pytree.tree_map(lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t, outputs)
    metas = [sample.metainfo for sample in batch_data_samples]
    if isinstance(detector, TwoStageDetector):
        features, rpn_maps = outputs
        proposals = detector.rpn_head.predict_by_feat(*rpn_maps, batch_img_metas=metas, rescale=False)
        with torch.autocast(features[0].device.type, dtype=dtype, enabled=dtype != torch.float32):
            results = detector.roi_head.predict(features, proposals, batch_data_samples, rescale=rescale)
        for result in results:  # autocast leaves the scores in the network's dtype
            result.scores, result.bboxes = result.scores.float(), result.bboxes.float()
        return results
    return detector.bbox_head.predict_by_feat(*outputs, batch_img_metas=metas, rescale=rescale)


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
            ``update_interval``, ``buckets``, ``cuda_graphs``, ``dense_when_full``, ``compile``, ``warmup_clips``,
            ``online_learning``, ``capture_loop``, ``compile_loop``); missing ones keep the method's defaults.
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
        trunk = trunk_of(plain)
        num_classes = (plain.roi_head.bbox_head if isinstance(plain, TwoStageDetector) else plain.bbox_head).num_classes
        # The plain detector's children become the wrapper's (the same dict): same names, same state_dict.
        self._modules = plain._modules
        object.__setattr__(self, "detector", plain)
        config = BlockCopyConfig.from_dict(blockcopy or {})
        self._raise_padding(config.block_size)
        classes = list(range(num_classes)) if classes is None else list(classes)
        if not classes or min(classes) < 0 or max(classes) >= num_classes:
            raise ConfigError("classes", classes,
                              f"labels of the detector's {num_classes} classes (0..{num_classes - 1})")
        self.eval()
        sparse = convert(trunk.eval(), config=config)
        adapter = InstanceDataAdapter(classes, score_threshold, input_format(self.data_preprocessor),
                                      max_detections=max_detections(plain))
        self._set_blockcopy(BlockCopy(sparse, adapter, config))
        self._init_video()
        # the last time step's StepResult (grid, IG map, detections in frame pixels) and (N, 3, H, W) frames
        self.last_step, self.last_frames = None, None
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
        results = predict_from_trunk(self.detector, self.sparse(batch_inputs, grid), batch_data_samples, rescale)
        frame_results = [_in_frame_pixels(r, meta) if rescale else r for r, meta in zip(results, metas)]
        step = self.blockcopy.observe(self.blockcopy.adapter.detect(frame_results, tuple(batch_inputs.shape[-2:])))
        self._count(step, any(meta.get("annotated", True) for meta in metas))
        self.last_step, self.last_frames = step, batch_inputs
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
