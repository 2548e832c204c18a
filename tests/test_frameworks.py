"""Detectron2 and MMDetection models run block-sparse (random weights, eval mode)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import blockcopy_core as bc
from oracle import check_against_oracle_and_dense as check_against_oracle_and_dense_at

N, H, W, BLOCK = 2, 128, 192, 64
RTOL = 1e-4  # fp32, ~60 layers: only summation order differs between tiles and dense maps


def check_against_oracle_and_dense(model: nn.Module) -> None:
    check_against_oracle_and_dense_at(model, N, H, W, BLOCK, RTOL, dense_when_full=True)


@torch.no_grad()
def randomize_norms(model: nn.Module, norm_type) -> nn.Module:
    """Non-trivial normalisation statistics, so that a wrongly applied norm would show."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, norm_type):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model.eval()


class Detectron2SemanticFPN(nn.Module):
    """Detectron2's R50-FPN backbone (FrozenBN, F.max_pool2d stem) + semantic FPN head (GroupNorm)."""

    def __init__(self):
        super().__init__()
        from detectron2.config import get_cfg
        from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
        from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
        from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead

        cfg = get_cfg()
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 19
        cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
        self.backbone = build_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
        self.head = SemSegFPNHead(cfg, self.backbone.output_shape())
        randomize_norms(self, FrozenBatchNorm2d)

    def forward(self, x):
        features = self.backbone(x)
        sem_seg, _ = self.head(features)
        return {**features, "sem_seg": sem_seg}


def test_detectron2_r50_fpn_with_semantic_head():
    pytest.importorskip("detectron2")
    check_against_oracle_and_dense(Detectron2SemanticFPN().eval())


class MMDetResNetFPN(nn.Module):
    """MMDetection's ResNet-50 + FPN with an extra stride-64 level (the CSP/MGAN style backbones)."""

    def __init__(self):
        super().__init__()
        from mmdet.models.backbones import ResNet
        from mmdet.models.necks import FPN

        self.backbone = ResNet(depth=50, num_stages=4, out_indices=(0, 1, 2, 3), norm_eval=True)
        self.neck = FPN(in_channels=[256, 512, 1024, 2048], out_channels=64, num_outs=5,
                        add_extra_convs="on_input")
        self.neck.init_weights()

    def forward(self, x):
        return list(self.neck(self.backbone(x)))


def test_mmdetection_resnet50_fpn():
    pytest.importorskip("mmdet")
    from mmcv.cnn import ConvModule  # noqa: F401  (mmcv with its ops must import)
    check_against_oracle_and_dense(randomize_norms(MMDetResNetFPN(), nn.BatchNorm2d))


def test_detectron2_backbone_converted_cast_and_checkpointed():
    """What a Detectron2 plugin does first: build, convert, move (FrozenBatchNorm2d's weight and bias are
    buffers), then load the checkpoint of the plain backbone through Detectron2's own checkpointer."""
    pytest.importorskip("detectron2")
    from detectron2.checkpoint import DetectionCheckpointer

    plain = Detectron2SemanticFPN().eval().backbone
    backbone = Detectron2SemanticFPN().eval().backbone
    sparse = bc.convert(backbone, 64)
    assert sparse.size_divisibility == 64 and sparse.output_shape() == plain.output_shape()
    assert list(sparse.state_dict()) == list(plain.state_dict())
    sparse.double()
    assert all(t.dtype == torch.float64 for t in [*backbone.parameters(), *backbone.buffers()])
    state = {key: value.double() for key, value in plain.state_dict().items()}
    incompatible = DetectionCheckpointer(sparse)._load_model({"model": state, "__author__": "test"})
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    x = torch.randn(1, 3, 128, 192, dtype=torch.float64)
    expected = plain.double()(x)
    full = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    for outputs in (backbone(x), sparse(x, full)):  # the original stays the dense model
        for name in expected:
            torch.testing.assert_close(outputs[name], expected[name], rtol=1e-10, atol=1e-10)
