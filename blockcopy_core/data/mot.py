"""MOTChallenge ground truth (``gt.txt``) as per-frame boxes.

Each line of a MOTChallenge 2D MOT 2015 ``gt.txt`` is
``frame, track_id, left, top, width, height, considered, x_world, y_world, z`` with 1-based frames.
Boxes are returned as ``x1y1x2y2 = (left, top, left + width, top + height)`` in the coordinates of the
file (no 1-pixel shift). Boxes with ``considered == 0`` are not scored by MOTChallenge; they are
returned separately so that evaluation can treat them as ignore regions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

FRAME, TRACK_ID, LEFT, TOP, WIDTH, HEIGHT, CONSIDERED = range(7)
"""Column indices of a MOTChallenge ground-truth row."""

BoxesByFrame = dict[int, torch.Tensor]
"""1-based frame number -> (K, 4) float32 x1y1x2y2 boxes; frames without boxes are absent."""


def read_mot_rows(path: str | Path) -> np.ndarray:
    """Parse a MOTChallenge text file into an (N, C) float64 array, one row per line (C >= 7)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MOTChallenge file not found: {path}")
    if path.stat().st_size == 0:
        return np.zeros((0, 7), dtype=np.float64)
    rows = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
    if rows.shape[1] < 7:
        raise ValueError(f"{path}: expected at least 7 comma-separated columns, got {rows.shape[1]}")
    return rows


def load_mot_ground_truth(path: str | Path, considered_only: bool = True) -> BoxesByFrame:
    """Boxes per 1-based frame from a MOTChallenge ``gt.txt``.

    Args:
        path: the ``gt.txt`` file.
        considered_only: keep only rows with ``considered == 1`` (the boxes MOTChallenge scores).

    Returns:
        frame -> (K, 4) float32 x1y1x2y2 tensor, in file order within a frame.
    """
    rows = read_mot_rows(path)
    if considered_only:
        rows = rows[rows[:, CONSIDERED] != 0]
    return _group_by_frame(rows)


def load_mot_ignore_boxes(path: str | Path) -> BoxesByFrame:
    """The not-considered boxes (``considered == 0``) per 1-based frame: ignore regions for evaluation."""
    rows = read_mot_rows(path)
    return _group_by_frame(rows[rows[:, CONSIDERED] == 0])


def boxes_for_frames(boxes: BoxesByFrame, frames: Iterable[int]) -> list[torch.Tensor]:
    """The boxes of each listed frame, in order, with an empty (0, 4) tensor for frames without any."""
    empty = torch.zeros((0, 4), dtype=torch.float32)
    return [boxes.get(frame, empty) for frame in frames]


def scale_boxes(boxes: BoxesByFrame, source_size: tuple[int, int],
                target_size: tuple[int, int]) -> BoxesByFrame:
    """Rescale boxes from frames of ``source_size`` to frames resized to ``target_size``.

    Sizes are ``(width, height)`` like ``VideoReader(size=...)``; x is scaled by the width ratio, y by
    the height ratio.
    """
    scale = torch.tensor([target_size[0] / source_size[0], target_size[1] / source_size[1]] * 2,
                         dtype=torch.float32)
    return {frame: frame_boxes * scale for frame, frame_boxes in boxes.items()}


def _group_by_frame(rows: np.ndarray) -> BoxesByFrame:
    """(N, C) MOT rows -> frame -> (K, 4) x1y1x2y2 tensor, keeping file order within a frame."""
    rows = rows[np.argsort(rows[:, FRAME], kind="stable")]
    xyxy = rows[:, [LEFT, TOP, LEFT, TOP]].copy()
    xyxy[:, 2:] += rows[:, [WIDTH, HEIGHT]]
    frames, starts = np.unique(rows[:, FRAME].astype(np.int64), return_index=True)
    chunks = np.split(xyxy.astype(np.float32), starts[1:])
    return {int(frame): torch.from_numpy(chunk) for frame, chunk in zip(frames, chunks)}
