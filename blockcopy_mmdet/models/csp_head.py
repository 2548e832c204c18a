"""CSP's head (Pedestron's ``CSPHead``, inference): per position a pedestrian center score, a log height and
a center offset, decoded into boxes of a fixed aspect ratio."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from mmcv.cnn import ConvModule, Scale
from mmcv.ops import batched_nms
from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
from mmdet.models.utils import multi_apply
from mmdet.registry import MODELS
from mmengine.structures import InstanceData
from torch import Tensor, nn

INFERENCE_ONLY = "CSPHead runs inference only: CSP's training losses are not implemented"
GROUP_NORM = {"type": "GN", "num_groups": 32, "requires_grad": True}
# Pedestron's initialisation: N(0, 0.01) convolutions, center logits starting at a prior of 0.01.
INIT_CFG = {"type": "Normal", "layer": "Conv2d", "std": 0.01,
            "override": {"type": "Normal", "name": "center_predictor", "std": 0.01, "bias_prob": 0.01}}


@MODELS.register_module()
class CSPHead(BaseDenseHead):
    """Center, scale and offset branches on each input level, and their decoding into boxes.

    Each branch is ``stacked_convs`` 3x3 conv + norm + ReLU modules, then a 3x3 predictor: the center
    branch gives ``num_classes`` logits, the scale branch the log of the box height in units of the
    level's stride, the offset branch the (dy, dx) shift of the box center from the cell's center, in
    units of the stride. The scale and offset predictions are multiplied by learned scalars (one per level).

    Decoding a cell (row i, column j) at stride s: center ``(j * s + s // 2 + dx * s, i * s + s // 2 + dy * s)``,
    height ``h = exp(log_h) * s``, width ``wh_ratio * h``; boxes are clipped to the image, scores are the
    sigmoid of the center logits.

    Args:
        num_classes: center channels (1: pedestrians).
        in_channels: channels of the input maps (CSP's neck: 3 x 256).
        feat_channels: channels of the branches' hidden convolutions.
        stacked_convs: hidden conv modules per branch.
        strides: stride of each input level (CSP: one level at stride 4).
        wh_ratio: box width over height.
        conv_cfg, norm_cfg: of the hidden conv modules (CSP: GroupNorm with 32 groups).
        train_cfg: unused (inference only); test_cfg: ``nms_pre`` (candidates kept per level by score
            before decoding), ``score_thr``, ``nms`` (mmcv's ``batched_nms`` config), ``max_per_img``.
    """

    def __init__(self, num_classes: int = 1, in_channels: int = 768, feat_channels: int = 256, stacked_convs: int = 1,
                 strides: Sequence[int] = (4,), wh_ratio: float = 0.41, conv_cfg: dict | None = None,
                 norm_cfg: dict | None = GROUP_NORM, train_cfg: dict | None = None, test_cfg: dict | None = None,
                 init_cfg: dict | list[dict] | None = INIT_CFG) -> None:
        super().__init__(init_cfg=copy.deepcopy(init_cfg))
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.strides = tuple(strides)
        self.wh_ratio = wh_ratio
        self.train_cfg = train_cfg
        self.test_cfg = test_cfg

        def branch() -> nn.ModuleList:
            return nn.ModuleList(
                ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3, padding=1,
                           conv_cfg=conv_cfg, norm_cfg=copy.deepcopy(norm_cfg))
                for i in range(stacked_convs))

        self.center_convs = branch()
        self.scale_convs = branch()
        self.offset_convs = branch()
        # Not named conv_offset: BaseDenseHead.init_weights zeroes any module of that name (meant for DCN).
        self.center_predictor = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.scale_predictor = nn.Conv2d(feat_channels, 1, 3, padding=1)
        self.offset_predictor = nn.Conv2d(feat_channels, 2, 3, padding=1)
        self.scale_multipliers = nn.ModuleList(Scale(1.0) for _ in self.strides)
        self.offset_multipliers = nn.ModuleList(Scale(1.0) for _ in self.strides)

    def forward(self, x: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """``x``: one (N, in_channels, H / s, W / s) map per stride s of ``strides``.

        Returns per-level lists: center logits (N, num_classes, H / s, W / s), log heights
        (N, 1, H / s, W / s) and center offsets (dy, dx) (N, 2, H / s, W / s).
        """
        if len(x) != len(self.strides):
            raise ValueError(f"CSPHead has {len(self.strides)} levels (strides {self.strides}), got {len(x)} "
                             "feature maps")
        return multi_apply(self.forward_single, x, self.scale_multipliers, self.offset_multipliers)

    def forward_single(self, x: Tensor, scale_multiplier: Scale, offset_multiplier: Scale
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """One level: (N, in_channels, h, w) -> (N, num_classes, h, w), (N, 1, h, w), (N, 2, h, w)."""
        center = scale = offset = x
        for layer in self.center_convs:
            center = layer(center)
        center = self.center_predictor(center)
        for layer in self.scale_convs:
            scale = layer(scale)
        # Cast to fp32 where Pedestron does (after the scale's multiplier, before the offset's), so that
        # fp16 models give Pedestron's results too.
        scale = scale_multiplier(self.scale_predictor(scale)).float()
        for layer in self.offset_convs:
            offset = layer(offset)
        offset = offset_multiplier(self.offset_predictor(offset).float())
        return center, scale, offset

    def loss_by_feat(self, *args, **kwargs) -> dict:
        raise NotImplementedError(INFERENCE_ONLY)

    def predict_by_feat(self, center_preds: Sequence[Tensor], scale_preds: Sequence[Tensor],
                        offset_preds: Sequence[Tensor], batch_img_metas: Sequence[dict] | None = None, cfg=None,
                        rescale: bool = False, with_nms: bool = True) -> list[InstanceData]:
        """Boxes of each image from the maps :meth:`forward` returns.

        Per level the ``nms_pre`` best-scoring cells are decoded and clipped to the image's ``img_shape``
        (h, w); with ``rescale`` the boxes are divided by its ``scale_factor`` (w, h) into the original
        image; cells with a score above ``score_thr`` are kept, then (``with_nms``) non-maximum suppressed
        per class and cut to the ``max_per_img`` best. Each result has ``bboxes`` (K, 4) x1y1x2y2,
        ``scores`` (K,) and ``labels`` (K,) (class indices, 0 for pedestrians), best score first after NMS.
        """
        cfg = self.test_cfg if cfg is None else cfg
        if cfg is None:
            raise ValueError("CSPHead.predict_by_feat needs a test config (test_cfg with score_thr, nms, "
                             "max_per_img); pass cfg= or build the head with test_cfg")
        if not len(center_preds) == len(scale_preds) == len(offset_preds) == len(self.strides):
            raise ValueError(f"CSPHead has {len(self.strides)} levels, got {len(center_preds)} center, "
                             f"{len(scale_preds)} scale and {len(offset_preds)} offset maps")
        if batch_img_metas is None or len(batch_img_metas) != len(center_preds[0]):
            raise ValueError(f"CSPHead.predict_by_feat needs one image meta per image ({len(center_preds[0])}), "
                             f"got {None if batch_img_metas is None else len(batch_img_metas)}")
        img_shapes = [_meta(meta, "img_shape")[:2] for meta in batch_img_metas]
        decoded = [self._decode_level(c, s, o, stride, img_shapes, cfg.get("nms_pre", -1))
                   for c, s, o, stride in zip(center_preds, scale_preds, offset_preds, self.strides)]
        bboxes = torch.cat([b for b, _ in decoded], dim=1)
        scores = torch.cat([s for _, s in decoded], dim=1)
        if rescale:
            factors = [_meta(meta, "scale_factor")[:2] for meta in batch_img_metas]
            bboxes = bboxes / bboxes.new_tensor([[w, h, w, h] for w, h in factors])[:, None]
        return [self._select(b, s, cfg, with_nms) for b, s in zip(bboxes, scores)]

    def _decode_level(self, center: Tensor, scale: Tensor, offset: Tensor, stride: int,
                      img_shapes: Sequence[Sequence[int]], nms_pre: int) -> tuple[Tensor, Tensor]:
        """The N images' maps of one level -> boxes (N, K, 4) and scores (N, K, num_classes), K <= nms_pre.
        All images at once: per image, the same small ops cost a frame of N streams N times the launches."""
        n = center.shape[0]
        if center.shape[-2:] != scale.shape[-2:] or center.shape[-2:] != offset.shape[-2:] or \
                scale.shape[1] != 1 or offset.shape[1] != 2 or center.shape[1] != self.num_classes:
            raise ValueError(f"CSPHead maps of one level must be ({self.num_classes}, h, w) centers, (1, h, w) "
                             f"scales and (2, h, w) offsets, got {tuple(center.shape[1:])}, "
                             f"{tuple(scale.shape[1:])} and {tuple(offset.shape[1:])}")
        h, w = center.shape[-2:]
        # Decoded in fp32 whatever the model's precision, as Pedestron's get_bboxes (force_fp32).
        scores = center.float().permute(0, 2, 3, 1).reshape(n, -1, self.num_classes).sigmoid()
        heights = scale.float().reshape(n, -1).exp()
        offsets = offset.float().permute(0, 2, 3, 1).reshape(n, -1, 2)
        rows, cols = torch.meshgrid(torch.arange(h, device=scale.device), torch.arange(w, device=scale.device),
                                    indexing="ij")
        # Cell centers as Pedestron computes them: the stride-aligned corner plus stride // 2.
        points = torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=-1).float() * stride + stride // 2
        if 0 < nms_pre < scores.shape[1]:
            keep = scores.max(dim=2).values.topk(nms_pre, dim=1).indices  # (N, K)
            scores = scores.gather(1, keep[..., None].expand(-1, -1, self.num_classes))
            heights, offsets = heights.gather(1, keep), offsets.gather(1, keep[..., None].expand(-1, -1, 2))
            points = points[keep]
        x = points[..., 0] + offsets[..., 1] * stride
        y = points[..., 1] + offsets[..., 0] * stride
        heights = heights * stride
        half_width = self.wh_ratio * heights / 2
        half_height = heights * 0.5
        last = x.new_tensor([[w - 1, h - 1, w - 1, h - 1] for h, w in img_shapes])[:, None]  # (N, 1, 4)
        bboxes = torch.stack([x - half_width, y - half_height, x + half_width, y + half_height], dim=-1)
        return torch.minimum(bboxes.clamp_min(0), last), scores

    @staticmethod
    def _select(bboxes: Tensor, scores: Tensor, cfg, with_nms: bool) -> InstanceData:
        """One image's boxes (K, 4) with scores (K, C) -> the (box, class) pairs above the score threshold,
        after NMS. Per image: one NMS over the boxes of all images costs O((N K)^2) instead of N K^2 (on the
        CPU 27 against 20 ms for four 2048x1024 frames with 1000 candidates each)."""
        cells, labels = (scores > cfg.get("score_thr", 0.0)).nonzero(as_tuple=True)
        bboxes, scores = bboxes[cells], scores[cells, labels]
        if with_nms and len(bboxes):
            if cfg.get("nms") is None:
                raise ValueError("CSPHead's test config has no 'nms' (e.g. dict(type='nms', iou_threshold=0.5))")
            dets, keep = batched_nms(bboxes, scores, labels, cfg["nms"])
            bboxes, scores, labels = bboxes[keep], dets[:, -1], labels[keep]
            max_per_img = cfg.get("max_per_img", -1)
            if max_per_img > 0:
                bboxes, scores, labels = bboxes[:max_per_img], scores[:max_per_img], labels[:max_per_img]
        return InstanceData(bboxes=bboxes, scores=scores, labels=labels)


def _meta(meta: dict, key: str):
    if key not in meta:
        raise KeyError(f"CSPHead needs the image meta {key!r}; this image's metas have {sorted(meta)}")
    return meta[key]
