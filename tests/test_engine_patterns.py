"""Layer patterns of real models run block-sparse (random weights, eval mode, fp32 CPU): DeepLabV3's ASPP
pooling (a pooled vector resized back to the map), ConvNeXt's channels-last blocks, ResNetV1d-style
average pooling with ceil_mode (Res2Net) and YOLOX's Focus space-to-depth stem (CSPDarknet); their
refusals; GroupNorm in float64; and ops added with ``bc.register_op``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import handle_torch_function, has_torch_function

import blockcopy_core as bc
from blockcopy_core.ops import HANDLERS
from blockcopy_core.ops.pointwise import elementwise
from nets import Lambda
from oracle import check_against_oracle_and_dense, rel_error
from test_engine_ops import run_two_frames

N = 2
RTOL = 1e-4  # fp32: only summation order differs between tiles and dense maps (as tests/test_frameworks.py)


@torch.no_grad()
def randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and LayerNorm / layer-scale weights, so that a wrongly applied
    norm or a skipped residual branch would show."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        if hasattr(m, "layer_scale"):  # ConvNeXt's blocks start at 1e-6, which would hide them
            m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=g) * 0.5)
    model.eval()  # not chained: mmdet's backbones override train() and return None
    return model


# --- the patterns alone -------------------------------------------------------------------------------

BLOCK, H, W = 16, 32, 48


def focus(x):
    """YOLOX's Focus stem: space-to-depth by strided slicing, (N, C, H, W) -> (N, 4C, H/2, W/2)."""
    return torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], dim=1)


class ChannelsLastBlock(nn.Module):
    """A ConvNeXt block: depthwise conv, then LayerNorm, Linear and GELU channels-last, a per-channel
    layer scale and a channel-grouped softmax (a channels-last reshape)."""

    def __init__(self, dim=6):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.scale = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)

    def forward(self, x):
        y = self.mlp(self.norm(self.dw(x).permute(0, 2, 3, 1)))
        y = y.unflatten(-1, (2, -1)).softmax(-1).flatten(-2) * y
        return x + self.scale * y.permute(0, 3, 1, 2)


def pattern(*layers):
    return randomize_norms(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), *layers))


def aspp_pooling():
    from torchvision.models.segmentation.deeplabv3 import ASPPPooling
    return ASPPPooling(6, 4)


def layer_norm_2d():
    from torchvision.models.convnext import LayerNorm2d
    return LayerNorm2d(6)


PATTERNS = {
    "aspp_pooling_broadcast": lambda: pattern(nn.Conv2d(6, 6, 3, stride=2, padding=1), aspp_pooling()),
    "channels_last_block": lambda: pattern(ChannelsLastBlock()),
    "layer_norm_2d": lambda: pattern(layer_norm_2d()),
    "avg_pool_ceil_mode_no_effect": lambda: pattern(
        nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), nn.Conv2d(6, 4, 3, padding=1)),
    "focus_space_to_depth": lambda: pattern(Lambda(focus), nn.Conv2d(24, 4, 3, padding=1)),
    # dilation beyond the 16-px tile: on the CPU one window per kernel tap is gathered (tiles.gather_tap_windows)
    "dilation_beyond_tile": lambda: pattern(nn.Conv2d(6, 6, 3, padding=20, dilation=20, groups=2),
                                            nn.Conv2d(6, 4, (3, 5), padding=(17, 36), dilation=(17, 18))),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_matches_oracle_and_dense(name):
    check_against_oracle_and_dense(PATTERNS[name](), N, H, W, BLOCK, rtol=1e-5)


# --- real architectures -------------------------------------------------------------------------------

def test_torchvision_deeplabv3_resnet50_aspp(one_thread):
    from torchvision.models.segmentation import deeplabv3_resnet50
    model = randomize_norms(deeplabv3_resnet50(weights=None, weights_backbone=None))
    # Stride-8 tiles of 8 px with ASPP halos of up to 36 px: on the CPU the engine's pure-PyTorch gathers
    # of those halos cost ten dense forwards, so the all-blocks frame runs densely here.
    check_against_oracle_and_dense(model, N, 64, 128, 64, RTOL, dense_when_full=True)


def test_torchvision_convnext_tiny(one_thread):
    from torchvision.models import convnext_tiny
    check_against_oracle_and_dense(randomize_norms(convnext_tiny(weights=None).features), N, 64, 128, 32, RTOL)


def test_mmdetection_res2net50(one_thread):
    pytest.importorskip("mmdet")
    from mmdet.models.backbones import Res2Net
    check_against_oracle_and_dense(randomize_norms(Res2Net(depth=50)), N, 64, 128, 32, RTOL)


@pytest.mark.filterwarnings("ignore:`torch.cuda.amp.autocast:FutureWarning")  # mmdet's SPP bottleneck
def test_mmdetection_csp_darknet(one_thread):
    pytest.importorskip("mmdet")
    from mmdet.models.backbones import CSPDarknet
    model = CSPDarknet(deepen_factor=0.33, widen_factor=0.25)
    check_against_oracle_and_dense(randomize_norms(model), N, 64, 128, 32, RTOL)


# --- refusals -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn, op, reason", [
    (lambda x: F.avg_pool2d(x, 3, 2, ceil_mode=True), "avg_pool2d", "ceil_mode=True pools the 32x48 map to 16x24"),
    (lambda x: x[..., ::2, :], "__getitem__", "crops or samples the spatial dims"),
    (lambda x: x[..., 2::2, ::2], "__getitem__", "crops or samples the spatial dims"),
    (lambda x: x[..., :-1, :-1], "__getitem__", "crops or samples the spatial dims"),
    (lambda x: x.permute(0, 1, 3, 2), "permute", "swaps the H and W dims"),
    (lambda x: x.permute(0, 3, 2, 1), "permute", "swaps the H and W dims"),
    (lambda x: F.conv2d(x.permute(0, 2, 3, 1), torch.ones(4, 4, 1, 1)), "conv2d", "channels-last"),
    (lambda x: F.layer_norm(x, x.shape[1:]), "layer_norm", "include its batch or spatial dims"),
    (lambda x: F.interpolate(x.mean((2, 3), keepdim=True), scale_factor=4), "interpolate", "per-stream vector"),
])
def test_refusal_names_the_op(fn, op, reason):
    with pytest.raises(bc.UnsupportedOperationError) as info:
        run_two_frames(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Lambda(fn)))
    assert info.value.op == op and f"'{op}'" in str(info.value) and reason in str(info.value)


def test_space_to_depth_on_odd_tiles_is_refused():
    with pytest.raises(bc.UnsupportedOperationError, match="not block-aligned: this map's tiles are 9 px") as info:
        run_two_frames(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Lambda(focus)), block=9, h=18, w=27)
    assert info.value.op == "__getitem__"


def test_channels_last_output_is_refused():
    # (N, 32, 16, 8) channels-last would pass for a stride-4 (N, C, H, W) map of the 64x32 frames
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), Lambda(lambda x: x.permute(0, 2, 3, 1)))
    with pytest.raises(bc.UnsupportedOperationError, match="output #0 is not a") as info:
        run_two_frames(model, h=64, w=32)
    assert info.value.op == "output"


# --- precision ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_group_norm_statistics_keep_float64(memory_format):
    """Per-channel statistics combined per group (read from the state as it lies in memory) keep fp64."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.Conv2d(8, 4, 3, padding=1))
    model = model.double().eval().to(memory_format=memory_format)
    sparse = bc.convert(model, BLOCK, dense_when_full=False)
    full = torch.ones(N, 1, H // BLOCK, W // BLOCK, dtype=torch.bool)
    sparse(torch.randn(N, 3, H, W, dtype=torch.float64).contiguous(memory_format=memory_format), full)
    x = 3 + 10 * torch.randn(N, 3, H, W, dtype=torch.float64)  # large mean: fp32 statistics lose digits
    x = x.contiguous(memory_format=memory_format)
    (norm_state,) = [site for site in sparse.layer_states if site.op == "group_norm"]
    assert norm_state.dense.is_contiguous(memory_format=memory_format)
    assert rel_error(sparse(x, full), model(x)) <= 1e-12  # every block on tiles, statistics from the state


# --- registered ops -----------------------------------------------------------------------------------

def scale_channels(x, weight):
    """A function outside torch that takes part in ``__torch_function__``: (N, C, H, W) * (C,)."""
    if has_torch_function((x,)):
        return handle_torch_function(scale_channels, (x,), x, weight)
    return x * weight.view(1, -1, 1, 1)


@pytest.fixture
def restore_handlers():
    saved = dict(HANDLERS)
    yield
    HANDLERS.clear()
    HANDLERS.update(saved)


def test_registered_op_runs_block_sparse(restore_handlers):
    weight = torch.rand(6) + 0.5
    model = pattern(Lambda(lambda x: scale_channels(x, weight)), nn.Conv2d(6, 4, 3, padding=1))
    with pytest.raises(bc.UnsupportedOperationError, match="'scale_channels'"):
        run_two_frames(model)

    phases = []

    def handler(executor, name, func, args, kwargs):
        phases.append(executor.dense_phase)
        return elementwise(executor, name, func, args, kwargs)

    bc.register_op("scale_channels", handler)
    assert "scale_channels" in bc.supported_ops()
    check_against_oracle_and_dense(model, N, H, W, BLOCK, rtol=1e-5)
    assert True in phases and False in phases

    with pytest.raises(ValueError, match="'scale_channels' already has a handler"):
        bc.register_op("scale_channels", handler)
    with pytest.raises(ValueError, match="'conv2d'"):
        bc.register_op("conv2d", handler)
    bc.register_op("scale_channels", elementwise, replace=True)
    assert HANDLERS["scale_channels"] is elementwise
