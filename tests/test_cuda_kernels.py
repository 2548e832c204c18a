"""The CUDA tile kernels against the pure-PyTorch reference: bit-exact copies (needs a GPU)."""
from __future__ import annotations

import pytest
import torch

from blockcopy_core import cuda_kernels, tiles
from blockcopy_core.grid import TileIndex

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]
BORDERS = [("constant", 0.0), ("constant", float("-inf")), ("constant", 2.5), ("replicate", 0.0),
           ("reflect", 0.0), ("circular", 0.0)]
HALOS = [(0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 0, 1), (3, 2, 1, 0), (5, 6, 7, 4)]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """Build (or import) the extension once; a build failure fails the tests with the compiler's tail."""
    if cuda_kernels.disabled():
        pytest.skip("BLOCKCOPY_DISABLE_CUDA_KERNELS is set")
    return cuda_kernels.load()


def make_state(n, c, h, w, dtype, layout, offset=0):
    """Random (N, C, H, W) CUDA map; ``offset`` elements into its storage, to break vector alignment."""
    shape = (n, h, w, c) if layout == "channels_last" else (n, c, h, w)
    numel = n * c * h * w
    flat = torch.randn(numel + offset, device="cuda").to(dtype)[offset:]
    state = flat.view(shape)
    return state.permute(0, 3, 1, 2) if layout == "channels_last" else state


def make_index(n, gh, gw, kind):
    if kind == "empty":
        grid = torch.zeros(n, 1, gh, gw, dtype=torch.bool)
    elif kind == "full":
        grid = torch.ones(n, 1, gh, gw, dtype=torch.bool)
    else:
        grid = torch.rand(n, 1, gh, gw) < 0.4
        grid[0, 0, 0, 0] = grid[-1, 0, -1, -1] = grid[0, 0, 0, -1] = grid[-1, 0, -1, 0] = True  # corners
    stream, _, row, col = grid.cuda().nonzero(as_tuple=True)  # strided views, as the engine gets them
    return TileIndex(stream, row, col)


def memory_format(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("c", [1, 3, 13, 64])
@pytest.mark.parametrize("halo", HALOS)
@pytest.mark.parametrize("border, value", BORDERS)
def test_gather_matches_reference(kernels, dtype, layout, c, halo, border, value):
    t, n = 4, 2
    state = make_state(n, c, 3 * t, 5 * t, dtype, layout)
    index = make_index(n, 3, 5, "random")
    expected = tiles.gather_tiles_reference(state, index, t, halo, border, value)
    got = kernels.gather_tiles(state, index.stream, index.row, index.col, t, *halo, border, value)
    assert got.shape == expected.shape
    assert got.is_contiguous(memory_format=memory_format(layout))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("c", [3, 13, 64])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("grid", ["random", "full", "empty"])
def test_scatter_matches_reference(kernels, dtype, layout, c, offset, grid):
    t, n = 4, 3
    state = make_state(n, c, 2 * t, 3 * t, dtype, layout, offset)
    index = make_index(n, 2, 3, grid)
    new = torch.randn(len(index), c, t, t, device="cuda").to(dtype).contiguous(memory_format=memory_format(layout))
    expected = state.clone()
    tiles.scatter_tiles_reference(expected, new, index)
    kernels.scatter_tiles(state, new, index.stream, index.row, index.col)
    assert torch.equal(state, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("c", [3, 13, 64])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("halo", [(0, 0, 0, 0), (1, 1, 1, 1), (5, 6, 7, 4)])
@pytest.mark.parametrize("grid", ["random", "full", "empty"])
def test_gather_alignment_and_grids(kernels, dtype, layout, c, offset, halo, grid):
    t, n = 4, 2
    state = make_state(n, c, 2 * t, 3 * t, dtype, layout, offset)
    index = make_index(n, 2, 3, grid)
    expected = tiles.gather_tiles_reference(state, index, t, halo)
    got = kernels.gather_tiles(state, index.stream, index.row, index.col, t, *halo, "constant", 0.0)
    assert torch.equal(got, expected)


def test_gather_map_not_a_multiple_of_the_tile(kernels):
    state = make_state(2, 5, 14, 11, torch.float32, "nchw")
    index = TileIndex(*(torch.tensor(v, device="cuda") for v in ([0, 1, 1], [0, 2, 1], [1, 0, 1])))
    for halo in [(0, 0, 0, 0), (2, 1, 1, 2)]:
        expected = tiles.gather_tiles_reference(state, index, 4, halo, "replicate")
        assert torch.equal(kernels.gather_tiles(state, index.stream, index.row, index.col, 4, *halo,
                                                "replicate", 0.0), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("c", [3, 64])
@pytest.mark.parametrize("halo", HALOS)
@pytest.mark.parametrize("border, value", [("constant", 0.0), ("constant", float("-inf")), ("replicate", 0.0),
                                           ("reflect", 0.0), ("circular", 0.0)])
@pytest.mark.parametrize("grid", ["random", "full", "empty"])
def test_update_and_gather_matches_scatter_then_gather(kernels, dtype, layout, c, halo, border, value, grid):
    t, n = 4, 2
    state = make_state(n, c, 3 * t, 4 * t, dtype, layout)
    index = make_index(n, 3, 4, grid)
    new = torch.randn(len(index), c, t, t, device="cuda").to(dtype).contiguous(memory_format=memory_format(layout))
    expected_state = state.clone()
    tiles.scatter_tiles_reference(expected_state, new, index)
    expected = tiles.gather_tiles_reference(expected_state, index, t, halo, border, value)
    tile_map = tiles.block_tile_map(index, (n, 3, 4))
    got = kernels.update_and_gather(state, new, index.stream, index.row, index.col, tile_map, *halo, border,
                                    value)
    assert torch.equal(state, expected_state)
    assert torch.equal(got, expected)


def test_large_tiles_many_thread_blocks(kernels):
    """fp16 channels_last, C=256, 16-px tiles: 16-byte vectors and several thread blocks per tile."""
    t, n, c = 16, 2, 256
    state = make_state(n, c, 4 * t, 6 * t, torch.float16, "channels_last")
    index = make_index(n, 4, 6, "random")
    new = torch.randn(len(index), c, t, t, device="cuda").half().contiguous(memory_format=torch.channels_last)
    expected_state = state.clone()
    tiles.scatter_tiles_reference(expected_state, new, index)
    expected = tiles.gather_tiles_reference(expected_state, index, t, (1, 1, 1, 1))
    fused_state = state.clone()
    fused = kernels.update_and_gather(fused_state, new, index.stream, index.row, index.col,
                                      tiles.block_tile_map(index, (n, 4, 6)), 1, 1, 1, 1, "constant", 0.0)
    kernels.scatter_tiles(state, new, index.stream, index.row, index.col)
    assert torch.equal(state, expected_state) and torch.equal(fused_state, expected_state)
    assert torch.equal(kernels.gather_tiles(state, index.stream, index.row, index.col, t, 1, 1, 1, 1,
                                            "constant", 0.0), expected)
    assert torch.equal(fused, expected)


def test_public_functions_dispatch_to_kernels(kernels, monkeypatch):
    """tiles.* on CUDA: kernels by default, converting tiles' dtype and memory order; the env var
    forces the reference."""
    t, n, c = 4, 2, 8
    state = make_state(n, c, 2 * t, 2 * t, torch.float16, "channels_last")
    index = make_index(n, 2, 2, "random")
    new = torch.randn(len(index), c, t, t, device="cuda")  # float32, NCHW
    calls = []
    for name in ("scatter_tiles", "gather_tiles", "update_and_gather"):
        monkeypatch.setattr(kernels, name, (lambda f: lambda *a: calls.append(f.__name__) or f(*a))(
            getattr(kernels, name)))
    expected_state = state.clone()
    tiles.scatter_tiles_reference(expected_state, new, index)
    expected = tiles.gather_tiles_reference(expected_state, index, t, (1, 1, 1, 1))

    fused_state = state.clone()
    assert torch.equal(tiles.update_and_gather(fused_state, new, index, (1, 1, 1, 1)), expected)
    tiles.scatter_tiles(state, new, index)
    got = tiles.gather_tiles(state, index, t, (1, 1, 1, 1))
    assert torch.equal(state, expected_state) and torch.equal(fused_state, expected_state)
    assert torch.equal(got, expected) and got.is_contiguous(memory_format=torch.channels_last)
    assert calls == ["update_and_gather", "scatter_tiles", "gather_tiles"]
    nchw = state.contiguous()
    tiles.update_and_gather(nchw, new, index, (1, 1, 1, 1))  # NCHW: the two kernels, fusion does not pay
    assert calls[3:] == ["scatter_tiles", "gather_tiles"]

    monkeypatch.setenv("BLOCKCOPY_DISABLE_CUDA_KERNELS", "1")
    assert torch.equal(tiles.gather_tiles(state, index, t, (1, 1, 1, 1)), expected)
    assert len(calls) == 5


def test_bad_index_and_shapes_raise_clear_errors(kernels):
    state = make_state(1, 3, 8, 8, torch.float32, "nchw")
    index = make_index(1, 2, 2, "full")
    with pytest.raises(RuntimeError, match="tiles must be"):
        kernels.scatter_tiles(state, torch.zeros(len(index), 4, 4, 4, device="cuda"), index.stream, index.row,
                              index.col)
    with pytest.raises(RuntimeError, match="int64"):
        kernels.gather_tiles(state, index.stream.int(), index.row, index.col, 4, 0, 0, 0, 0, "constant", 0.0)
    with pytest.raises(RuntimeError, match="reflect halo"):
        kernels.gather_tiles(state, index.stream, index.row, index.col, 4, 8, 0, 0, 0, "reflect", 0.0)
    with pytest.raises(RuntimeError, match="unknown border"):
        kernels.gather_tiles(state, index.stream, index.row, index.col, 4, 1, 1, 1, 1, "wrap", 0.0)
    strided = state[:, :, :, ::2]
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.gather_tiles(strided, index.stream, index.row, index.col, 2, 0, 0, 0, 0, "constant", 0.0)
