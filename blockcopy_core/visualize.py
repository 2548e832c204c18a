"""Drawing BlockCopy's per-frame state as an image mosaic (like the paper's Figures 2-3).

All images are RGB ``uint8`` numpy arrays (H, W, 3); grids, maps and boxes may be tensors or arrays.
:func:`blockcopy_mosaic` composes four panels: the frame with the executed blocks highlighted, the
frame state (each block as of its last execution), the information gain map, and the detections.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

EXECUTED_COLOR = (0, 220, 90)
EXTRA_COLOR = (250, 190, 0)
DETECTION_COLOR = (255, 60, 40)
GROUND_TRUTH_COLOR = (255, 255, 255)
GRID_COLOR = (200, 200, 200)


def to_image(frame: torch.Tensor | np.ndarray) -> np.ndarray:
    """A (3, H, W) tensor / (H, W, 3) array with values 0..255 -> contiguous RGB uint8 (H, W, 3)."""
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu()
        if frame.dim() == 3 and frame.shape[0] == 3:
            frame = frame.permute(1, 2, 0)
        frame = frame.numpy()
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an RGB image (3, H, W) or (H, W, 3), got shape {frame.shape}")
    return np.ascontiguousarray(np.clip(np.rint(frame), 0, 255).astype(np.uint8))


def _as_numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def _grid_mask(grid: torch.Tensor | np.ndarray) -> np.ndarray:
    grid = _as_numpy(grid)
    return grid.reshape(grid.shape[-2:]).astype(bool)


def draw_grid(image: np.ndarray, grid: torch.Tensor | np.ndarray, alpha: float = 0.35,
              extra: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """The image with executed blocks tinted and outlined and thin lines between all blocks.

    Args:
        image: (H, W, 3) RGB uint8.
        grid: (Gh, Gw) (or (1, Gh, Gw)) bool grid of the blocks the policy selected (green);
            Gh and Gw must divide H and W.
        alpha: opacity of the tint.
        extra: optional grid of the same shape: blocks executed without being selected (the engine's
            bucket extras on CUDA), drawn in amber.
    """
    grid = _grid_mask(grid)
    extra = np.zeros_like(grid) if extra is None else _grid_mask(extra)
    if extra.shape != grid.shape:
        raise ValueError(f"the extra grid {extra.shape} does not match the grid {grid.shape}")
    extra = extra & ~grid
    height, width = image.shape[:2]
    rows, cols = grid.shape
    if height % rows or width % cols:
        raise ValueError(f"a {rows}x{cols} grid does not tile a {height}x{width} image")
    block_h, block_w = height // rows, width // cols
    out = image.astype(np.float32)
    for blocks, color in ((grid, EXECUTED_COLOR), (extra, EXTRA_COLOR)):
        mask = np.kron(blocks, np.ones((block_h, block_w), dtype=bool))
        out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, np.float32)
    out = out.astype(np.uint8)
    for row in range(1, rows):
        cv2.line(out, (0, row * block_h), (width - 1, row * block_h), GRID_COLOR, 1)
    for col in range(1, cols):
        cv2.line(out, (col * block_w, 0), (col * block_w, height - 1), GRID_COLOR, 1)
    for blocks, color in ((grid, EXECUTED_COLOR), (extra, EXTRA_COLOR)):
        for row, col in zip(*np.nonzero(blocks)):
            top_left = (int(col * block_w), int(row * block_h))
            bottom_right = (int((col + 1) * block_w - 1), int((row + 1) * block_h - 1))
            cv2.rectangle(out, top_left, bottom_right, color, 2)
    return out


def colorize(values: torch.Tensor | np.ndarray, size: tuple[int, int], vmax: float = 1.0) -> np.ndarray:
    """An (h, w) map of values in [0, vmax] as an (H, W, 3) RGB 'inferno' image, nearest-upscaled.

    Args:
        values: (h, w) map.
        size: output ``(H, W)``.
        vmax: the value shown at full intensity (larger values saturate).
    """
    values = _as_numpy(values).astype(np.float32)
    scaled = np.clip(values / vmax, 0.0, 1.0) * 255.0
    resized = cv2.resize(scaled.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return cv2.cvtColor(cv2.applyColorMap(resized, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def draw_boxes(image: np.ndarray, boxes: torch.Tensor | np.ndarray, color: Sequence[int],
               scores: torch.Tensor | np.ndarray | None = None, thickness: int = 2) -> np.ndarray:
    """The image with (K, 4) x1y1x2y2 boxes drawn, and each score printed above its box if given."""
    out = image.copy()
    boxes = _as_numpy(boxes).reshape(-1, 4)
    scores = None if scores is None else _as_numpy(scores).reshape(-1)
    for k, (x1, y1, x2, y2) in enumerate(np.rint(boxes).astype(int)):
        cv2.rectangle(out, (int(x1), int(y1)), (int(x2), int(y2)), tuple(color), thickness)
        if scores is not None:
            cv2.putText(out, f"{scores[k]:.2f}", (int(x1), max(int(y1) - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.35, tuple(color), 1, cv2.LINE_AA)
    return out


def put_label(image: np.ndarray, text: str) -> np.ndarray:
    """The image with ``text`` on a dark strip in its top-left corner."""
    out = image.copy()
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
    cv2.rectangle(out, (0, 0), (width + 8, height + baseline + 6), (0, 0, 0), -1)
    cv2.putText(out, text, (4, height + 3), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def tile(panels: Sequence[np.ndarray], columns: int = 2) -> np.ndarray:
    """Equal-sized (H, W, 3) panels in rows of ``columns`` (missing cells black)."""
    if not panels:
        raise ValueError("tile needs at least one panel")
    height, width = panels[0].shape[:2]
    if any(panel.shape[:2] != (height, width) for panel in panels):
        raise ValueError("all panels must have the same size")
    rows = -(-len(panels) // columns)
    out = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for i, panel in enumerate(panels):
        row, col = divmod(i, columns)
        out[row * height:(row + 1) * height, col * width:(col + 1) * width] = panel
    return out


def blockcopy_mosaic(frame: torch.Tensor | np.ndarray, grid: torch.Tensor | np.ndarray,
                     frame_state: torch.Tensor | np.ndarray, ig_map: torch.Tensor | np.ndarray | None,
                     boxes: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray,
                     ground_truth: torch.Tensor | np.ndarray | None = None, scale: float = 0.5,
                     title: str = "", executed: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """A 2x2 mosaic of one frame of one stream.

    Panels: (1) the frame with the selected blocks tinted green (bucket extras amber), (2) the frame
    state, (3) the IG map over a dimmed frame (black on a clip's first frame, which has no IG), (4) the
    frame with the detections (and the ground truth, thin white, if given).

    Args:
        frame: (3, H, W) or (H, W, 3), values 0..255.
        grid: (Gh, Gw) bool blocks the policy selected.
        frame_state: like ``frame``: each block's pixels at its last execution.
        ig_map: (h, w) IG map at any integer stride, or None.
        boxes, scores: (K, 4) x1y1x2y2 frame-pixel detections to draw and their (K,) scores.
        ground_truth: optional (M, 4) x1y1x2y2 boxes.
        scale: panel size relative to the frame.
        title: printed on the first panel.
        executed: optional (Gh, Gw) bool blocks that actually ran (a superset of ``grid`` on CUDA,
            where the engine rounds up to its buckets).

    Returns:
        (2 * round(H * scale), 2 * round(W * scale), 3) RGB uint8.
    """
    image = to_image(frame)
    height, width = image.shape[:2]
    size = (int(round(width * scale)), int(round(height * scale)))

    def shrink(panel: np.ndarray) -> np.ndarray:
        return cv2.resize(panel, size, interpolation=cv2.INTER_AREA)

    selected = _grid_mask(grid)
    ran = None if executed is None else _grid_mask(executed)
    label = f"{title} selected {selected.mean():.0%}"
    if ran is not None and (ran & ~selected).any():
        label += f", ran {ran.mean():.0%}"
    panel_grid = put_label(draw_grid(shrink(image), selected, extra=ran), label.strip())
    panel_state = put_label(shrink(to_image(frame_state)), "frame state")
    if ig_map is None:
        panel_ig = put_label(np.zeros_like(panel_state), "information gain (full frame)")
    else:
        heat = colorize(ig_map, (size[1], size[0]))
        panel_ig = put_label(cv2.addWeighted(shrink(image) // 3, 1.0, heat, 0.8, 0), "information gain")
    panel_det = shrink(image)
    if ground_truth is not None:
        panel_det = draw_boxes(panel_det, _as_numpy(ground_truth) * scale, GROUND_TRUTH_COLOR, thickness=1)
    panel_det = put_label(draw_boxes(panel_det, _as_numpy(boxes) * scale, DETECTION_COLOR, scores), "detections")
    return tile([panel_grid, panel_state, panel_ig, panel_det])
