"""What BlockCopy needs to know about Detectron2's outputs: information gain and the policy's input
masks from ``Instances``, and the pixel format of Detectron2's normalised images."""
from __future__ import annotations

import torch
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.structures import Instances

from blockcopy_core.adapters import DetectionAdapter, Detections, FrameSize, InputFormat
from blockcopy_core.information_gain import mask_information_gain


def input_format(cfg) -> InputFormat:
    """The pixels BlockCopy's policy reads back from Detectron2's normalised images
    (``cfg.MODEL.PIXEL_MEAN``, ``PIXEL_STD``, ``INPUT.FORMAT``; 8-bit frames)."""
    if cfg.INPUT.FORMAT not in ("BGR", "RGB"):
        raise ValueError(f"BlockCopy's policy reads colour frames; INPUT.FORMAT {cfg.INPUT.FORMAT!r} is not "
                         "'BGR' or 'RGB'")
    return InputFormat(tuple(cfg.MODEL.PIXEL_MEAN), tuple(cfg.MODEL.PIXEL_STD), cfg.INPUT.FORMAT, 255.0)


class InstancesAdapter(DetectionAdapter):
    """IG (method.md Algorithm 1) and O_t from Detectron2 ``Instances`` in network-input coordinates.

    A result is a list of ``Instances`` (one per stream) with ``pred_boxes``, ``scores``,
    ``pred_classes`` and, for instance segmentation, ``pred_masks`` (R, 1, M, M) mask probabilities
    relative to the boxes, as the ROI heads return them before post-processing. With ``use_masks`` the
    IG matches instances by mask IoU and paints masks, and O_t paints masks; otherwise both use boxes.
    Masks are pasted at the IG stride with Detectron2's own ``paste_masks_in_image``.

    Args:
        num_classes: the detector's classes (the policy sees one mask per class).
        score_threshold: detections below it are ignored by IG and O_t.
        frame_format: how the detector's images encode pixels (:func:`input_format`).
        use_masks: instance segmentation (mask IoU) rather than boxes.
        stride: pixels per cell of the IG map and of O_t.
        max_detections: the detector's ``TEST.DETECTIONS_PER_IMAGE``; with boxes, BlockCopy's captured loop
            takes results padded to it (:meth:`fixed_result`: detection dicts rather than ``Instances``).
    """

    def __init__(self, num_classes: int, score_threshold: float, frame_format: InputFormat,
                 use_masks: bool = False, stride: int = 4, max_detections: int | None = None) -> None:
        super().__init__(tuple(range(num_classes)), score_threshold, stride, True, frame_format, max_detections)
        self.use_masks = use_masks

    @property
    def fixes_results(self) -> bool:
        return not self.use_masks and self.max_detections is not None

    def fixed_result(self, result: list[Instances], frame_size: FrameSize) -> Detections:
        """The boxes, scores and labels of each stream padded to ``max_detections`` (box IG only)."""
        return super().fixed_result(self.detect(result, frame_size), frame_size)

    def detect(self, outputs: list[Instances] | Detections, frame_size: FrameSize) -> Detections:
        """Per stream ``{"boxes", "scores", "labels"}`` of the instances (detection dicts pass through)."""
        return [r if isinstance(r, dict) else {"boxes": r.pred_boxes.tensor, "scores": r.scores,
                                               "labels": r.pred_classes} for r in outputs]

    def information_gain(self, result: list[Instances], prev_result: list[Instances],
                         frame_size: FrameSize) -> torch.Tensor:
        if not self.use_masks:
            return super().information_gain(self.detect(result, frame_size), self.detect(prev_result, frame_size),
                                            frame_size)
        maps = []
        for current, previous in zip(self._relevant(result), self._relevant(prev_result)):
            masks, prev_masks = (self._paste(r, frame_size) for r in (current, previous))
            maps.append(mask_information_gain(masks, current.scores, prev_masks, previous.scores,
                                              current.pred_classes, previous.pred_classes))
        return torch.stack(maps)

    def output_masks(self, result: list[Instances], frame_size: FrameSize) -> torch.Tensor:
        if not self.use_masks:
            return super().output_masks(self.detect(result, frame_size), frame_size)
        rows, cols = frame_size[0] // self.stride, frame_size[1] // self.stride
        out = []
        for instances in self._relevant(result):
            painted = self._paste(instances, frame_size).float() * instances.scores.float()[:, None, None]
            masks = painted.new_zeros(len(self.classes), rows * cols)
            channel = instances.pred_classes[:, None].expand(-1, rows * cols)
            out.append(masks.scatter_reduce_(0, channel, painted.flatten(1), "amax").view(-1, rows, cols))
        return torch.stack(out)

    def _relevant(self, result: list[Instances]) -> list[Instances]:
        """Per stream, the instances IG and O_t use: score >= ``score_threshold``."""
        return [r[r.scores >= self.score_threshold] for r in result]

    def _paste(self, instances: Instances, frame_size: FrameSize) -> torch.Tensor:
        """(K, H / stride, W / stride) bool masks of ``instances`` on the frame's IG grid."""
        rows, cols = frame_size[0] // self.stride, frame_size[1] // self.stride
        if len(instances) == 0:
            return torch.zeros(0, rows, cols, dtype=torch.bool, device=instances.scores.device)
        boxes = instances.pred_boxes.tensor / self.stride
        return paste_masks_in_image(instances.pred_masks[:, 0], boxes, (rows, cols)).bool()
