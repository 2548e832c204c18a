"""Video reading/writing, PETS09-S2L1 lookup and MOTChallenge ground-truth loading."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from blockcopy_core.data import (VideoReader, VideoWriter, boxes_for_frames, load_mot_ground_truth,
                                 load_mot_ignore_boxes, pets09_s2l1_paths, read_mot_rows, scale_boxes)
from blockcopy_core.paths import shared_dir

PETS_DIR = shared_dir() / "data/pets09_s2l1"
PETS_VIDEO = PETS_DIR / "vtest.avi"
PETS_GT = PETS_DIR / "gt.txt"
needs_video = pytest.mark.skipif(not PETS_VIDEO.is_file(), reason=f"{PETS_VIDEO} not present")
needs_gt = pytest.mark.skipif(not PETS_GT.is_file(), reason=f"{PETS_GT} not present")


def _raw_bgr_frames(path: Path, count: int) -> list[np.ndarray]:
    """The first ``count`` frames as OpenCV decodes them (BGR)."""
    capture = cv2.VideoCapture(str(path))
    frames = [capture.read()[1] for _ in range(count)]
    capture.release()
    return frames


@needs_video
def test_reader_yields_rgb_frames_of_the_real_video():
    reader = VideoReader(PETS_VIDEO, stop=2)
    frames = list(reader)
    raw = _raw_bgr_frames(PETS_VIDEO, 2)
    assert len(reader) == len(frames) == 2
    for frame, bgr in zip(frames, raw):
        assert frame.shape == (576, 768, 3) and frame.dtype == np.uint8
        np.testing.assert_array_equal(frame, bgr[..., ::-1])
    assert reader.fps > 0 and reader.source_size == (768, 576)


@needs_video
def test_reader_announces_and_decodes_795_frames():
    reader = VideoReader(PETS_VIDEO)
    assert len(reader) == 795
    capture = cv2.VideoCapture(str(PETS_VIDEO))
    decoded = 0
    while capture.grab():
        decoded += 1
    capture.release()
    assert decoded == 795


@needs_video
def test_reader_frame_range_is_zero_based_and_stop_exclusive():
    raw = _raw_bgr_frames(PETS_VIDEO, 8)
    reader = VideoReader(PETS_VIDEO, start=5, stop=8)
    assert len(reader) == 3 and list(reader.frame_indices) == [5, 6, 7]
    for frame, bgr in zip(reader, raw[5:]):
        np.testing.assert_array_equal(frame, bgr[..., ::-1])


@needs_video
def test_reader_resizes_and_returns_tensors():
    reader = VideoReader(PETS_VIDEO, stop=1, size=(384, 288), as_tensor=True)
    (frame,) = list(reader)
    assert frame.shape == (3, 288, 384) and frame.dtype == torch.uint8
    expected = cv2.resize(_raw_bgr_frames(PETS_VIDEO, 1)[0], (384, 288), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(frame.permute(1, 2, 0).numpy(), expected[..., ::-1])


@needs_video
def test_reader_can_be_iterated_twice():
    reader = VideoReader(PETS_VIDEO, start=3, stop=5)
    first, second = list(reader), list(reader)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


@needs_video
@pytest.mark.parametrize("start, stop", [(0, 0), (5, 3), (-1, 4), (0, 796)])
def test_reader_rejects_bad_ranges(start, stop):
    with pytest.raises(ValueError, match="frame range"):
        VideoReader(PETS_VIDEO, start=start, stop=stop)


def test_reader_errors_on_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        VideoReader(tmp_path / "missing.avi")
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"this is not a video" * 100)
    with pytest.raises(OSError, match="garbage.avi"):
        VideoReader(garbage)


@pytest.mark.parametrize("suffix", [".mp4", ".avi"])
def test_writer_round_trip(tmp_path, suffix):
    """Flat-colour frames survive mp4v encoding closely enough to check size, count and RGB order."""
    colours = [(200, 40, 10), (10, 200, 40), (40, 10, 200), (128, 128, 128)]
    path = tmp_path / f"clip{suffix}"
    with VideoWriter(path, fps=5) as writer:
        for colour in colours[:2]:
            writer.write(np.full((48, 64, 3), colour, dtype=np.uint8))
        for colour in colours[2:]:
            writer.write(torch.tensor(colour, dtype=torch.uint8)[:, None, None].expand(3, 48, 64))
    assert writer.num_frames == 4
    reader = VideoReader(path)
    frames = list(reader)
    assert len(reader) == len(frames) == 4 and reader.source_size == (64, 48)
    for frame, colour in zip(frames, colours):
        np.testing.assert_allclose(frame.reshape(-1, 3).mean(axis=0), colour, atol=8)


def test_writer_rejects_frames_of_another_size(tmp_path):
    with VideoWriter(tmp_path / "clip.mp4", fps=5) as writer:
        writer.write(np.zeros((48, 64, 3), dtype=np.uint8))
        with pytest.raises(ValueError, match="frame size"):
            writer.write(np.zeros((32, 64, 3), dtype=np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((48, 64, 3), dtype=np.float32))


def test_pets09_paths_without_ground_truth(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKCOPY_SHARED", str(tmp_path / "shared"))
    monkeypatch.setenv("BLOCKCOPY_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "shared/data/pets09_s2l1"
    data.mkdir(parents=True)
    (data / "vtest.avi").touch()
    with pytest.raises(FileNotFoundError, match="MOTChallenge 2D MOT 2015"):
        pets09_s2l1_paths()
    assert pets09_s2l1_paths(require_ground_truth=False) == (data / "vtest.avi", None)
    cached_gt = tmp_path / "cache/pets09_s2l1/gt.txt"
    cached_gt.parent.mkdir(parents=True)
    cached_gt.touch()
    assert pets09_s2l1_paths() == (data / "vtest.avi", cached_gt)


@needs_video
@needs_gt
def test_pets09_paths_find_the_shared_copy():
    assert pets09_s2l1_paths() == (PETS_VIDEO, PETS_GT)


@needs_gt
def test_ground_truth_of_the_real_sequence():
    considered = load_mot_ground_truth(PETS_GT)
    every = load_mot_ground_truth(PETS_GT, considered_only=False)
    ignore = load_mot_ignore_boxes(PETS_GT)
    assert sum(len(b) for b in considered.values()) == 4476
    assert sum(len(b) for b in every.values()) == 4650
    assert sum(len(b) for b in ignore.values()) == 4650 - 4476
    assert min(considered) == 1 and max(considered) == 795 and len(considered) == 795
    assert len(np.unique(read_mot_rows(PETS_GT)[:, 1])) == 19
    # First line of gt.txt: 1,9,499,158,31.03,75.17,1,...
    torch.testing.assert_close(considered[1][0], torch.tensor([499.0, 158.0, 530.03, 233.17]))
    assert all(b.dtype == torch.float32 and b.shape[1] == 4 for b in considered.values())


def test_ground_truth_parsing_and_scaling(tmp_path):
    path = tmp_path / "gt.txt"
    path.write_text("3,1,10,20,30,40,1,-1,-1,-1\n"
                    "1,2,0,0,10,10,0,-1,-1,-1\n"
                    "1,1,5,6,7,8,1,-1,-1,-1\n"
                    "3,2,1,2,3,4,1,-1,-1,-1\n")
    boxes = load_mot_ground_truth(path)
    assert sorted(boxes) == [1, 3]
    torch.testing.assert_close(boxes[1], torch.tensor([[5.0, 6.0, 12.0, 14.0]]))
    torch.testing.assert_close(boxes[3], torch.tensor([[10.0, 20.0, 40.0, 60.0], [1.0, 2.0, 4.0, 6.0]]))
    torch.testing.assert_close(load_mot_ignore_boxes(path)[1], torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    per_frame = boxes_for_frames(boxes, range(1, 4))
    assert [len(b) for b in per_frame] == [1, 0, 2] and per_frame[1].shape == (0, 4)
    half = scale_boxes(boxes, source_size=(100, 80), target_size=(50, 20))
    torch.testing.assert_close(half[1], torch.tensor([[2.5, 1.5, 6.0, 3.5]]))


def test_ground_truth_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_mot_ground_truth(tmp_path / "missing.txt")
    short = tmp_path / "short.txt"
    short.write_text("1,2,3,4\n")
    with pytest.raises(ValueError, match="7 comma-separated columns"):
        load_mot_ground_truth(short)
    empty = tmp_path / "empty.txt"
    empty.touch()
    assert load_mot_ground_truth(empty) == {}
