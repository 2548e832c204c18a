"""MAC counting: a hand count, block-sparse awareness, and dense equality for an all-true grid."""
from __future__ import annotations

import torch
from torch import nn

import blockcopy_core as bc
from nets import resnet50_trunk


def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),           # 8*3*9 MACs per pixel at full resolution
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 1*9 per output value
        nn.Conv2d(8, 16, 1, stride=2),           # 8 per output value, half resolution
        nn.ConvTranspose2d(16, 4, 2, stride=2),  # each input value: 4*2*2
    ).eval()


def hand_count(n, h, w):
    full, half = h * w, (h // 2) * (w // 2)
    return n * (8 * full * 3 * 9 + 8 * full * 9 + 16 * half * 8 + 16 * half * 4 * 4)


def test_dense_count_matches_hand_count():
    model = small_net()
    assert bc.count_macs(model, torch.randn(2, 3, 32, 48)) == hand_count(2, 32, 48)


def test_engine_counts_executed_blocks_only():
    model = small_net()
    sparse = bc.convert(model, 16)
    grid = torch.ones(2, 1, 2, 3, dtype=torch.bool)
    sparse(torch.randn(2, 3, 32, 48), grid)
    assert sparse.last_stats.macs == hand_count(2, 32, 48)
    grid[:] = False
    grid[0, 0, 1, 2] = grid[1, 0, 0, 0] = True
    sparse(torch.randn(2, 3, 32, 48), grid)
    # two 16x16 blocks; the k2s2 transposed conv needs no halo, so the count is exact
    assert sparse.last_stats.macs == hand_count(2, 16, 16)
    assert sparse.last_stats.executed_blocks == 2 and sparse.last_stats.total_blocks == 12


def test_transposed_conv_halo_is_counted():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1)).eval()
    sparse = bc.convert(model, 8, dense_when_full=False)
    grid = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    sparse(torch.randn(1, 3, 16, 16), grid)
    sparse(torch.randn(1, 3, 16, 16), grid)
    # k4 s2 p1 reads one input pixel on each side of an 8x8 tile: 4 tiles of 10x10 inputs
    assert sparse.last_stats.macs == 16 * 16 * 4 * 3 + 4 * (10 * 10 * 4) * 2 * 4 * 4


def test_all_true_grid_equals_dense_count_on_resnet50():
    model = resnet50_trunk()
    x = torch.randn(1, 3, 64, 96)
    sparse = bc.convert(model, 32, dense_when_full=False)
    grid = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    sparse(x, grid)
    sparse(x, grid)
    dense = bc.count_macs(model, x)
    assert sparse.last_stats.macs == dense
    assert abs(sparse.last_stats.gmacs - dense / 1e9) < 1e-12
    assert 0.5e9 < dense < 0.5e9 * 1.1  # ResNet-50 trunk: ~4.1 GMACs at 224x224, scaled to 64x96
