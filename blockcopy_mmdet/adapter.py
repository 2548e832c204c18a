"""What BlockCopy needs to know about MMDetection: the detections of ``InstanceData`` results and the pixel
format of the images the data preprocessor produces."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from mmengine.structures import InstanceData

from blockcopy_core.adapters import DetectionAdapter, Detections, FrameSize, InputFormat


def input_format(data_preprocessor: torch.nn.Module) -> InputFormat:
    """The pixels BlockCopy's policy reads back from a ``DetDataPreprocessor``'s images: its ``mean`` and
    ``std`` (when it normalises) and the channel order after its optional BGR/RGB swap (images load as
    BGR, MMCV's default), 8-bit frames."""
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if getattr(data_preprocessor, "_enable_normalize", False):
        mean = tuple(data_preprocessor.mean.flatten().tolist())
        std = tuple(data_preprocessor.std.flatten().tolist())
    if len(mean) != 3:
        raise ValueError(f"BlockCopy's policy reads colour frames; the data preprocessor normalises "
                         f"{len(mean)} channels")
    swapped = getattr(data_preprocessor, "_channel_conversion", False)
    return InputFormat(mean, std, "RGB" if swapped else "BGR", 255.0)


def max_detections(detector: torch.nn.Module) -> int | None:
    """The most detections ``detector`` returns per image: its test config's ``max_per_img`` (a two-stage
    detector's ``rcnn`` stage), or None where it sets no positive bound."""
    test_cfg = getattr(detector, "test_cfg", None) or {}
    if "rcnn" in test_cfg:
        test_cfg = test_cfg["rcnn"] or {}
    value = test_cfg.get("max_per_img", -1) if hasattr(test_cfg, "get") else -1
    return int(value) if value and value > 0 else None


class InstanceDataAdapter(DetectionAdapter):
    """IG (method.md Algorithm 1) and the policy's masks O_t from MMDetection detections.

    A result is a list of ``InstanceData`` (one per stream) with ``bboxes`` (K, 4) x1y1x2y2 in pixels of
    the network's input frame, ``scores`` (K,) and ``labels`` (K,).

    Args:
        classes: the labels the policy sees (one mask channel each) and IG counts.
        score_threshold: detections below it are ignored by IG and O_t.
        frame_format: how the detector's input frames encode pixels (:func:`input_format`).
        stride: pixels per cell of the IG map and of O_t.
        max_detections: the detector's ``max_per_img`` (None: unbounded); bounds the padded results of
            BlockCopy's captured loop (:meth:`~blockcopy_core.adapters.DetectionAdapter.fixed_result`).
    """

    def __init__(self, classes: Sequence[int], score_threshold: float, frame_format: InputFormat,
                 stride: int = 4, max_detections: int | None = None) -> None:
        super().__init__(classes, score_threshold, stride, True, frame_format, max_detections)

    def detect(self, outputs: list[InstanceData], frame_size: FrameSize) -> Detections:
        """Per stream ``{"boxes", "scores", "labels"}`` of the instances."""
        return [{"boxes": r.bboxes, "scores": r.scores, "labels": r.labels} for r in outputs]
