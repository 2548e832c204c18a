"""Pedestron's CSP in MMDetection 3 (inference): build from the config, decoding, block-sparse execution
and Pedestron checkpoint conversion (CPU, random weights)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

pytest.importorskip("mmdet")

from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.registry import init_default_scope
from oracle import check_against_oracle_and_dense

import blockcopy_core as bc
from blockcopy_mmdet.models import ChannelL2Norm, CSPHead, convert_pedestron_csp

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "_base_" / "models" / "csp_r50.py"
TEST_CFG = {"nms_pre": 1000, "score_thr": 0.1, "nms": {"type": "nms", "iou_threshold": 0.5, "offset": 1},
            "max_per_img": 100}


def build_csp(reduced: bool = True) -> nn.Module:
    """CSP from the config; ``reduced``: ResNet-50 with 16 base channels (the real layer structure at a
    quarter of the width), neck and head narrowed to match."""
    init_default_scope("mmdet")
    cfg = Config.fromfile(str(CONFIG))
    if reduced:
        cfg.model.backbone.base_channels = 16
        cfg.model.neck.in_channels = [128, 256, 512]
        cfg.model.neck.out_channels = 32
        cfg.model.bbox_head.in_channels = 96
        cfg.model.bbox_head.feat_channels = 32
        cfg.model.bbox_head.norm_cfg = {"type": "GN", "num_groups": 8, "requires_grad": True}
    model = MODELS.build(cfg.model)
    model.eval()
    return model


@torch.no_grad()
def randomize(model: nn.Module) -> nn.Module:
    """Random values for every parameter and buffer (BatchNorm statistics, GroupNorm affines, the L2
    scales, the head's multipliers), so that a wrongly applied or skipped layer would show."""
    g = torch.Generator().manual_seed(1)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
        elif name.endswith("num_batches_tracked"):
            continue
        elif name.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "gn.weight", "downsample.1.weight")):
            tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
        elif tensor.dim() <= 1:  # biases, running means, L2 scales, multipliers
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.5 + (10.0 if "l2_norms" in name else 0.0))
        else:  # convolution weights, scaled to keep activations of order one
            fan_in = tensor[0].numel() if "deconvs" not in name else tensor.shape[0]
            tensor.copy_(torch.randn(tensor.shape, generator=g) / math.sqrt(fan_in))
    return model


class Trunk(nn.Module):
    """Backbone -> neck -> head.forward: the part of CSP that runs block-sparse."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone, self.neck, self.bbox_head = detector.backbone, detector.neck, detector.bbox_head

    def forward(self, x):
        return self.bbox_head(self.neck(self.backbone(x)))


# --- the model ------------------------------------------------------------------------------------------

def test_full_model_builds_from_config_with_pedestrons_layers():
    model = build_csp(reduced=False)
    assert type(model).__name__ == "CSP"
    layer4 = model.backbone.layer4
    assert layer4[0].conv2.stride == (1, 1) and all(b.conv2.dilation == (2, 2) for b in layer4)
    assert model.backbone.layer3[0].conv2.stride == (2, 2)
    deconvs = [(d.in_channels, d.out_channels, d.kernel_size, d.stride, d.padding) for d in model.neck.deconvs]
    assert deconvs == [(512, 256, (4, 4), (2, 2), (1, 1)), (1024, 256, (4, 4), (4, 4), (0, 0)),
                       (2048, 256, (4, 4), (4, 4), (0, 0))]
    assert all(n.eps == 1e-10 and torch.all(n.weight == 10) for n in model.neck.l2_norms)
    head = model.bbox_head
    gn = head.center_convs[0].gn
    assert (gn.num_groups, gn.num_channels, gn.eps) == (32, 256, 1e-5)
    assert head.center_convs[0].conv.bias is None and head.center_convs[0].conv.in_channels == 768
    assert (head.center_predictor.out_channels, head.scale_predictor.out_channels,
            head.offset_predictor.out_channels) == (1, 1, 2)
    assert head.wh_ratio == 0.41 and head.strides == (4,)
    assert dict(head.test_cfg) == TEST_CFG
    preprocessor = model.data_preprocessor
    assert preprocessor.pad_size_divisor == 128 and preprocessor._channel_conversion

    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        centers, scales, offsets = model._forward(x)
        samples = model.predict(x, [DetDataSample(metainfo={"img_shape": (64, 128), "scale_factor": (1.0, 1.0)})])
    assert [t.shape for t in centers + scales + offsets] == [(1, 1, 16, 32), (1, 1, 16, 32), (1, 2, 16, 32)]
    predictions = samples[0].pred_instances
    assert predictions.bboxes.shape[1:] == (4,) and len(predictions.scores) == len(predictions.labels)


def test_neck_l2_norm_is_pedestrons():
    norm = ChannelL2Norm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(6) + 5)
    x = torch.randn(2, 6, 5, 7)
    pedestron = norm.weight.view(1, -1, 1, 1) * (x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
    torch.testing.assert_close(norm(x), pedestron, rtol=1e-6, atol=0)  # fp32: summation order only
    assert torch.equal(norm(torch.zeros(1, 6, 2, 2)), torch.zeros(1, 6, 2, 2))  # eps: no 0 / 0


def test_head_outputs_per_level_lists_of_maps():
    model = build_csp()
    with torch.no_grad():
        outputs = model.bbox_head(model.neck(model.backbone(torch.randn(2, 3, 64, 96))))
    assert isinstance(outputs, tuple) and all(isinstance(level, list) and len(level) == 1 for level in outputs)
    assert [o[0].shape for o in outputs] == [(2, 1, 16, 24), (2, 1, 16, 24), (2, 2, 16, 24)]


def test_training_is_refused():
    model = build_csp()
    with pytest.raises(NotImplementedError, match="inference only"):
        model.loss(torch.zeros(1, 3, 64, 64), [DetDataSample()])
    with pytest.raises(NotImplementedError, match="inference only"):
        model.bbox_head.loss_by_feat()


# --- decoding -------------------------------------------------------------------------------------------

H, W = 64, 96  # the image; maps at stride 4 are 16 x 24
LOW = -10.0  # center logit of the background cells (score 4.5e-5)

# (row, col, center logit, height in px, dy, dx): (dy, dx) in units of the stride 4
CELLS = {
    "A": (5, 7, 3.0, 40.0, 0.25, -0.5),     # center (7*4+2 - 2, 5*4+2 + 1) = (28, 23)
    "A_dup": (5, 8, 1.0, 40.0, 0.25, -0.5),  # center (32, 23): legacy IoU with A 13.4 / 21.4 = 0.63
    "B": (15, 23, 2.0, 20.0, 0.0, 0.0),     # center (94, 62): clipped to the image's right and bottom
    "C": (10, 3, 1.5, 10.0, 0.0, 0.0),      # center (14, 42)
    # center (15.4, 42): IoU with C 2.7 / 5.5 = 0.49 with x2 - x1, 3.7 / 6.5 = 0.57 with x2 - x1 + 1
    "C_dup": (10, 4, 0.5, 10.0, 0.0, -0.65),
    "D_low": (1, 20, math.log(0.09 / 0.91), 30.0, 0.0, 0.0),  # score 0.09 < score_thr 0.1
    "E": (0, 12, 0.0, 16.0, -0.5, 0.0),     # center (50, 0): clipped at the top
}
EXPECTED = {  # x1 = cx - 0.41 * h / 2, y1 = cy - h / 2, ..., clipped to [0, W - 1] x [0, H - 1]
    "A": (28 - 8.2, 23 - 20, 28 + 8.2, 23 + 20),
    "A_dup": (32 - 8.2, 3, 32 + 8.2, 43),
    "B": (94 - 4.1, 62 - 10, 95, 63),
    "C": (14 - 2.05, 37, 14 + 2.05, 47),
    "C_dup": (15.4 - 2.05, 37, 15.4 + 2.05, 47),
    "E": (50 - 3.28, 0, 50 + 3.28, 8),
}


def crafted_maps(n: int = 1):
    """Head outputs with CELLS in image 0 (images 1.. all background)."""
    center = torch.full((n, 1, H // 4, W // 4), LOW)
    scale = torch.zeros(n, 1, H // 4, W // 4)
    offset = torch.zeros(n, 2, H // 4, W // 4)
    for row, col, logit, height, dy, dx in CELLS.values():
        center[0, 0, row, col] = logit
        scale[0, 0, row, col] = math.log(height / 4)  # log of the height in units of the stride
        offset[0, :, row, col] = torch.tensor([dy, dx])
    return [center], [scale], [offset]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def meta(scale_factor=(1.0, 1.0)) -> dict:
    return {"img_shape": (H, W), "ori_shape": (H, W), "scale_factor": scale_factor}


def expect(names, scale_factor=(1.0, 1.0)):
    """Boxes in the order of their scores, and the scores."""
    names = sorted(names, key=lambda k: -CELLS[k][2])
    sx, sy = scale_factor
    boxes = torch.tensor([[x1 / sx, y1 / sy, x2 / sx, y2 / sy] for x1, y1, x2, y2 in (EXPECTED[k] for k in names)])
    return boxes, torch.tensor([sigmoid(CELLS[k][2]) for k in names])


def check(result, names, scale_factor=(1.0, 1.0)):
    boxes, scores = expect(names, scale_factor)
    # fp32 boxes of up to 100 px from exp(log(h)): a few ulps, far below the 0.01 px a wrong rule moves them
    torch.testing.assert_close(result.bboxes, boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(result.scores, scores, rtol=1e-6, atol=0)
    assert result.labels.tolist() == [0] * len(names)


def head() -> CSPHead:
    return CSPHead(in_channels=8, feat_channels=8, norm_cfg={"type": "GN", "num_groups": 4}, test_cfg=TEST_CFG)


def test_decoding_score_threshold_and_legacy_nms():
    first, second = head().predict_by_feat(*crafted_maps(2), batch_img_metas=[meta(), meta()])
    # A_dup and C_dup are suppressed (C_dup only with Pedestron's +1 box sides), D_low is below score_thr
    check(first, ["A", "B", "C", "E"])
    assert second.bboxes.shape == (0, 4) and second.scores.shape == (0,) and second.labels.shape == (0,)


@pytest.mark.parametrize("with_nms", [True, False])
def test_the_images_of_a_batch_are_decoded_apart(with_nms):
    """One batched decoding and NMS for all images: each image's result equals its own decoding alone, with
    its own image shape and scale factor; equal boxes in two images do not suppress each other."""
    maps = crafted_maps(4)
    for m in maps:
        m[0][1] = m[0][2] = m[0][0]  # images 1 and 2: the same cells as image 0; image 3: background
    metas = [meta(), meta(), {**meta((2.0, 0.5)), "img_shape": (H - 20, W - 30)}, meta()]
    batched = head().predict_by_feat(*maps, batch_img_metas=metas, rescale=True, with_nms=with_nms)
    for i, result in enumerate(batched):
        (alone,) = head().predict_by_feat(*([m[0][i:i + 1]] for m in maps), batch_img_metas=[metas[i]],
                                          rescale=True, with_nms=with_nms)
        for key in ("bboxes", "scores", "labels"):
            torch.testing.assert_close(getattr(result, key), getattr(alone, key), rtol=0, atol=0)
    assert len(batched[0]) == len(batched[1]) == len(batched[2]) == (4 if with_nms else 6) and len(batched[3]) == 0
    assert not torch.equal(batched[2].bboxes, batched[0].bboxes)  # its own shape and scale factor


def test_without_nms_every_cell_above_the_threshold_is_kept():
    (result,) = head().predict_by_feat(*crafted_maps(), batch_img_metas=[meta()], with_nms=False)
    order = result.scores.argsort(descending=True)
    result = result[order]
    check(result, ["A", "B", "C", "A_dup", "C_dup", "E"])


def test_rescale_divides_by_the_scale_factor_after_clipping():
    (result,) = head().predict_by_feat(*crafted_maps(), batch_img_metas=[meta((2.0, 0.5))], rescale=True)
    check(result, ["A", "B", "C", "E"], scale_factor=(2.0, 0.5))


@pytest.mark.parametrize("setting, names", [
    ({"max_per_img": 2}, ["A", "B"]),
    ({"nms_pre": 3}, ["A", "B", "C"]),  # the 3 best cells
    ({"score_thr": 0.85}, ["A", "B"]),  # scores 0.95, 0.88 (0.82 for C)
])
def test_test_cfg_limits(setting, names):
    cfg = {**TEST_CFG, **setting}
    (result,) = head().predict_by_feat(*crafted_maps(), batch_img_metas=[meta()], cfg=cfg)
    check(result, names)


def test_bad_head_input_is_refused_clearly():
    csp_head = head()
    maps = crafted_maps()
    with pytest.raises(ValueError, match="one image meta per image"):
        csp_head.predict_by_feat(*maps, batch_img_metas=[])
    with pytest.raises(ValueError, match="needs a test config"):
        CSPHead(in_channels=8, feat_channels=8, norm_cfg=None).predict_by_feat(*maps, batch_img_metas=[meta()])
    with pytest.raises(ValueError, match=r"\(2, h, w\) offsets"):
        csp_head.predict_by_feat(maps[0], maps[1], [maps[2][0][:, :1]], batch_img_metas=[meta()])
    with pytest.raises(KeyError, match="img_shape"):
        csp_head.predict_by_feat(*maps, batch_img_metas=[{"scale_factor": (1.0, 1.0)}])
    with pytest.raises(ValueError, match="1 levels"):
        csp_head([torch.zeros(1, 8, 4, 4)] * 2)


# --- block-sparse ---------------------------------------------------------------------------------------

def test_block_sparse_trunk_matches_dense_and_oracle(one_thread):
    trunk = Trunk(randomize(build_csp())).eval()
    n, h, w, block = 2, 64, 128, 32
    x = torch.randn(n, 3, h, w)
    with torch.no_grad():
        dense = trunk(x)
        sparse_first = bc.convert(trunk, block)(x, torch.ones(n, 1, h // block, w // block, dtype=torch.bool))
    # The clip's first frame executes every block: exactly the plain model's outputs.
    for a, b in zip(tree_leaves(sparse_first), tree_leaves(dense)):
        assert torch.equal(a, b)
    with torch.no_grad():
        check_against_oracle_and_dense(trunk, n, h, w, block, rtol=1e-4)  # fp32: summation order only


# --- Pedestron checkpoints ------------------------------------------------------------------------------

# Pedestron's names (mmdet/models/necks/csp_neck.py, anchor_heads/csp_head.py with stacked_convs=1).
PEDESTRON_NECK_AND_HEAD = [
    "neck.p3.weight", "neck.p3.bias", "neck.p4.weight", "neck.p4.bias", "neck.p5.weight", "neck.p5.bias",
    "neck.p3_l2.weight", "neck.p4_l2.weight", "neck.p5_l2.weight",
    *(f"bbox_head.{branch}.0.{p}" for branch in ("cls_convs", "reg_convs", "offset_convs")
      for p in ("conv.weight", "gn.weight", "gn.bias")),
    *(f"bbox_head.{conv}.{p}" for conv in ("csp_cls", "csp_reg", "csp_offset") for p in ("weight", "bias")),
    "bbox_head.reg_scales.0.scale", "bbox_head.offset_scales.0.scale",
]
TO_PEDESTRON = {  # this model's module paths -> Pedestron's
    "neck.deconvs.0.": "neck.p3.", "neck.deconvs.1.": "neck.p4.", "neck.deconvs.2.": "neck.p5.",
    "neck.l2_norms.0.": "neck.p3_l2.", "neck.l2_norms.1.": "neck.p4_l2.", "neck.l2_norms.2.": "neck.p5_l2.",
    "bbox_head.center_convs.": "bbox_head.cls_convs.", "bbox_head.scale_convs.": "bbox_head.reg_convs.",
    "bbox_head.offset_convs.": "bbox_head.offset_convs.", "bbox_head.center_predictor.": "bbox_head.csp_cls.",
    "bbox_head.scale_predictor.": "bbox_head.csp_reg.", "bbox_head.offset_predictor.": "bbox_head.csp_offset.",
    "bbox_head.scale_multipliers.": "bbox_head.reg_scales.",
    "bbox_head.offset_multipliers.": "bbox_head.offset_scales.",
}


def pedestron_name(key: str) -> str:
    for ours, theirs in TO_PEDESTRON.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    assert key.startswith("backbone."), key
    return key  # MMDetection 1.x's ResNet has MMDetection 3's names


def test_pedestron_checkpoint_converts_and_loads():
    source = randomize(build_csp())
    pedestron = {pedestron_name(k): v.clone() for k, v in source.state_dict().items()}
    assert sorted(k for k in pedestron if not k.startswith("backbone.")) == sorted(PEDESTRON_NECK_AND_HEAD)
    extra = {"bbox_head.refine_head.fc.weight": torch.zeros(1), "module.backbone.conv1.weight": torch.zeros(1)}

    converted, unmapped = convert_pedestron_csp({**pedestron, **extra})
    assert unmapped == list(extra)
    target = build_csp()
    assert sorted(converted) == sorted(target.state_dict())
    target.load_state_dict(converted, strict=True)

    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected, actual = source._forward(x), target._forward(x)
    for a, b in zip(tree_leaves(actual), tree_leaves(expected)):
        assert torch.equal(a, b)


def test_converter_rejects_non_mappings():
    with pytest.raises(TypeError, match="expects a state dict"):
        convert_pedestron_csp([("neck.p3.weight", torch.zeros(1))])
