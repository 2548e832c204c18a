"""Bad frames and grids get clear errors that name the problem."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import blockcopy_core as bc

BLOCK = 16


@pytest.fixture
def sparse():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2, padding=1))
    return bc.convert(model.eval(), BLOCK)


def frames(n=2, h=32, w=48):
    return torch.randn(n, 3, h, w)


def grid(n=2, gh=2, gw=3, value=True):
    return torch.full((n, 1, gh, gw), value, dtype=torch.bool)


def test_frame_size_not_divisible_by_block_size(sparse):
    with pytest.raises(bc.InvalidInputError, match=r"40x48 .* not divisible by the block size 16.*48x48"):
        sparse(frames(h=40), grid(gh=2))


@pytest.mark.parametrize("bad, message", [
    (grid(gh=3), r"grid shape \(2, 1, 3, 3\) .* expected \(2, 1, 2, 3\)"),
    (grid(n=1), r"expected \(2, 1, 2, 3\)"),
    (grid().squeeze(1), r"expected \(2, 1, 2, 3\)"),
    (grid().float(), "torch.bool"),
    ([[True]], "bool tensor"),
])
def test_bad_grid(sparse, bad, message):
    with pytest.raises(bc.InvalidInputError, match=message):
        sparse(frames(), bad)


def test_bad_frames(sparse):
    with pytest.raises(bc.InvalidInputError, match=r"\(N, C, H, W\)"):
        sparse(torch.randn(3, 32, 48), grid())
    with pytest.raises(bc.InvalidInputError, match="floating point"):
        sparse(frames().to(torch.uint8), grid())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_frame(sparse, value):
    x = frames()
    x[1, 0, 5, 7] = value
    with pytest.raises(bc.InvalidInputError, match="NaN or infinite"):
        sparse(x, grid())


def test_first_frame_must_execute_everything(sparse):
    g = grid()
    g[0, 0, 1, 1] = False
    with pytest.raises(bc.InvalidInputError, match="first frame after reset"):
        sparse(frames(), g)
    sparse(frames(), grid())
    sparse.reset()
    with pytest.raises(bc.InvalidInputError, match="first frame after reset"):
        sparse(frames(), g)


@pytest.mark.parametrize("x, g", [(frames(h=64), grid(gh=4)), (frames(n=3), grid(n=3)),
                                  (frames().double(), grid())])
def test_clip_format_change_needs_reset(sparse, x, g):
    sparse(frames(), grid())
    with pytest.raises(bc.InvalidInputError, match="changed mid-clip.*reset"):
        sparse(x, g)
    sparse.reset()
    sparse.model.to(x.dtype)
    sparse(x, g)


def test_reset_starts_a_new_clip(sparse):
    first = sparse(frames(), grid())
    sparse.reset()
    x = frames()
    torch.testing.assert_close(sparse(x, grid()), sparse.model(x))
    assert not torch.equal(first, sparse(x, grid()))


def test_frame_state_holds_each_blocks_last_executed_pixels(sparse):
    a, b = frames(), frames()
    sparse(a, grid())
    g = grid(value=False)
    g[1, 0, 0, 2] = True
    sparse(b, g)
    expected = a.clone()
    expected[1, :, 0:16, 32:48] = b[1, :, 0:16, 32:48]
    assert torch.equal(sparse.frame_state, expected)


def test_outputs_are_copies(sparse):
    out = sparse(frames(), grid())
    out.zero_()
    assert not torch.equal(sparse(frames(), grid(value=False)), out)
