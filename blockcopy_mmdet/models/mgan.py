"""MGAN (Pang et al., "Mask-Guided Attention Network for Occluded Pedestrian Detection", ICCV 2019) as
Pedestron runs it at test time, on MMDetection 3's two-stage detector: inference only.

The detector is a ``TwoStageDetector``: ``backbone`` (:class:`~blockcopy_mmdet.models.vgg.VGGStride8`, one
stride-8 map), no neck, ``rpn_head`` (MMDetection's ``RPNHead``) and ``roi_head``
(:class:`MGANRoIHead`: RoIAlign, the mask-guided attention :class:`MGANAttention`, the shared-FC box
head). Pedestron's MGAN keeps its RoI extractor, attention and box head on the detector itself; here they
live in the RoI head, so its keys are ``roi_head.mgan_head.*`` and ``roi_head.bbox_head.*``
(:func:`blockcopy_mmdet.models.mgan_convert.convert_pedestron_mgan` maps Pedestron's checkpoints).
"""
from __future__ import annotations

import torch
from mmcv.cnn import ConvModule
from mmdet.models.detectors import TwoStageDetector
from mmdet.models.roi_heads import StandardRoIHead
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from torch import nn

INFERENCE_ONLY = ("{} is inference only: it reproduces Pedestron's test-time MGAN, whose training also "
                  "supervises the attention map with visible-box masks (use Pedestron to train)")


@MODELS.register_module()
class MGANAttention(BaseModule):
    """The mask-guided attention module (Pedestron's ``MGANHead``) at test time.

    ``num_convs`` 3x3 convolutions with bias and ReLU turn the RoI features into ``conv_channels`` maps
    F; a 1x1 convolution and a sigmoid give a one-channel attention map A; the output is ``A * F``. As in
    Pedestron, the map weights the convolved features F, not the pooled RoI features it was computed
    from.

    Shapes: (K, in_channels, S, S) -> (K, conv_channels, S, S).
    """

    def __init__(self, in_channels: int = 512, conv_channels: int = 512, num_convs: int = 2,
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if num_convs < 1:
            raise ValueError(f"MGANAttention needs at least one convolution, got num_convs={num_convs}")
        self.convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else conv_channels, conv_channels, 3, padding=1)
            for i in range(num_convs))
        self.conv_logits = nn.Conv2d(conv_channels, 1, 1)

    def attention(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention map (K, 1, S, S) in [0, 1] and the convolved features (K, conv_channels, S, S)."""
        for conv in self.convs:
            features = conv(features)
        return self.conv_logits(features).sigmoid(), features

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        attention, features = self.attention(roi_features)
        return attention * features


@MODELS.register_module()
class MGANRoIHead(StandardRoIHead):
    """``StandardRoIHead`` whose box branch applies the mask-guided attention between RoI pooling and the
    box head: ``bbox_head(mgan_head(bbox_roi_extractor(x, rois)))``.

    Args:
        mgan_head: config of the attention module (e.g. ``dict(type='MGANAttention')``).
        **kwargs: ``StandardRoIHead``'s (``bbox_roi_extractor``, ``bbox_head``, ``test_cfg``, ...).
    """

    def __init__(self, mgan_head: dict, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mgan_head = MODELS.build(mgan_head)

    def _bbox_forward(self, x: tuple[torch.Tensor, ...], rois: torch.Tensor) -> dict:
        """x: the feature maps (N, C, H, W); rois (K, 5) -> cls_score (K, num_classes + 1), bbox_pred
        (K, 4 or 4 * num_classes) and the attended bbox_feats (K, C', S, S)."""
        bbox_feats = self.bbox_roi_extractor(x[:self.bbox_roi_extractor.num_inputs], rois)
        if self.with_shared_head:
            bbox_feats = self.shared_head(bbox_feats)
        bbox_feats = self.mgan_head(bbox_feats)
        cls_score, bbox_pred = self.bbox_head(bbox_feats)
        return {"cls_score": cls_score, "bbox_pred": bbox_pred, "bbox_feats": bbox_feats}

    def loss(self, *args, **kwargs):
        raise NotImplementedError(INFERENCE_ONLY.format(type(self).__name__))


@MODELS.register_module()
class MGAN(TwoStageDetector):
    """MGAN as a ``TwoStageDetector`` (``extract_feat``, ``rpn_head``, ``roi_head``, ``predict`` are
    MMDetection's); inference only."""

    def loss(self, *args, **kwargs):
        raise NotImplementedError(INFERENCE_ONLY.format(type(self).__name__))
