"""The tile gather/scatter (the CPU's per-tile copies, and the pure-PyTorch reference that defines them)
against a per-pixel definition."""
from __future__ import annotations

import pytest
import torch

from blockcopy_core import cpu_kernels
from blockcopy_core.grid import TileIndex
from blockcopy_core.tiles import (gather_tap_windows, gather_tiles, gather_tiles_reference, reference_moves,
                                  scatter_tiles, scatter_tiles_reference, update_and_gather)


@pytest.fixture(params=["kernels", "per-tile copies"])
def cpu_path(request, monkeypatch):
    """The CPU tile moves with the C++ kernels (kernels/cpu_tiles.cpp) and without (per-tile PyTorch copies)."""
    if request.param == "kernels":
        if cpu_kernels.load() is None:
            pytest.skip("the CPU tile kernels could not be built here (no C++ compiler?)")
    else:
        monkeypatch.setenv("BLOCKCOPY_DISABLE_CPU_KERNELS", "1")
    return request.param


def naive_gather(state, index, t, halo, border, value):
    """Pixel by pixel: tile k, pixel (i, j) reads state row r = row*T - top + i, col c likewise."""
    left, right, top, bottom = halo
    n, c, h, w = state.shape
    out = torch.empty(len(index), c, t + top + bottom, t + left + right)
    for k in range(len(index)):
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                r, q = int(index.row[k]) * t - top + i, int(index.col[k]) * t - left + j
                inside = 0 <= r < h and 0 <= q < w
                if border == "replicate":
                    r, q, inside = min(max(r, 0), h - 1), min(max(q, 0), w - 1), True
                elif border == "reflect":
                    r = -r if r < 0 else (2 * (h - 1) - r if r >= h else r)
                    q = -q if q < 0 else (2 * (w - 1) - q if q >= w else q)
                    inside = True
                out[k, :, i, j] = state[index.stream[k], :, r, q] if inside else value
    return out


@pytest.mark.parametrize("halo", [(0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 0, 1), (3, 2, 1, 0), (5, 5, 5, 5),
                                  (9, 0, 13, 2)])  # halos beyond a tile, and beyond the map (12x16)
@pytest.mark.parametrize("border, value", [("constant", 0.0), ("constant", float("-inf")), ("replicate", 0.0),
                                           ("reflect", 0.0)])
def test_gather_matches_per_pixel_definition(halo, border, value):
    t = 4
    state = torch.randn(2, 3, 3 * t, 4 * t)
    grid = torch.rand(2, 1, 3, 4) < 0.5
    grid[0, 0, 0, 0] = grid[1, 0, 2, 3] = True  # corners
    index = TileIndex.from_grid(grid)
    if border == "reflect" and max(halo) >= 3 * t:
        pytest.skip("a reflect halo must be smaller than the map")
    expected = naive_gather(state, index, t, halo, border, value)
    assert torch.equal(gather_tiles(state, index, t, halo, border, value), expected)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("border, value", [("constant", 0.0), ("constant", float("-inf")), ("replicate", 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_tile_copies_equal_the_reference(memory_format, border, value, dtype, cpu_path):
    t = 4
    state = torch.randn(3, 5, 4 * t, 5 * t).to(dtype).contiguous(memory_format=memory_format)
    grid = torch.rand(3, 1, 4, 5) < 0.4
    grid[2, 0, 3, 4] = True
    index = TileIndex.from_grid(grid)
    for halo in [(0, 0, 0, 0), (2, 1, 0, 3), (7, 7, 7, 7), (21, 0, 0, 17)]:
        fast = gather_tiles(state, index, t, halo, border, value)
        reference = gather_tiles_reference(state, index, t, halo, border, value)
        assert torch.equal(fast, reference) and fast.is_contiguous(memory_format=memory_format)
    tiles = torch.randn(len(index), 5, t, t, dtype=torch.float64)  # cast to the state's dtype on the way
    fast, reference = state.clone(), state.clone()
    scatter_tiles(fast, tiles, index)
    scatter_tiles_reference(reference, tiles, index)
    assert torch.equal(fast, reference)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("border, value", [("constant", 0.0), ("constant", float("-inf")), ("replicate", 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_update_and_gather_equals_the_reference_scatter_then_gather(memory_format, border, value, dtype,
                                                                        cpu_path):
    """The one-pass CPU kernel: each halo pixel from the new tile of an executed neighbour (written in the
    same call) or from the state, interiors from the tiles, the state updated as by a scatter."""
    t = 4
    state = torch.randn(3, 5, 4 * t, 5 * t).to(dtype).contiguous(memory_format=memory_format)
    grid = torch.rand(3, 1, 4, 5) < 0.5
    grid[0, 0, 0, 0] = grid[0, 0, 0, 1] = grid[2, 0, 3, 4] = True  # neighbours, a corner
    index = TileIndex.from_grid(grid)
    for halo in [(0, 0, 0, 0), (1, 1, 1, 1), (2, 1, 0, 3), (7, 7, 7, 7), (21, 0, 0, 17)]:
        tiles = torch.randn(len(index), 5, t, t, dtype=torch.float64)  # cast to the state's dtype on the way
        fast, reference = state.clone(), state.clone()
        grown = update_and_gather(fast, tiles, index, halo, border, value)
        scatter_tiles_reference(reference, tiles, index)
        assert torch.equal(fast, reference)
        assert torch.equal(grown, gather_tiles_reference(reference, index, t, halo, border, value))
        assert grown.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_cpu_tap_windows_equal_slices_of_the_halo_gather(memory_format, cpu_path):
    """The CPU kernels' tap windows and the masked-indexing reference (what compiled frames trace) both equal
    the definition: T x T slices of the halo'd tile, tap (a, b) at rows a*T and columns b*T."""
    t = 4
    state = torch.randn(2, 3, 3 * t, 4 * t).contiguous(memory_format=memory_format)
    index = TileIndex.from_grid(torch.rand(2, 1, 3, 4) < 0.6)
    for kernel, dilation, before in [((3, 3), (6, 6), (6, 6)), ((3, 3), (1, 1), (1, 1)), ((1, 3), (1, 5), (0, 5))]:
        fast = gather_tap_windows(state, index, t, kernel, dilation, before)
        with reference_moves():
            reference = gather_tap_windows(state, index, t, kernel, dilation, before)
        (k_h, k_w), (d_h, d_w), (p_h, p_w) = kernel, dilation, before
        grown = gather_tiles_reference(state, index, t, (p_w, d_w * (k_w - 1) - p_w, p_h, d_h * (k_h - 1) - p_h))
        slices = torch.cat([torch.cat([grown[..., a * d_h:a * d_h + t, b * d_w:b * d_w + t] for b in range(k_w)],
                                      dim=-1) for a in range(k_h)], dim=-2)
        assert torch.equal(reference, slices) and torch.equal(fast, slices)
        assert fast.is_contiguous(memory_format=memory_format) and reference.is_contiguous(memory_format=memory_format)


def test_scatter_writes_exactly_the_executed_blocks():
    t = 3
    state = torch.randn(2, 5, 2 * t, 3 * t)
    before = state.clone()
    grid = torch.tensor([[[[True, False, False], [False, False, True]]],
                         [[[False, True, False], [False, False, False]]]])
    index = TileIndex.from_grid(grid)
    tiles = torch.randn(len(index), 5, t, t)
    scatter_tiles(state, tiles, index)
    for k in range(len(index)):
        n, r, c = int(index.stream[k]), int(index.row[k]), int(index.col[k])
        assert torch.equal(state[n, :, r * t:(r + 1) * t, c * t:(c + 1) * t], tiles[k])
        before[n, :, r * t:(r + 1) * t, c * t:(c + 1) * t] = tiles[k]
    assert torch.equal(state, before)


def test_scatter_then_gather_round_trip_and_empty_index():
    state = torch.randn(1, 2, 8, 8)
    index = TileIndex.from_grid(torch.zeros(1, 1, 2, 2, dtype=torch.bool))
    assert gather_tiles(state, index, 4, (1, 1, 1, 1)).shape == (0, 2, 6, 6)
    scatter_tiles(state, torch.empty(0, 2, 4, 4), index)
    full = TileIndex.from_grid(torch.ones(1, 1, 2, 2, dtype=torch.bool))
    tiles = gather_tiles(state, full, 4)
    target = torch.zeros_like(state)
    scatter_tiles(target, tiles, full)
    assert torch.equal(target, state)


def test_a_failed_cpu_kernel_build_warns_once_and_keeps_the_per_tile_copies(monkeypatch):
    def broken():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "_failed", False)
    monkeypatch.setattr(cpu_kernels, "_build", broken)
    with pytest.warns(RuntimeWarning, match="(?s)CPU tile kernels failed.*no compiler here"):
        assert cpu_kernels.load() is None
    assert cpu_kernels.load() is None  # no second attempt, no second warning
    state = torch.randn(1, 2, 8, 8)
    index = TileIndex.from_grid(torch.tensor([[[[True, False], [False, True]]]]))
    halo = (1, 1, 1, 1)
    assert torch.equal(gather_tiles(state, index, 4, halo), gather_tiles_reference(state, index, 4, halo))
