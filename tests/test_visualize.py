"""Tests for blockcopy_core.visualize: which pixels the panels colour, and the mosaic's layout."""
import numpy as np
import pytest
import torch

from blockcopy_core.visualize import (EXECUTED_COLOR, EXTRA_COLOR, blockcopy_mosaic, colorize, draw_boxes,
                                      draw_grid, tile)


def gray(height=64, width=96, value=100):
    return np.full((height, width, 3), value, dtype=np.uint8)


def test_draw_grid_tints_selected_green_and_extras_amber_only():
    grid = torch.zeros(2, 3, dtype=torch.bool)
    grid[0, 1] = True
    extra = torch.zeros(2, 3, dtype=torch.bool)
    extra[0, 1] = extra[1, 2] = True  # (0, 1) is selected anyway: it stays green
    out = draw_grid(gray(), grid, alpha=0.5, extra=extra)
    expected_green = np.rint(0.5 * 100 + 0.5 * np.asarray(EXECUTED_COLOR)).astype(np.uint8)
    expected_amber = np.rint(0.5 * 100 + 0.5 * np.asarray(EXTRA_COLOR)).astype(np.uint8)
    # block interiors (away from outlines and grid lines); blocks are 32x32
    np.testing.assert_allclose(out[16, 48], expected_green, atol=1)
    np.testing.assert_allclose(out[48, 80], expected_amber, atol=1)
    np.testing.assert_array_equal(out[16, 16], [100, 100, 100])
    np.testing.assert_array_equal(out[48, 48], [100, 100, 100])
    np.testing.assert_array_equal(out[0, 33], EXECUTED_COLOR)  # outline of the selected block


def test_draw_grid_rejects_grids_that_do_not_tile_the_image():
    with pytest.raises(ValueError, match="does not tile"):
        draw_grid(gray(64, 96), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match"):
        draw_grid(gray(), torch.ones(2, 3, dtype=torch.bool), extra=torch.ones(3, 2, dtype=torch.bool))


def test_colorize_maps_zero_dark_and_one_bright():
    image = colorize(torch.tensor([[0.0, 1.0], [2.0, 0.5]]), (4, 4))
    assert image.shape == (4, 4, 3) and image.dtype == np.uint8
    assert image[0, 0].sum() < 30 and image[0, 3].sum() > 450  # inferno: black .. pale yellow
    np.testing.assert_array_equal(image[2, 0], image[0, 3])  # values above vmax saturate


def test_draw_boxes_outlines_in_colour():
    out = draw_boxes(gray(), torch.tensor([[10.0, 20.0, 40.0, 50.0]]), (255, 0, 0), thickness=1)
    np.testing.assert_array_equal(out[20, 25], [255, 0, 0])
    np.testing.assert_array_equal(out[35, 25], [100, 100, 100])


def test_mosaic_layout_and_labels():
    frame = torch.full((3, 64, 96), 120.0)
    grid = torch.zeros(2, 3, dtype=torch.bool)
    grid[1, 1] = True
    mosaic = blockcopy_mosaic(frame, grid, frame, torch.rand(16, 24), torch.tensor([[8.0, 8.0, 30.0, 40.0]]),
                              torch.tensor([0.9]), ground_truth=torch.tensor([[10.0, 10.0, 28.0, 38.0]]),
                              scale=1.0, title="#2", executed=grid | torch.eye(2, 3, dtype=torch.bool))
    assert mosaic.shape == (128, 192, 3) and mosaic.dtype == np.uint8
    no_ig = blockcopy_mosaic(frame, grid, frame, None, torch.zeros(0, 4), torch.zeros(0), scale=1.0)
    assert no_ig[64 + 24:, :96].max() == 0, "no IG on a full frame: a black panel (below its label)"
    assert blockcopy_mosaic(frame, grid, frame, None, torch.zeros(0, 4), torch.zeros(0)).shape == (64, 96, 3)


def test_tile_checks_its_panels():
    with pytest.raises(ValueError, match="at least one"):
        tile([])
    with pytest.raises(ValueError, match="same size"):
        tile([gray(), gray(32, 32)])
    assert tile([gray()] * 3).shape == (128, 192, 3)
