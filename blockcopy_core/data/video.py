"""Reading and writing video as RGB frames, and locating the PETS 2009 S2L1 sequence.

OpenCV decodes to BGR and fails silently (an empty capture, ``read()`` returning ``False``); the
classes here convert to RGB and turn those silent failures into exceptions.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch

from ..paths import cache_dir, shared_dir

Size = tuple[int, int]
"""An image size as ``(width, height)``, the order OpenCV uses."""


class VideoReader:
    """Iterate the frames of a video file as RGB ``uint8`` arrays or tensors.

    Frames are numbered from 0 (the first decoded frame); ``start``/``stop`` select the frames
    ``start, start + 1, ..., stop - 1`` like a Python slice. Frame ``k`` here is frame ``k + 1`` of
    MOTChallenge ground truth, which counts from 1.

    Each iteration re-opens the file, so a reader can be iterated more than once. Frames before
    ``start`` are skipped with ``grab()`` rather than seeking, which is exact for any codec.

    Args:
        path: video file readable by OpenCV's FFmpeg backend.
        start: first frame to yield (0-based, inclusive).
        stop: frame to stop before (0-based, exclusive); ``None`` for the end of the video.
        size: ``(width, height)`` to resize every frame to (``cv2.INTER_AREA``); ``None`` keeps the
            decoded size.
        as_tensor: yield ``torch.uint8`` tensors of shape (3, H, W) instead of numpy (H, W, 3).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OSError: OpenCV cannot open the file or decode its first frame.
        ValueError: the frame range is empty or out of bounds, or ``size`` is not positive.
    """

    def __init__(self, path: str | Path, start: int = 0, stop: int | None = None,
                 size: Size | None = None, as_tensor: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"video file not found: {self.path}")
        capture = _open_capture(self.path)
        try:
            ok, first = capture.read()
            if not ok or first is None:
                raise OSError(f"OpenCV opened {self.path} but could not decode its first frame")
            self.fps = float(capture.get(cv2.CAP_PROP_FPS))
            self.num_source_frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        finally:
            capture.release()
        if self.num_source_frames <= 0:
            raise OSError(f"{self.path} does not announce its frame count; cannot select a range")
        self.source_size: Size = (first.shape[1], first.shape[0])
        self.start, self.stop = _check_range(start, stop, self.num_source_frames)
        if size is not None and (len(size) != 2 or min(size) <= 0):
            raise ValueError(f"size must be a positive (width, height), got {size}")
        self.size: Size = (int(size[0]), int(size[1])) if size is not None else self.source_size
        self.as_tensor = as_tensor

    def __len__(self) -> int:
        """Number of frames the reader yields: ``stop - start``."""
        return self.stop - self.start

    @property
    def frame_indices(self) -> range:
        """The 0-based indices of the yielded frames in the source video."""
        return range(self.start, self.stop)

    def __iter__(self) -> Iterator[np.ndarray | torch.Tensor]:
        """Yield RGB frames: numpy (H, W, 3) or, with ``as_tensor``, torch (3, H, W), ``uint8``.

        Raises:
            OSError: the stream ends before ``stop`` (the header announced more frames than it has).
        """
        capture = _open_capture(self.path)
        try:
            for index in range(self.start):
                if not capture.grab():
                    raise OSError(f"{self.path} ended at frame {index} while skipping to {self.start}")
            for index in self.frame_indices:
                ok, bgr = capture.read()
                if not ok or bgr is None:
                    raise OSError(f"{self.path} ended at frame {index}; its header announces "
                                  f"{self.num_source_frames} frames")
                yield self._convert(bgr)
        finally:
            capture.release()

    def _convert(self, bgr: np.ndarray) -> np.ndarray | torch.Tensor:
        """(H0, W0, 3) BGR -> resized RGB numpy (H, W, 3) or tensor (3, H, W)."""
        if self.size != self.source_size:
            bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if self.as_tensor:
            return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
        return rgb


class VideoWriter:
    """Write RGB frames to a video file with ``cv2.VideoWriter``; use as a context manager.

    The frame size is taken from the first frame; later frames must have the same size. The file is
    opened on the first ``write``, and its parent folder is created.

    Args:
        path: output file, e.g. ``out.mp4`` or ``out.avi``.
        fps: frames per second stored in the container.
        fourcc: four-character codec code; ``mp4v`` (MPEG-4 part 2) is encodable by the OpenCV
            wheels in both .mp4 and .avi.
    """

    def __init__(self, path: str | Path, fps: float, fourcc: str = "mp4v") -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if len(fourcc) != 4:
            raise ValueError(f"fourcc must have four characters, got {fourcc!r}")
        self.path = Path(path)
        self.fps = float(fps)
        self.fourcc = fourcc
        self.size: Size | None = None
        self.num_frames = 0
        self._writer: cv2.VideoWriter | None = None

    def write(self, frame: np.ndarray | torch.Tensor) -> None:
        """Append one RGB ``uint8`` frame: numpy (H, W, 3) or tensor (3, H, W)."""
        rgb = _to_rgb_array(frame)
        size = (rgb.shape[1], rgb.shape[0])
        if self._writer is None:
            self._open(size)
        elif size != self.size:
            raise ValueError(f"frame size {size} differs from the video's {self.size}")
        self._writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.num_frames += 1

    def close(self) -> None:
        """Finish the file. Closing a writer that never got a frame writes nothing."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open(self, size: Size) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*self.fourcc), self.fps, size)
        if not writer.isOpened():
            raise OSError(f"OpenCV cannot write {self.path} with codec {self.fourcc!r} at size {size}")
        self._writer, self.size = writer, size


def _open_capture(path: Path) -> cv2.VideoCapture:
    """Open ``path`` with OpenCV, raising instead of returning an empty capture."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise OSError(f"OpenCV cannot open {path} as a video (unknown format or corrupt file)")
    return capture


def _check_range(start: int, stop: int | None, num_frames: int) -> tuple[int, int]:
    """Validate a 0-based ``[start, stop)`` frame range against a video of ``num_frames``."""
    stop = num_frames if stop is None else stop
    if not 0 <= start < stop <= num_frames:
        raise ValueError(f"frame range [{start}, {stop}) is empty or outside the video's "
                         f"{num_frames} frames (0-based, stop exclusive)")
    return start, stop


def _to_rgb_array(frame: np.ndarray | torch.Tensor) -> np.ndarray:
    """RGB ``uint8`` numpy (H, W, 3) or tensor (3, H, W) -> contiguous numpy (H, W, 3)."""
    if isinstance(frame, torch.Tensor):
        if frame.ndim != 3 or frame.shape[0] != 3:
            raise ValueError(f"tensor frames must be (3, H, W), got {tuple(frame.shape)}")
        frame = frame.detach().cpu().permute(1, 2, 0).numpy()
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB (H, W, 3), got {frame.dtype} {frame.shape}")
    return np.ascontiguousarray(frame)


PETS09_VIDEO_SHA256 = "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf"
_PETS09_SUBDIR = "data/pets09_s2l1"
_OPENCV_DOC_VIDEO = "usr/share/doc/opencv-doc/examples/data/vtest.avi"


def pets09_s2l1_paths(require_ground_truth: bool = True) -> tuple[Path, Path | None]:
    """Locate PETS 2009 S2L1 (view 1): the video and its MOTChallenge ground truth.

    Looks in ``shared_dir() / "data/pets09_s2l1"`` (``vtest.avi``, ``gt.txt``), then in
    ``cache_dir() / "pets09_s2l1"``. A missing video is fetched from Debian's ``opencv-doc`` package
    (``apt-get download`` + ``dpkg -x``), checked against its sha256 and cached. The ground truth has
    no such source.

    Args:
        require_ground_truth: raise when ``gt.txt`` is missing; if ``False``, return ``None`` for it
            so that a caller can run without ground truth.

    Returns:
        ``(video_path, gt_path)``; ``gt_path`` is ``None`` only when missing and not required.

    Raises:
        FileNotFoundError: ``gt.txt`` is missing and ``require_ground_truth`` is set.
        RuntimeError: the video is missing and cannot be fetched with apt-get/dpkg.
    """
    shared = shared_dir() / _PETS09_SUBDIR
    cached = cache_dir() / "pets09_s2l1"
    gt = next((p for p in (shared / "gt.txt", cached / "gt.txt") if p.is_file()), None)
    if gt is None and require_ground_truth:
        raise FileNotFoundError(
            "PETS09-S2L1 ground truth not found. Put the MOTChallenge 2D MOT 2015 file "
            f"train/PETS09-S2L1/gt/gt.txt at {shared / 'gt.txt'} or {cached / 'gt.txt'}, "
            "or pass require_ground_truth=False to run without it.")
    video = shared / "vtest.avi"
    if not video.is_file():
        video = cached / "vtest.avi"
        if not video.is_file():
            _fetch_opencv_doc_video(video)
    return video, gt


def _fetch_opencv_doc_video(destination: Path) -> None:
    """Extract ``vtest.avi`` from Debian's ``opencv-doc`` package to ``destination``."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError(
            f"PETS09-S2L1 video not found and apt-get/dpkg are unavailable. Get vtest.avi from "
            f"Debian's opencv-doc package ({_OPENCV_DOC_VIDEO}) and put it at {destination}.")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        _run(["apt-get", "download", "opencv-doc"], cwd=tmp_dir)
        debs = sorted(tmp_dir.glob("opencv-doc_*.deb"))
        if not debs:
            raise RuntimeError("apt-get download opencv-doc produced no .deb file")
        _run(["dpkg", "-x", str(debs[0]), str(tmp_dir / "root")], cwd=tmp_dir)
        extracted = tmp_dir / "root" / _OPENCV_DOC_VIDEO
        if not extracted.is_file():
            raise RuntimeError(f"{debs[0].name} does not contain {_OPENCV_DOC_VIDEO}")
        digest = hashlib.sha256(extracted.read_bytes()).hexdigest()
        if digest != PETS09_VIDEO_SHA256:
            raise RuntimeError(f"{debs[0].name} ships a vtest.avi with sha256 {digest}, expected "
                               f"{PETS09_VIDEO_SHA256}; the ground truth may not align with it")
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_suffix(".partial")
        shutil.copyfile(extracted, partial)
        partial.replace(destination)


def _run(command: list[str], cwd: Path) -> None:
    """Run ``command``, raising ``RuntimeError`` with its stderr when it fails."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
