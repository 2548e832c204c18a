"""Each supported op, alone, against the dense-emulation oracle; and clear errors for everything else."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blockcopy_core as bc
from blockcopy_core.functional import resize_bilinear_tf
from nets import Conv2dSame, Lambda
from oracle import DenseEmulation

BLOCK, N, H, W = 16, 2, 32, 48  # 2x3 blocks per stream
RTOL = 1e-5  # single ops in fp32: only summation order can differ


def seq(*layers):
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), *layers).eval()


CASES = {
    "conv1x1": seq(nn.Conv2d(6, 5, 1)),
    "conv3x3": seq(nn.Conv2d(6, 5, 3, padding=1)),
    "conv5x5_stride2": seq(nn.Conv2d(6, 5, 5, stride=2, padding=2)),
    "conv7x7_stride4": seq(nn.Conv2d(6, 5, 7, stride=4, padding=3)),
    "conv1x1_stride2": seq(nn.Conv2d(6, 5, 1, stride=2)),
    "conv2x2_stride2": seq(nn.Conv2d(6, 5, 2, stride=2)),
    "conv_dilated": seq(nn.Conv2d(6, 5, 3, padding=3, dilation=3)),
    "conv_depthwise": seq(nn.Conv2d(6, 6, 3, padding=1, groups=6)),
    "conv_grouped_stride2": seq(nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2)),
    "conv_padding_same_even_kernel": seq(nn.Conv2d(6, 5, 4, padding="same")),
    "conv_tf_same_stride2": seq(Conv2dSame(6, 5, 3, stride=2)),
    "conv_tf_same_5x5_stride2": seq(Conv2dSame(6, 5, 5, stride=2)),
    "conv_after_explicit_pad": seq(Lambda(lambda x: F.pad(x, (0, 1, 0, 1))), nn.Conv2d(6, 5, 3, stride=2)),
    "conv_reflect_padding": seq(nn.Conv2d(6, 5, 3, padding=1, padding_mode="reflect")),
    "conv_replicate_padding": seq(nn.Conv2d(6, 5, 3, padding=1, padding_mode="replicate")),
    "conv_transpose_k2s2": seq(nn.ConvTranspose2d(6, 5, 2, stride=2)),
    "conv_transpose_k4s2p1": seq(nn.ConvTranspose2d(6, 5, 4, stride=2, padding=1)),
    "conv_transpose_k3s2p1op1": seq(nn.ConvTranspose2d(6, 5, 3, stride=2, padding=1, output_padding=1)),
    "conv_transpose_k3s1p1": seq(nn.ConvTranspose2d(6, 5, 3, padding=1)),
    "max_pool_k3s2p1": seq(nn.MaxPool2d(3, 2, 1)),
    "max_pool_functional": seq(Lambda(lambda x: F.max_pool2d(x, kernel_size=3, stride=2, padding=1))),
    "max_pool_k2": seq(nn.MaxPool2d(2)),
    "max_pool_k1s2": seq(Lambda(lambda x: F.max_pool2d(x, kernel_size=1, stride=2, padding=0))),
    "avg_pool_k3s1p1": seq(nn.AvgPool2d(3, 1, 1)),
    "avg_pool_k2": seq(nn.AvgPool2d(2)),
    "batch_norm": seq(nn.BatchNorm2d(6)),
    "group_norm": seq(nn.GroupNorm(3, 6)),
    "activations": seq(nn.ReLU(), nn.ReLU6(), nn.Hardswish(), nn.Hardsigmoid(), nn.SiLU(), nn.GELU(),
                       nn.LeakyReLU(0.1), nn.ELU(), nn.Sigmoid(), nn.Tanh(), nn.PReLU(6)),
    "add_mul": seq(Lambda(lambda x: x * 2.0 + x.sigmoid() * x - 1)),
    "cat_and_chunk": seq(Lambda(lambda x: torch.cat([x, x.relu()], 1)), Lambda(lambda x: sum(x.chunk(3, 1)))),
    "channel_slice": seq(Lambda(lambda x: x[:, 1:4] * x[:, :3])),
    "upsample_nearest": seq(nn.Upsample(scale_factor=2, mode="nearest")),
    "upsample_bilinear": seq(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)),
    "interpolate_bilinear_size": seq(nn.MaxPool2d(2), Lambda(
        lambda x: F.interpolate(x, size=(x.shape[-2] * 4, x.shape[-1] * 4), mode="bilinear"))),
    "interpolate_bicubic": seq(Lambda(lambda x: F.interpolate(x, scale_factor=2, mode="bicubic"))),
    "resize_bilinear_tf": seq(nn.MaxPool2d(2), Lambda(lambda x: resize_bilinear_tf(x, 2))),
    "global_avg_pool": seq(Lambda(lambda x: x + F.adaptive_avg_pool2d(x, 1))),
    "global_max_pool": seq(Lambda(lambda x: x * F.adaptive_max_pool2d(x, 1))),
    "global_mean_linear": seq(Lambda(lambda x: x * F.linear(x.mean((2, 3)), torch.ones(6, 6) / 6).view(-1, 6, 1, 1))),
    "channel_softmax": seq(Lambda(lambda x: x.softmax(dim=1))),
    "channel_l2_normalize": seq(Lambda(lambda x: F.normalize(x, dim=1) * 10)),
    "channel_vector_norm": seq(Lambda(lambda x: x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-10))),
    "channel_tensor_norm": seq(Lambda(lambda x: x * x.norm(dim=1, keepdim=True) + torch.norm(x, 1, 1, True))),
    "reshape_channel_shuffle": seq(Lambda(lambda x: x.view(x.shape[0], 2, 3, *x.shape[-2:]).transpose(1, 2)
                                          .reshape(x.shape))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_oracle_and_dense(name):
    model = CASES[name]
    sparse, oracle = bc.convert(model, BLOCK), DenseEmulation(model, BLOCK)
    x = torch.randn(N, 3, H, W)
    full = torch.ones(N, 1, H // BLOCK, W // BLOCK, dtype=torch.bool)
    torch.testing.assert_close(sparse(x, full), model(x), rtol=RTOL, atol=RTOL)
    oracle(x, full)
    for _ in range(3):
        x = x + torch.randn_like(x)
        grid = torch.rand(full.shape) < 0.5
        torch.testing.assert_close(sparse(x, grid), oracle(x, grid), rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(sparse(x, full), model(x), rtol=RTOL, atol=RTOL)


def test_supported_ops_are_listed():
    ops = bc.supported_ops()
    for op in ("conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "interpolate", "group_norm",
               "adaptive_avg_pool2d", "batch_norm", "cat", "pad", "resize_bilinear_tf", "normalize",
               "vector_norm", "norm"):
        assert op in ops


# --- errors -------------------------------------------------------------------------------------------

def run_two_frames(model, block=BLOCK, h=H, w=W):
    sparse = bc.convert(model.eval(), block)
    x = torch.randn(N, 3, h, w)
    grid = torch.ones(N, 1, h // block, w // block, dtype=torch.bool)
    sparse(x, grid)
    sparse(x, torch.rand(grid.shape) < 0.5)


class Head(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = Lambda(fn)

    def forward(self, x):
        return self.head(self.conv(x))


@pytest.mark.parametrize("fn, op", [
    (lambda x: F.linear(x, torch.ones(3, W)), "linear"),
    (lambda x: x.view(x.shape[0], -1)[..., None, None], "view"),
    (lambda x: x.flatten(2)[..., None], "flatten"),
    (lambda x: x.transpose(2, 3), "transpose"),
    (lambda x: torch.cat([x, x], dim=3), "cat"),
    (lambda x: x[:, :, 1:], "__getitem__"),
    (lambda x: x.softmax(dim=-1), "softmax"),
    (lambda x: x.sum((2, 3), keepdim=True) * x, "sum"),
    (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True), "interpolate"),
    (lambda x: F.interpolate(x, scale_factor=0.5), "interpolate"),
    (lambda x: F.adaptive_avg_pool2d(x, 4), "adaptive_avg_pool2d"),
    (lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), "avg_pool2d"),
    (lambda x: torch.fft.fft2(x).real, "fft2"),
    (lambda x: F.normalize(x, dim=2), "normalize"),
    (lambda x: x * torch.linalg.vector_norm(x, dim=(2, 3), keepdim=True), "vector_norm"),
    (lambda x: x * x.norm(), "norm"),
])
def test_unsupported_op_is_named_with_its_module(fn, op):
    with pytest.raises(bc.UnsupportedOperationError) as info:
        run_two_frames(Head(fn))
    assert info.value.op == op and info.value.module_path.startswith("head ")
    assert f"'{op}'" in str(info.value) and "head (Lambda)" in str(info.value)


@pytest.mark.parametrize("fn", [lambda x: F.normalize(x, dim=-1),
                                lambda x: x / torch.linalg.vector_norm(x, dim=(1, 2))])
def test_norm_over_a_spatial_dim_is_refused_with_the_reason(fn):
    with pytest.raises(bc.UnsupportedOperationError, match="a spatial dim of the"):
        run_two_frames(Head(fn))


def test_stride_not_dividing_block_size_is_refused_before_running_sparse():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1))
    with pytest.raises(bc.UnsupportedOperationError, match="does not divide the block size 4"):
        run_two_frames(model, block=4, h=32, w=48)


def test_block_misaligned_padding_is_refused():
    with pytest.raises(bc.UnsupportedOperationError, match="not block-aligned"):
        run_two_frames(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2)))  # 'valid' padding: 32 -> 15


def test_training_mode_batch_norm_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).train()
    with pytest.raises(bc.UnsupportedOperationError, match=r"\.eval\(\)"):
        bc.convert(model, BLOCK)(torch.randn(N, 3, H, W), torch.ones(N, 1, 2, 3, dtype=torch.bool))


def test_non_feature_map_output_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(bc.UnsupportedOperationError, match="output #0"):
        run_two_frames(model)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 5, padding=2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.a(x) if self.calls == 1 else self.b(x)


def test_changed_control_flow_is_detected():
    with pytest.raises(bc.ControlFlowChangedError, match="first frame"):
        run_two_frames(DataDependent())
