"""What BlockCopy needs to know about Detectron2's outputs: information gain and the policy's input
masks from ``Instances``, and the pixel format of Detectron2's normalised images."""
from __future__ import annotations

import torch
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.structures import Instances

from blockcopy_core.adapters import DetectionAdapter, Detections, FrameSize, InputFormat, capturing, ig_pool_size
from blockcopy_core.information_gain import mask_information_gain, padded_mask_information_gain, pool_to_blocks


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
        max_detections: the detector's ``TEST.DETECTIONS_PER_IMAGE``; BlockCopy's captured loop takes
            results padded to it (:meth:`fixed_result`: detection dicts rather than ``Instances``; IG and
            O_t take either).
    """

    def __init__(self, num_classes: int, score_threshold: float, frame_format: InputFormat,
                 use_masks: bool = False, stride: int = 4, max_detections: int | None = None) -> None:
        super().__init__(tuple(range(num_classes)), score_threshold, stride, True, frame_format, max_detections)
        self.use_masks = use_masks

    def fixed_result(self, result: list[Instances] | Detections, frame_size: FrameSize) -> Detections:
        """Each stream's boxes, scores, labels (and masks) padded to ``max_detections``
        (:meth:`DetectionAdapter.fixed_result`), as detection dicts."""
        return super().fixed_result(self.detect(result, frame_size), frame_size)

    def detect(self, outputs: list[Instances] | Detections, frame_size: FrameSize) -> Detections:
        """Per stream ``{"boxes", "scores", "labels"}`` of the instances, and with ``use_masks`` ``"masks"``
        (K, M, M), the mask probabilities relative to the boxes (detection dicts pass through)."""
        detections = []
        for r in outputs:
            if not isinstance(r, dict):
                dets = {"boxes": r.pred_boxes.tensor, "scores": r.scores, "labels": r.pred_classes}
                if self.use_masks:
                    dets["masks"] = r.pred_masks[:, 0]
                r = dets
            detections.append(r)
        return detections

    def information_gain(self, result: list[Instances] | Detections, prev_result: list[Instances] | Detections,
                         frame_size: FrameSize) -> torch.Tensor:
        current, previous = self.detect(result, frame_size), self.detect(prev_result, frame_size)
        if not self.use_masks:
            return super().information_gain(current, previous, frame_size)
        if capturing(current[0]["scores"].device):
            (masks, scores, labels, valid), (prev_masks, prev_scores, prev_labels, prev_valid) = (
                self._padded_instances(dets, frame_size) for dets in (current, previous))
            return padded_mask_information_gain(masks, scores, prev_masks, prev_scores, valid=valid,
                                                prev_valid=prev_valid, labels=labels, prev_labels=prev_labels)
        maps = []
        for now, before in zip(self.relevant(current), self.relevant(previous)):
            masks, prev_masks = (self._paste(dets, frame_size) for dets in (now, before))
            maps.append(mask_information_gain(masks, now["scores"], prev_masks, before["scores"], now["labels"],
                                              before["labels"]))
        return torch.stack(maps)

    def block_information_gain(self, result: list[Instances] | Detections,
                               prev_result: list[Instances] | Detections, frame_size: FrameSize,
                               block_size: int) -> torch.Tensor:
        if not self.use_masks:
            return super().block_information_gain(self.detect(result, frame_size),
                                                  self.detect(prev_result, frame_size), frame_size, block_size)
        ig_map = self.information_gain(result, prev_result, frame_size)
        return pool_to_blocks(ig_map, ig_pool_size(ig_map, frame_size, block_size))

    def output_masks(self, result: list[Instances] | Detections, frame_size: FrameSize) -> torch.Tensor:
        detections = self.detect(result, frame_size)
        if not self.use_masks:
            return super().output_masks(detections, frame_size)
        rows, cols = self._map_size(frame_size)
        if capturing(detections[0]["scores"].device):
            masks, scores, labels, valid = self._padded_instances(detections, frame_size)
            painted = masks.float() * torch.where(valid, scores.float(), 0.0)[..., None, None]
            streams, count = scores.shape
            channels = labels.clamp_min(0)[..., None].expand(streams, count, rows * cols)
            out = painted.new_zeros(streams, len(self.classes), rows * cols)
            return out.scatter_reduce_(1, channels, painted.flatten(2), "amax").view(streams, -1, rows, cols)
        out = []
        for dets in self.relevant(detections):
            painted = self._paste(dets, frame_size).float() * dets["scores"].float()[:, None, None]
            masks = painted.new_zeros(len(self.classes), rows * cols)
            channel = dets["labels"][:, None].expand(-1, rows * cols)
            out.append(masks.scatter_reduce_(0, channel, painted.flatten(1), "amax").view(-1, rows, cols))
        return torch.stack(out)

    def _padded_instances(self, detections: Detections, frame_size: FrameSize):
        """Streams of equal counts (fixed results) stacked: (N, K, H / stride, W / stride) pasted masks,
        (N, K) scores, labels and the relevant ones (``valid``), without host reads."""
        streams, count = len(detections), detections[0]["scores"].shape[0]
        boxes = torch.stack([dets["boxes"] for dets in detections]).flatten(0, 1)
        probabilities = torch.stack([dets["masks"] for dets in detections]).flatten(0, 1)
        scores = torch.stack([dets["scores"] for dets in detections])
        labels = torch.stack([dets["labels"] for dets in detections])
        masks = self._paste({"boxes": boxes, "masks": probabilities}, frame_size).view(streams, count,
                                                                                        *self._map_size(frame_size))
        return masks, scores, labels, self._relevance(scores, labels)

    def _paste(self, detections: dict[str, torch.Tensor], frame_size: FrameSize) -> torch.Tensor:
        """(K, H / stride, W / stride) bool masks of one stream's detections on the frame's IG grid."""
        rows, cols = self._map_size(frame_size)
        if detections["boxes"].shape[0] == 0:
            return torch.zeros(0, rows, cols, dtype=torch.bool, device=detections["boxes"].device)
        return paste_masks_in_image(detections["masks"], detections["boxes"] / self.stride, (rows, cols)).bool()
