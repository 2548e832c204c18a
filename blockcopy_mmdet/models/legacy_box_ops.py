"""MMDetection 0.6's box conventions (Pedestron's base) where MMDetection 3's legacy components differ.

Pedestron is MMDetection 0.6. MMDetection 3 reproduces most of its "+1 pixel" conventions with its
``Legacy*`` components (``LegacyAnchorGenerator`` with ``center_offset=0.5``, ``LegacyDeltaXYWHBBoxCoder``'s
encoding, NMS with ``offset=1``), but not these two, which this module supplies:

* box decoding: 0.6 places the decoded corners half a pixel inside, ``x1 = cx - w / 2 + 0.5`` and
  ``x2 = cx + w / 2 - 0.5``, so that ``x2 - x1 + 1`` is the decoded width; MMDetection 3's legacy decoder
  drops the half pixels (its boxes are one pixel wider and taller);
* RoIAlign: 0.6's kernel pools the box from ``x1 * scale`` to ``(x2 + 1) * scale`` (one pixel more than
  MMCV's ``aligned=False``) and clamps negative extents to 0 (MMCV's ``aligned=False`` clamps them up
  to one feature cell).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from mmcv.ops import roi_align
from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
from mmdet.models.task_modules.coders import LegacyDeltaXYWHBBoxCoder
from mmdet.models.task_modules.coders.legacy_delta_xywh_bbox_coder import legacy_delta2bbox
from mmdet.registry import MODELS, TASK_UTILS
from mmdet.structures.bbox import BaseBoxes, HorizontalBoxes, get_box_tensor
from torch import nn
from torch.nn.modules.utils import _pair


@TASK_UTILS.register_module()
class PedestronDeltaXYWHBBoxCoder(LegacyDeltaXYWHBBoxCoder):
    """MMDetection 0.6's delta coder: ``LegacyDeltaXYWHBBoxCoder`` (same encoding, widths ``x2 - x1 + 1``)
    whose decoded corners lie half a pixel inside, as 0.6's ``delta2bbox`` puts them, so that decoding
    inverts the encoding exactly.

    ``decode(boxes, deltas, max_shape)``: boxes (K, 4) x1y1x2y2, deltas (K, 4 * M) for M boxes per row
    (e.g. one per class) -> (K, 4 * M), clamped to ``[0, W - 1] x [0, H - 1]`` when ``max_shape`` is
    ``(H, W)``.
    """

    def decode(self, bboxes: torch.Tensor | BaseBoxes, pred_bboxes: torch.Tensor,
               max_shape: Sequence[int] | None = None,
               wh_ratio_clip: float = 16 / 1000) -> torch.Tensor | BaseBoxes:
        bboxes = get_box_tensor(bboxes)
        if pred_bboxes.dim() != 2 or pred_bboxes.size(0) != bboxes.size(0) or pred_bboxes.size(1) % 4:
            raise ValueError(f"deltas must be (K, 4 * M) for {bboxes.size(0)} boxes, got "
                             f"{tuple(pred_bboxes.shape)}")
        decoded = legacy_delta2bbox(bboxes, pred_bboxes, self.means, self.stds, None, wh_ratio_clip)
        corners = decoded.view(decoded.size(0), -1, 4)
        corners = corners + corners.new_tensor([0.5, 0.5, -0.5, -0.5])
        if max_shape is not None:
            height, width = max_shape[:2]
            corners[..., 0::2] = corners[..., 0::2].clamp(min=0, max=width - 1)
            corners[..., 1::2] = corners[..., 1::2].clamp(min=0, max=height - 1)
        decoded = corners.view_as(pred_bboxes)
        if self.use_box_type:
            if decoded.size(-1) != 4:
                raise ValueError("cannot wrap (K, 4 * M) decoded boxes with M > 1 as a box type")
            decoded = HorizontalBoxes(decoded)
        return decoded


class LegacyRoIAlign(nn.Module):
    """MMDetection 0.6's RoIAlign, computed by MMCV's ``roi_align`` in its ``aligned=True`` mode.

    0.6 samples the box from ``x1 * s`` to ``(x2 + 1) * s`` (``s`` the spatial scale) with extents clamped
    at 0; ``aligned=True`` samples from ``x1' * s - 0.5`` to ``x2' * s - 0.5`` without clamping, so
    ``x1' = x1 + 0.5 / s`` and ``x2' = max(x2 + 1, x1) + 0.5 / s`` give the same sampling points (the
    bilinear interpolation and the averaging over ``sampling_ratio``^2 points per bin are the same in
    both). ``sampling_ratio`` 0 samples ``ceil(extent / output_size)`` points per bin, as 0.6's 0 did.

    Shapes: features (N, C, H, W), rois (K, 5) as (batch index, x1, y1, x2, y2) in input pixels ->
    (K, C, *output_size).
    """

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float, sampling_ratio: int = 2) -> None:
        super().__init__()
        if sampling_ratio < 0:
            raise ValueError(f"sampling_ratio must be >= 0 (0: adaptive), got {sampling_ratio}")
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if rois.dim() != 2 or rois.size(1) != 5:
            raise ValueError(f"rois must be (K, 5) rows of (batch index, x1, y1, x2, y2), got {tuple(rois.shape)}")
        starts = rois[:, 1:3]
        ends = torch.maximum(rois[:, 3:5] + 1, starts)
        half_cell = 0.5 / self.spatial_scale
        shifted = torch.cat([rois[:, :1], starts + half_cell, ends + half_cell], dim=1)
        return roi_align(features, shifted, self.output_size, self.spatial_scale, self.sampling_ratio, "avg", True)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, " \
               f"sampling_ratio={self.sampling_ratio}"


@MODELS.register_module()
class LegacySingleRoIExtractor(SingleRoIExtractor):
    """``SingleRoIExtractor`` on one feature map that also knows ``roi_layer=dict(type='LegacyRoIAlign', ...)``
    (:class:`LegacyRoIAlign`; other types are MMCV's ops, as in ``SingleRoIExtractor``).

    Only one level: MMDetection 3's level mapping of RoIs measures boxes without 0.6's +1, so several
    levels would not reproduce 0.6.

    Shapes: feats a one-tuple of (N, C, H, W), rois (K, 5) -> (K, C, *output_size).
    """

    def __init__(self, roi_layer: dict, out_channels: int, featmap_strides: Sequence[int], **kwargs) -> None:
        if len(featmap_strides) != 1:
            raise ValueError(f"LegacySingleRoIExtractor pools one feature map, got featmap_strides "
                             f"{list(featmap_strides)}")
        super().__init__(roi_layer, out_channels, featmap_strides, **kwargs)

    def build_roi_layers(self, layer_cfg: dict, featmap_strides: Sequence[int]) -> nn.ModuleList:
        cfg = dict(layer_cfg)
        if cfg.get("type") == "LegacyRoIAlign":
            cfg["type"] = LegacyRoIAlign
        return super().build_roi_layers(cfg, featmap_strides)
