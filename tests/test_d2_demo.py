"""tools/demo.py: an image folder or a video in, an annotated video out (CPU).

The BlockCopy RetinaNet config is made small by opts (ResNet-18, 64 FPN channels); the PETS09 run is
skipped without the shared PETS09 files and CenterNet model.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.data.catalog import Metadata  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

from blockcopy_core.visualize import EXECUTED_COLOR  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RETINANET = REPO / "configs" / "Cityscapes" / "retinanet_R_50_FPN_blockcopy_tau0.3.yaml"
PETS09_TAU03 = REPO / "configs" / "PETS09" / "centernet_mnv3_blockcopy_tau0.3.yaml"
SMALL = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18",
         "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "64",
         "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "512", "MODEL.BLOCKCOPY.WARMUP_CLIPS", "0",
         "TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
HEIGHT, WIDTH, FRAMES, BLOCK = 256, 512, 4, 128  # a 2x4 grid of 128-px blocks, no resizing


def _load_demo():
    spec = importlib.util.spec_from_file_location("_tool_demo", REPO / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


def _frames() -> list[np.ndarray]:
    """Smooth RGB frames (they survive the video codec) with a white square moving right."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames = []
    for k in range(FRAMES):
        rgb = np.stack([x * 200 // WIDTH + 30, y * 200 // HEIGHT + 30, np.full_like(x, 110)], -1).astype(np.uint8)
        rgb[60:180, 40 + 30 * k:140 + 30 * k] = 255
        frames.append(rgb)
    return frames


def _write_folder(folder: Path, frames: list[np.ndarray]) -> Path:
    folder.mkdir()
    for k, rgb in enumerate(frames):
        cv2.imwrite(str(folder / f"frame_{k:03d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return folder


def _read_video(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


def test_image_folder_gives_a_video_with_the_executed_blocks_drawn(tmp_path, one_thread):
    frames = _frames()
    folder = _write_folder(tmp_path / "clip", frames)
    out = tmp_path / "out" / "demo.mp4"
    # no detection drawn (threshold above any score): what differs from the frame is the blocks' tint
    summary = demo.main(["--config-file", str(RETINANET), "--input", str(folder), "--output", str(out),
                         "--confidence-threshold", "1.01", *SMALL])
    written = _read_video(out)
    assert len(written) == FRAMES == summary["frames"]
    assert all(frame.shape == (HEIGHT, WIDTH, 3) for frame in written)
    assert summary["detections"] == [0] * FRAMES

    grids = summary["grids"]
    assert all(grid.shape == (HEIGHT // BLOCK, WIDTH // BLOCK) for grid in grids)
    assert grids[0].all()  # a clip's first frame runs every block
    assert any(grid.any() and not grid.all() for grid in grids[1:])  # the policy ran some blocks, skipped others
    stats = summary["statistics"]
    assert stats["frames"] == FRAMES
    assert stats["executed_fraction"] == pytest.approx(np.mean([grid.mean() for grid in grids]))

    tint = np.asarray(EXECUTED_COLOR, np.float32)
    margin, label_rows = 12, 30  # away from the outlines and grid lines, and below the text line
    checked = {True: 0, False: 0}
    for rgb, grid, drawn in zip(frames, grids, written):
        plain = rgb.astype(np.float32)
        tinted = 0.65 * plain + 0.35 * tint
        for row, col in np.ndindex(grid.shape):
            top = max(row * BLOCK + margin, label_rows)
            area = np.s_[top:(row + 1) * BLOCK - margin, col * BLOCK + margin:(col + 1) * BLOCK - margin]
            to_plain = np.abs(drawn[area] - plain[area]).mean()
            to_tinted = np.abs(drawn[area] - tinted[area]).mean()
            executed = bool(grid[row, col])
            # the two expectations are 12-30 levels apart here; the codec's error is a few levels
            near, far = (to_tinted, to_plain) if executed else (to_plain, to_tinted)
            assert near < 5 and far > 3 * near, (row, col, executed, to_plain, to_tinted)
            checked[executed] += 1
    assert checked[True] and checked[False]


def test_detections_are_drawn_with_class_names_above_the_threshold():
    rgb = np.full((HEIGHT, WIDTH, 3), 100, np.uint8)
    instances = Instances((HEIGHT, WIDTH))
    instances.pred_boxes = Boxes(torch.tensor([[20.0, 20.0, 120.0, 200.0], [300.0, 40.0, 460.0, 220.0]]))
    instances.scores = torch.tensor([0.9, 0.2])
    instances.pred_classes = torch.tensor([1, 0])
    metadata = Metadata(name="demo_test", thing_classes=["person", "car"])
    drawn, count = demo.draw_output(rgb, {"instances": instances}, metadata, threshold=0.5)
    assert count == 1
    changed = np.abs(drawn.astype(int) - rgb).sum(-1) > 30
    assert changed[15:205, 15:125].any()  # the confident box
    assert not changed[35:225, 295:465].any()  # the one below the threshold is not drawn


def test_blocks_map_back_onto_a_resized_frame():
    rgb = np.full((300, 600, 3), 100, np.uint8)  # network input 256x512 (resized), a 2x4 grid of 128
    grid = np.zeros((2, 4), bool)
    grid[1, 3] = True
    drawn = demo.draw_blocks(rgb, grid, (256, 512), BLOCK)
    assert drawn.shape == rgb.shape
    green = drawn[..., 1].astype(int) - drawn[..., 0]  # the tint's green minus red (0 on the gray frame and grid lines)
    assert green[160:295, 460:595].min() > 30  # the executed block: rows 150-300, columns 450-600 of the frame
    assert np.abs(green[:140, :440]).max() == 0  # blocks that did not run


def test_input_errors_are_clear(tmp_path):
    base = ["--config-file", str(RETINANET), "--output", str(tmp_path / "out.mp4"), *SMALL]
    with pytest.raises(SystemExit, match="no such video file or folder"):
        demo.main(["--input", str(tmp_path / "missing.mp4"), *base])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        demo.main(["--input", str(tmp_path / "empty"), *base])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    with pytest.raises(SystemExit, match="broken.mp4"):
        demo.main(["--input", str(broken), *base])
    mixed = _write_folder(tmp_path / "mixed", _frames()[:2])
    cv2.imwrite(str(mixed / "frame_999.png"), np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(SystemExit, match="one size.*64x64"):
        demo.main(["--input", str(mixed), *base])
    assert not (tmp_path / "out.mp4").exists()


def _pets09_files() -> tuple[Path, bool]:
    try:
        from blockcopy_d2.centernet import centernet_model_dir
        from blockcopy_d2.data import pets09_s2l1_files
        from detectron2.config import get_cfg

        from blockcopy_d2.centernet import add_centernet_config
        cfg = get_cfg()
        add_centernet_config(cfg)
        centernet_model_dir(cfg)
        return pets09_s2l1_files()[0], True
    except FileNotFoundError:
        return Path(), False


PETS09_VIDEO, PETS09_PRESENT = _pets09_files()


@pytest.mark.skipif(not PETS09_PRESENT, reason="needs the shared PETS09-S2L1 files and CenterNet model")
def test_pets09_video_with_blockcopy_centernet(tmp_path, one_thread):
    out = tmp_path / "pets09.mp4"
    summary = demo.main(["--config-file", str(PETS09_TAU03), "--input", str(PETS09_VIDEO), "--output", str(out),
                         "--frames", "5", "MODEL.DEVICE", "cpu", "MODEL.BLOCKCOPY.WARMUP_CLIPS", "0"])
    written = _read_video(out)
    assert len(written) == 5 == summary["frames"]
    assert all(frame.shape == (576, 768, 3) for frame in written)
    assert summary["grids"][0].shape == (9, 12) and summary["grids"][0].all()
    assert sum(summary["detections"]) > 0  # the COCO CenterNet finds the pedestrians
    assert summary["statistics"]["frames"] == 5
