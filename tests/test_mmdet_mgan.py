"""Pedestron's MGAN in MMDetection 3 (inference): the config, MMDetection 0.6's box conventions, the attention
module, checkpoint conversion against an independent re-implementation of Pedestron's test-time pipeline,
and block-sparse execution of backbone + RPN head (CPU, random weights)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("mmdet")

from mmcv.ops import RoIAlign
from mmdet.models.task_modules.coders import LegacyDeltaXYWHBBoxCoder
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.registry import init_default_scope
from oracle import check_against_oracle_and_dense

import blockcopy_core as bc
import blockcopy_mmdet.models  # noqa: F401  (registers the modules)
from blockcopy_mmdet.models.legacy_box_ops import LegacyRoIAlign, PedestronDeltaXYWHBBoxCoder
from blockcopy_mmdet.models.mgan import MGANAttention
from blockcopy_mmdet.models.mgan_convert import convert_pedestron_mgan

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "_base_" / "models" / "mgan_vgg16.py"
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
SCALES = (4.0, 5.4, 7.2, 9.8, 13.2, 17.9, 24.2, 33.0, 44.1, 59.6, 80.0)
# (index in backbone.features, in channels, out channels) of VGG-16's convolutions; pools at 4, 9, 16 (23 skipped)
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
               (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512),
               (28, 512, 512))


def build_mgan(**test_cfg) -> nn.Module:
    """MGAN from the config in eval mode; ``test_cfg`` overrides ``rpn``/``rcnn`` entries."""
    init_default_scope("mmdet")
    cfg = Config.fromfile(str(CONFIG))
    for stage, values in test_cfg.items():
        cfg.model.test_cfg[stage].update(values)
    model = MODELS.build(cfg.model)
    model.eval()
    return model


def pedestron_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A Pedestron MGAN checkpoint's state dict (its real names and shapes) with random values scaled to
    keep activations of order one, so that every layer shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def layer(name: str, out_channels: int, fan_in: int, shape: tuple, gain: float = math.sqrt(2)) -> None:
        sd[name + ".weight"] = torch.randn(out_channels, *shape, generator=g) * gain / math.sqrt(fan_in)
        sd[name + ".bias"] = torch.randn(out_channels, generator=g) * 0.1

    for index, cin, cout in VGG16_CONVS:
        layer(f"backbone.features.{index}", cout, cin * 9, (cin, 3, 3))
    layer("rpn_head.rpn_conv", 512, 512 * 9, (512, 3, 3))
    layer("rpn_head.rpn_cls", 11, 512, (512, 1, 1), gain=2.0)
    layer("rpn_head.rpn_reg", 44, 512, (512, 1, 1), gain=0.2)
    layer("mgan_head.convs.0.conv", 512, 512 * 9, (512, 3, 3))
    layer("mgan_head.convs.1.conv", 512, 512 * 9, (512, 3, 3))
    layer("mgan_head.conv_logits", 1, 512, (512, 1, 1), gain=1.0)
    layer("bbox_head.shared_fcs.0", 1024, 512 * 49, (512 * 49,))
    layer("bbox_head.shared_fcs.1", 1024, 1024, (1024,))
    layer("bbox_head.fc_cls", 2, 1024, (1024,), gain=2.0)
    layer("bbox_head.fc_reg", 8, 1024, (1024,), gain=0.5)
    return sd


# --- Pedestron's test-time computation, written from MMDetection 0.6's definitions ----------------------

def anchors_06(height: int, width: int) -> torch.Tensor:
    """0.6's anchors of the (height, width) stride-8 map: base size 8 centred at 3.5, rounded corners,
    positions row-major with the 11 scales innermost -> (height * width * 11, 4)."""
    scales = torch.tensor(SCALES)
    ws = 8 / math.sqrt(2.44) * scales
    hs = 8 * math.sqrt(2.44) * scales
    base = torch.stack([3.5 - 0.5 * (ws - 1), 3.5 - 0.5 * (hs - 1), 3.5 + 0.5 * (ws - 1), 3.5 + 0.5 * (hs - 1)], 1)
    ys, xs = torch.meshgrid(torch.arange(height) * 8.0, torch.arange(width) * 8.0, indexing="ij")
    shifts = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4)
    return (base.round()[None] + shifts).reshape(-1, 4)


def decode_06(boxes: torch.Tensor, deltas: torch.Tensor, stds, img_shape) -> torch.Tensor:
    """0.6's delta2bbox: boxes (K, 4), deltas (K, 4 * M) -> (K, M, 4), corners half a pixel inside."""
    d = deltas.view(len(deltas), -1, 4) * torch.tensor(stds)
    dw, dh = d[..., 2:].clamp(-abs(math.log(16 / 1000)), abs(math.log(16 / 1000))).unbind(-1)
    pw, ph = (boxes[:, 2] - boxes[:, 0] + 1)[:, None], (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
    cx = (boxes[:, 0] + boxes[:, 2])[:, None] * 0.5 + pw * d[..., 0]
    cy = (boxes[:, 1] + boxes[:, 3])[:, None] * 0.5 + ph * d[..., 1]
    w, h = pw * dw.exp(), ph * dh.exp()
    x1, x2 = (cx - w * 0.5 + 0.5).clamp(0, img_shape[1] - 1), (cx + w * 0.5 - 0.5).clamp(0, img_shape[1] - 1)
    y1, y2 = (cy - h * 0.5 + 0.5).clamp(0, img_shape[0] - 1), (cy + h * 0.5 - 0.5).clamp(0, img_shape[0] - 1)
    return torch.stack([x1, y1, x2, y2], -1)


def nms_06(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS with 0.6's areas (x2 - x1 + 1) * (y2 - y1 + 1): indices kept, by descending score."""
    order, keep = scores.argsort(descending=True, stable=True), []
    while order.numel():
        best, rest = order[0], order[1:]
        keep.append(best)
        a, b = boxes[best], boxes[rest]
        iw = (torch.minimum(a[2], b[:, 2]) - torch.maximum(a[0], b[:, 0]) + 1).clamp(min=0)
        ih = (torch.minimum(a[3], b[:, 3]) - torch.maximum(a[1], b[:, 1]) + 1).clamp(min=0)
        areas = (boxes[order, 2] - boxes[order, 0] + 1) * (boxes[order, 3] - boxes[order, 1] + 1)
        overlap = iw * ih / (areas[0] + areas[1:] - iw * ih)
        order = rest[overlap <= threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long)


def roi_align_06(features: torch.Tensor, rois: torch.Tensor, scale: float, size: int = 7,
                 samples: int = 2) -> torch.Tensor:
    """0.6's RoIAlign kernel: bins over [x1 * s, (x2 + 1) * s] (extent clamped at 0), ``samples``^2
    bilinear points per bin, points beyond one cell outside the map count 0 -> (K, C, size, size)."""
    height, width = features.shape[-2:]

    def axis(start, end, limit):
        step = (end - start).clamp(min=0) / size
        offsets = (torch.arange(size * samples) // samples) + (torch.arange(size * samples) % samples + 0.5) / samples
        p = start + offsets * step
        inside = (p >= -1) & (p <= limit)
        p = p.clamp(min=0)
        low = p.floor().long().clamp(max=limit - 1)
        p = torch.where(p.floor() >= limit - 1, low.float(), p)
        high = (low + 1).clamp(max=limit - 1)
        frac = p - low
        return low, high, 1 - frac, frac, inside

    out = []
    for batch, x1, y1, x2, y2 in rois.tolist():
        yl, yh, wy0, wy1, yin = axis(torch.tensor(y1 * scale), torch.tensor((y2 + 1) * scale), height)
        xl, xh, wx0, wx1, xin = axis(torch.tensor(x1 * scale), torch.tensor((x2 + 1) * scale), width)
        f = features[int(batch)]
        value = (wy0[:, None] * wx0 * f[:, yl][:, :, xl] + wy0[:, None] * wx1 * f[:, yl][:, :, xh]
                 + wy1[:, None] * wx0 * f[:, yh][:, :, xl] + wy1[:, None] * wx1 * f[:, yh][:, :, xh])
        value = value * (yin[:, None] & xin).float()
        out.append(value.view(-1, size, samples, size, samples).mean((2, 4)))
    return torch.stack(out)


@torch.no_grad()
def pedestron_detect(sd: dict, image_bgr: torch.Tensor, nms_pre: int, proposals: int) -> tuple:
    """Pedestron's MGAN ``simple_test`` on one uint8 BGR (3, H, W) image with its state dict: normalised
    RGB padded to 32, VGG-16 without pool4, RPN (sigmoid, top ``nms_pre``, NMS 0.7, ``proposals`` kept),
    RoIAlign, attention, shared FCs, softmax (background first), person deltas, score > 0, NMS 0.5, 100
    kept -> boxes (D, 4), person scores (D,)."""
    img_shape = image_bgr.shape[-2:]
    x = (image_bgr.flip(0).float() - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    x = F.pad(x, (0, -img_shape[1] % 32, 0, -img_shape[0] % 32))[None]
    for index in range(29):
        if f"backbone.features.{index}.weight" in sd:
            x = F.relu(F.conv2d(x, sd[f"backbone.features.{index}.weight"], sd[f"backbone.features.{index}.bias"],
                                padding=1))
        elif index in (4, 9, 16):
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)

    t = F.relu(F.conv2d(x, sd["rpn_head.rpn_conv.weight"], sd["rpn_head.rpn_conv.bias"], padding=1))
    scores = F.conv2d(t, sd["rpn_head.rpn_cls.weight"], sd["rpn_head.rpn_cls.bias"])[0].permute(1, 2, 0)
    deltas = F.conv2d(t, sd["rpn_head.rpn_reg.weight"], sd["rpn_head.rpn_reg.bias"])[0].permute(1, 2, 0)
    scores, deltas = scores.reshape(-1).sigmoid(), deltas.reshape(-1, 4)
    top = scores.topk(min(nms_pre, len(scores))).indices
    boxes = decode_06(anchors_06(*x.shape[-2:])[top], deltas[top], (1.0, 1.0, 1.0, 1.0), img_shape)[:, 0]
    rois = boxes[nms_06(boxes, scores[top], 0.7)[:proposals]]

    f = roi_align_06(x, torch.cat([rois.new_zeros(len(rois), 1), rois], 1), 1 / 8)
    for i in range(2):
        f = F.relu(F.conv2d(f, sd[f"mgan_head.convs.{i}.conv.weight"], sd[f"mgan_head.convs.{i}.conv.bias"],
                            padding=1))
    f = F.conv2d(f, sd["mgan_head.conv_logits.weight"], sd["mgan_head.conv_logits.bias"]).sigmoid() * f
    h = f.flatten(1)
    for i in range(2):
        h = F.relu(F.linear(h, sd[f"bbox_head.shared_fcs.{i}.weight"], sd[f"bbox_head.shared_fcs.{i}.bias"]))
    person = F.linear(h, sd["bbox_head.fc_cls.weight"], sd["bbox_head.fc_cls.bias"]).softmax(1)[:, 1]
    deltas = F.linear(h, sd["bbox_head.fc_reg.weight"], sd["bbox_head.fc_reg.bias"])
    boxes = decode_06(rois, deltas, (0.1, 0.1, 0.2, 0.2), img_shape)[:, 1]
    boxes, person = boxes[person > 0], person[person > 0]
    keep = nms_06(boxes, person, 0.5)[:100]
    return boxes[keep], person[keep]


def predict(model: nn.Module, image_bgr: torch.Tensor):
    """``model.test_step`` on one uint8 BGR (3, H, W) image -> its ``pred_instances``."""
    size = tuple(image_bgr.shape[-2:])
    sample = DetDataSample(metainfo={"img_shape": size, "ori_shape": size, "scale_factor": (1.0, 1.0)})
    with torch.no_grad():
        return model.test_step({"inputs": [image_bgr], "data_samples": [sample]})[0].pred_instances


# --- the model ------------------------------------------------------------------------------------------

def test_config_has_pedestrons_test_settings():
    cfg = Config.fromfile(str(CONFIG)).model
    assert cfg.type == "MGAN" and cfg.backbone.type == "VGGStride8" and "neck" not in cfg
    assert cfg.data_preprocessor.mean == list(MEAN) and cfg.data_preprocessor.std == list(STD)
    assert cfg.data_preprocessor.bgr_to_rgb and cfg.data_preprocessor.pad_size_divisor == 32
    anchors = cfg.rpn_head.anchor_generator
    assert tuple(anchors.scales) == SCALES and anchors.ratios == [2.44] and anchors.strides == [8]
    assert cfg.roi_head.bbox_head.bbox_coder.target_stds == [0.1, 0.1, 0.2, 0.2]
    rpn, rcnn = cfg.test_cfg.rpn, cfg.test_cfg.rcnn
    assert (rpn.nms_pre, rpn.max_per_img, rpn.nms.iou_threshold, rpn.nms.offset) == (12000, 2000, 0.7, 1)
    assert (rcnn.score_thr, rcnn.nms.iou_threshold, rcnn.nms.offset, rcnn.max_per_img) == (0.0, 0.5, 1, 100)


def test_builds_from_config_and_predicts_instances():
    model = build_mgan(rpn={"max_per_img": 300})  # 2000 proposals' attention convolutions take 10 s here
    model.load_state_dict(convert_pedestron_mgan(pedestron_state_dict())[0])
    assert type(model.roi_head).__name__ == "MGANRoIHead" and isinstance(model.roi_head.mgan_head, MGANAttention)
    height, width = 128, 256
    result = predict(model, torch.randint(0, 256, (3, height, width), dtype=torch.uint8))
    assert 0 < len(result) <= 100
    assert result.bboxes.shape == (len(result), 4) and result.labels.eq(0).all()
    assert (result.scores > 0).all() and (result.scores <= 1).all()
    assert torch.equal(result.scores, result.scores.sort(descending=True).values)
    x1, y1, x2, y2 = result.bboxes.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= width - 1).all() and (y2 <= height - 1).all()
    assert (x2 >= x1).all() and (y2 >= y1).all()
    with pytest.raises(NotImplementedError, match="inference only"):
        model.loss(None, None)


def test_attention_weights_the_convolved_features():
    attention = MGANAttention(in_channels=2, conv_channels=2).eval()
    with torch.no_grad():
        for module in attention.convs:  # identity 3x3 convolutions: F = relu(relu(x)) = relu(x)
            module.conv.weight.zero_()
            module.conv.weight[:, :, 1, 1] = torch.eye(2)
            module.conv.bias.zero_()
        attention.conv_logits.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))  # A = sigmoid(F[0])
        attention.conv_logits.bias.fill_(-1.0)
    x = torch.zeros(3, 2, 7, 7)
    x[:, 0] = torch.linspace(-3, 3, 49).view(7, 7)
    x[:, 1] = torch.linspace(4, -2, 49).view(7, 7)
    out = attention(x)
    expected_features = x.relu()
    assert out.shape == (3, 2, 7, 7)
    torch.testing.assert_close(out, torch.sigmoid(expected_features[:, :1] - 1) * expected_features)
    assert (out[:, 1][x[:, 1] < 0] == 0).all()  # the map weights relu'd features, not the raw RoI features


def test_anchors_follow_mmdetection_06():
    model = build_mgan()
    anchors = model.rpn_head.prior_generator.grid_priors([(5, 7)], device="cpu")[0]
    torch.testing.assert_close(anchors, anchors_06(5, 7), rtol=0, atol=0)


def test_decoding_inverts_the_legacy_encoding():
    g = torch.Generator().manual_seed(0)
    proposals = torch.tensor([[10.0, 20.0, 40.0, 90.0], [12.0, 9.0, 27.0, 40.0], [100.0, 50.0, 130.0, 160.0]])
    targets = proposals + torch.randn(3, 4, generator=g) * 3
    stds = (0.1, 0.1, 0.2, 0.2)
    ours = PedestronDeltaXYWHBBoxCoder(target_stds=stds)
    deltas = ours.encode(proposals, targets)
    torch.testing.assert_close(ours.decode(proposals, deltas), targets, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours.decode(proposals, deltas), decode_06(proposals, deltas, stds, (1e9, 1e9))[:, 0],
                               rtol=0, atol=1e-4)
    # MMDetection 3's legacy decoder puts the corners half a pixel further out
    theirs = LegacyDeltaXYWHBBoxCoder(target_stds=stds).decode(proposals, deltas)
    torch.testing.assert_close(theirs - targets, torch.tensor([-0.5, -0.5, 0.5, 0.5]).expand(3, 4), rtol=0, atol=1e-4)
    # (K, 4 * M) deltas decode per box, clamped to (H - 1, W - 1)
    wide = ours.decode(proposals, torch.cat([deltas, deltas + 5], 1), max_shape=(100, 120))
    assert wide.shape == (3, 8) and wide[:, 0::2].max() <= 119 and wide[:, 1::2].max() <= 99
    with pytest.raises(ValueError, match=r"\(K, 4 \* M\)"):
        ours.decode(proposals, deltas[:, :3])


def test_roi_align_follows_mmdetection_06():
    features = torch.randn(2, 3, 10, 13)
    rois = torch.tensor([
        [0, 8.0, 8.0, 60.0, 40.0],    # inside
        [1, -20.0, -9.0, 30.0, 90.0],  # crosses the top-left border and the bottom
        [0, 70.0, 50.0, 120.0, 95.0],  # past the bottom-right corner
        [1, 33.3, 17.9, 33.3, 17.9],   # a point: one pixel in 0.6's convention
        [0, 40.0, 40.0, 30.0, 35.0],   # inverted: 0.6 clamps the extent to 0
        [1, 3.7, 5.2, 9.1, 70.4],      # thin and tall
    ])
    expected = roi_align_06(features, rois, 1 / 8)
    torch.testing.assert_close(LegacyRoIAlign(7, 1 / 8, 2)(features, rois), expected, rtol=0, atol=1e-5)
    mmcv_unaligned = RoIAlign(7, 1 / 8, 2, aligned=False)(features, rois)
    assert (mmcv_unaligned - expected).abs().max() > 0.05  # why the legacy layer exists
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        LegacyRoIAlign(7, 1 / 8)(features, rois[:, 1:])


# --- Pedestron checkpoints ------------------------------------------------------------------------------

def test_conversion_maps_every_key_and_reorders_the_classifier():
    sd = pedestron_state_dict()
    converted, unmapped = convert_pedestron_mgan({**sd, "neck.unexpected.weight": torch.ones(1)})
    assert unmapped == ["neck.unexpected.weight"]
    model = build_mgan()
    assert set(converted) == set(model.state_dict()) and len(converted) == len(sd)
    model.load_state_dict(converted, strict=True)

    features = torch.randn(5, 512, 7, 7)
    with torch.no_grad():
        cls_score, bbox_pred = model.roi_head.bbox_head(features)
    h = features.flatten(1)
    for i in range(2):
        h = F.relu(F.linear(h, sd[f"bbox_head.shared_fcs.{i}.weight"], sd[f"bbox_head.shared_fcs.{i}.bias"]))
    logits = F.linear(h, sd["bbox_head.fc_cls.weight"], sd["bbox_head.fc_cls.bias"])
    deltas = F.linear(h, sd["bbox_head.fc_reg.weight"], sd["bbox_head.fc_reg.bias"])
    torch.testing.assert_close(cls_score.softmax(1)[:, 0], logits.softmax(1)[:, 1])  # MMDet 3: person first
    torch.testing.assert_close(bbox_pred, deltas[:, 4:])  # the person's deltas

    agnostic = {**sd, "bbox_head.fc_reg.weight": sd["bbox_head.fc_reg.weight"][:4]}
    assert torch.equal(convert_pedestron_mgan(agnostic)[0]["roi_head.bbox_head.fc_reg.weight"], agnostic[
        "bbox_head.fc_reg.weight"])
    with pytest.raises(ValueError, match="bbox_head.fc_cls.weight has 3 output rows"):
        convert_pedestron_mgan({"bbox_head.fc_cls.weight": torch.ones(3, 1024)})
    with pytest.raises(TypeError, match="'meta' is a dict"):
        convert_pedestron_mgan({"meta": {}, "state_dict": sd})


def test_converted_model_detects_as_pedestron():
    """Every stage against the 0.6 re-implementation above, on a frame that needs padding (img_shape
    120x250 in a 128x256 batch). Fewer proposals than Pedestron's 2000 keep the test fast; nms_pre below
    the anchor count exercises the pre-NMS selection."""
    sd = pedestron_state_dict()
    model = build_mgan(rpn={"nms_pre": 3000, "max_per_img": 300})
    model.load_state_dict(convert_pedestron_mgan(sd)[0])
    image = torch.randint(0, 256, (3, 120, 250), dtype=torch.uint8)
    result = predict(model, image)
    boxes, scores = pedestron_detect(sd, image, nms_pre=3000, proposals=300)
    assert len(result) == len(boxes) == 100
    assert scores.max() - scores.min() > 0.1  # the weights separate the proposals
    torch.testing.assert_close(result.scores, scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.bboxes, boxes, rtol=0, atol=1e-3)


# --- block-sparse execution -----------------------------------------------------------------------------

class Trunk(nn.Module):
    """Backbone -> rpn_head.forward: the part of MGAN that runs block-sparse."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone, self.rpn_head = detector.backbone, detector.rpn_head

    def forward(self, x):
        return self.rpn_head(self.backbone(x))


def test_backbone_and_rpn_run_block_sparse(one_thread):
    model = build_mgan()
    model.load_state_dict(convert_pedestron_mgan(pedestron_state_dict())[0])
    trunk = Trunk(model).eval()
    # random grids against the oracle, all blocks on tiles against the dense model: fp32 tiles and dense
    # maps may only sum in a different order (on one CPU thread they agree bit for bit)
    check_against_oracle_and_dense(trunk, 2, 64, 128, 32, rtol=1e-5)
    # all blocks of a frame with dense_when_full: the dense model's outputs exactly
    sparse = bc.convert(trunk, 32, dense_when_full=True)
    x = torch.randn(2, 3, 64, 128)
    cls_scores, bbox_preds = sparse(x, torch.ones(2, 1, 2, 4, dtype=torch.bool))
    dense_cls, dense_bbox = trunk(x)
    assert torch.equal(cls_scores[0], dense_cls[0]) and torch.equal(bbox_preds[0], dense_bbox[0])
    assert cls_scores[0].shape == (2, 11, 8, 16) and bbox_preds[0].shape == (2, 44, 8, 16)
