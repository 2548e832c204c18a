"""Run a Detectron2 model of this repo (BlockCopy or dense) over a video and write an annotated video.

    python tools/demo.py --config-file configs/PETS09/centernet_mnv3_blockcopy_tau0.3.yaml \
        --input ../shared/data/pets09_s2l1/<video> --output outputs/demo_pets09.mp4 [--frames 200]
    python tools/demo.py --config-file configs/Cityscapes/mask_rcnn_R_50_FPN_blockcopy_tau0.3.yaml \
        --input frames/ --output demo.mp4 MODEL.WEIGHTS /path/to/model.pkl MODEL.DEVICE cpu

The input is a video file or a folder of images (sorted by name, all of one size), run in order as one
clip. Each frame becomes the model input the datasets' test mappers give (resized by
``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``, a (3, H, W) uint8 tensor in ``INPUT.FORMAT``, ``height``/``width``
the original size, plus the video fields). The output frame shows the detections above
``--confidence-threshold`` (instance masks blended) or the semantic segmentation, drawn by Detectron2's
``Visualizer`` with the metadata of ``DATASETS.TEST[0]``, and for BlockCopy models the blocks executed
on that frame (tinted green and outlined, ``blockcopy_core.visualize.draw_grid``) with the executed
fraction. The block policy starts from the seed (``SEED``) or ``MODEL.BLOCKCOPY.POLICY_WEIGHTS`` (e.g. the
``policy.pt`` of a ``tools/train_net.py`` run) and keeps learning online; no warm-up is run here.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

TOOLS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TOOLS_DIR.parent
for _path in (REPO_ROOT, TOOLS_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data.catalog import Metadata  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402

from blockcopy_core.data import VideoReader, VideoWriter  # noqa: E402
from blockcopy_core.visualize import draw_grid, put_label  # noqa: E402
from blockcopy_d2.data import VideoFrameMapper, configure_video_datasets  # noqa: E402
from blockcopy_d2.engine import load_weights, seed_for_policy  # noqa: E402
from train_net import build_config  # noqa: E402  (tools/train_net.py: the same config setup)

logger = logging.getLogger("blockcopy_d2.demo")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="BlockCopy / Detectron2 demo: a video in, an annotated video out")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to the config file")
    parser.add_argument("--input", required=True, help="a video file or a folder of images (sorted by name)")
    parser.add_argument("--output", required=True, help="the annotated video to write (e.g. out.mp4)")
    parser.add_argument("--frames", type=int, default=0, help="run the first N frames only (0: all)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="draw the detections scoring at least this")
    parser.add_argument("--fps", type=float, default=10.0,
                        help="frame rate of the output for an image folder (a video keeps its own)")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER,
                        help="config options KEY VALUE ... merged after the file (as in tools/train_net.py)")
    return parser


class InputFrames:
    """The RGB (H, W, 3) uint8 frames of a video file or an image folder, in order.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a folder without images or with images of different sizes; ``frames`` < 0.
        OSError: a video OpenCV cannot open or decode.
    """

    def __init__(self, path: str | Path, frames: int = 0, folder_fps: float = 10.0) -> None:
        self.path = Path(path)
        if frames < 0:
            raise ValueError(f"--frames must be >= 0 (0: all), got {frames}")
        if folder_fps <= 0:
            raise ValueError(f"--fps must be positive, got {folder_fps}")
        self.name = self.path.name or str(self.path)
        self._video: VideoReader | None = None
        self._files: list[Path] = []
        if self.path.is_dir():
            files = sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder {self.path}")
            self._files = files[:frames] if frames else files
            sizes = {}
            for file in self._files:
                try:
                    with Image.open(file) as image:
                        sizes.setdefault(image.size, file)
                except OSError as error:
                    raise OSError(f"cannot read the image {file}: {error}") from error
            if len(sizes) > 1:
                found = ", ".join(f"{w}x{h} ({file.name})" for (w, h), file in sizes.items())
                raise ValueError(f"the images in {self.path} must all have one size, found {found}")
            self.size = next(iter(sizes))
            self.fps = folder_fps
        elif self.path.is_file():
            probe = VideoReader(self.path)  # FileNotFoundError / OSError with the reason
            stop = min(frames, len(probe)) if frames else None
            self._video = VideoReader(self.path, stop=stop)
            self.size = self._video.source_size
            self.fps = self._video.fps if self._video.fps > 0 else folder_fps
        else:
            raise FileNotFoundError(f"--input: no such video file or folder: {self.path}")

    def __len__(self) -> int:
        return len(self._video) if self._video is not None else len(self._files)

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._video is not None:
            yield from self._video
            return
        for file in self._files:
            bgr = cv2.imread(str(file), cv2.IMREAD_COLOR)
            if bgr is None:
                raise OSError(f"OpenCV cannot read the image {file}")
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class FrameMapper:
    """An RGB frame -> the model's input dict, as the datasets' test mappers make it: the image from
    :meth:`blockcopy_d2.data.VideoFrameMapper.to_image` (``INPUT.FORMAT``, the test resize), ``height`` /
    ``width`` the original size, and the video fields of one clip."""

    def __init__(self, cfg, clip_id: str) -> None:
        self.frames = VideoFrameMapper(cfg)
        self.clip_id = clip_id

    def __call__(self, rgb: np.ndarray, frame_index: int) -> dict[str, Any]:
        return {"image": self.frames.to_image(rgb), "height": rgb.shape[0], "width": rgb.shape[1],
                "clip_id": self.clip_id, "frame_index": frame_index, "annotated": True}


def executed_grid(model: torch.nn.Module) -> np.ndarray | None:
    """The (Gh, Gw) bool blocks the model's block-sparse network executed on the last frame (stream 0),
    or None for a dense model."""
    blockcopy = getattr(model, "blockcopy", None)
    grid = None if blockcopy is None else blockcopy.sparse.executed_grid
    return None if grid is None else grid[0].reshape(grid.shape[-2:]).cpu().numpy().astype(bool)


def draw_blocks(rgb: np.ndarray, grid: np.ndarray, input_size: tuple[int, int], block_size: int) -> np.ndarray:
    """``rgb`` with the executed blocks of ``grid`` tinted and outlined (``draw_grid``).

    The grid covers the network input (``input_size`` = (h, w) after resizing, padded at the bottom and
    right to whole blocks); it is drawn at that resolution and mapped back onto the original frame.
    """
    height, width = input_size
    rows, cols = grid.shape
    canvas = np.zeros((rows * block_size, cols * block_size, 3), dtype=np.uint8)
    resized = rgb if rgb.shape[:2] == (height, width) else cv2.resize(rgb, (width, height),
                                                                       interpolation=cv2.INTER_AREA)
    canvas[:height, :width] = resized
    drawn = draw_grid(canvas, grid)[:height, :width]
    if drawn.shape[:2] != rgb.shape[:2]:
        drawn = cv2.resize(drawn, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    return drawn


def demo_metadata(cfg) -> Metadata:
    """The metadata of ``DATASETS.TEST[0]`` (class names and colours), else an empty one."""
    return MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else Metadata(name="blockcopy_demo")


def draw_output(rgb: np.ndarray, output: dict[str, Any], metadata: Metadata,
                threshold: float) -> tuple[np.ndarray, int]:
    """The frame with the model's output drawn by Detectron2's ``Visualizer``; and how many detections."""
    visualizer = Visualizer(rgb, metadata, instance_mode=ColorMode.IMAGE)
    if "sem_seg" in output:
        labels = output["sem_seg"].argmax(dim=0).cpu()
        if not metadata.get("stuff_classes"):
            names = [str(i) for i in range(output["sem_seg"].shape[0])]
            visualizer.metadata = Metadata(name="blockcopy_demo", stuff_classes=names)
        return visualizer.draw_sem_seg(labels, alpha=0.5).get_image(), 0
    instances = output["instances"].to("cpu")
    instances = instances[instances.scores >= threshold]
    names = metadata.get("thing_classes")
    if names and len(instances) and int(instances.pred_classes.max()) >= len(names):
        visualizer.metadata = Metadata(name="blockcopy_demo")  # names do not fit the model's classes
    return visualizer.draw_instance_predictions(instances).get_image(), len(instances)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns what it wrote (path, frames, size, fps), the executed grid and fraction and the
    number of drawn detections per frame, and the model's statistics (``as_dict()``, or None)."""
    args = get_parser().parse_args(argv)
    try:
        frames = InputFrames(args.input, args.frames, args.fps)
    except (OSError, ValueError) as error:
        raise SystemExit(f"tools/demo.py: {error}") from error
    setup_logger(name="blockcopy_d2")
    cfg = build_config(args.config_file, args.opts)
    configure_video_datasets(cfg)  # e.g. PETS09's metadata
    seed_for_policy(cfg)  # the policy draws its initial weights in build_model
    model = build_model(cfg)
    load_weights(cfg, model)
    model.eval()
    blockcopy = getattr(model, "blockcopy", None)
    mapper = FrameMapper(cfg, frames.name)
    metadata = demo_metadata(cfg)
    summary: dict[str, Any] = {"output": str(args.output), "frames": 0, "size": frames.size, "fps": frames.fps,
                               "grids": [], "executed": [], "detections": []}
    started = time.perf_counter()
    with VideoWriter(args.output, frames.fps) as writer, torch.no_grad():
        for index, rgb in enumerate(tqdm(frames, total=len(frames), desc="demo", unit="frame", dynamic_ncols=True)):
            inputs = mapper(rgb, index)
            output = model([inputs])[0]
            canvas, label, grid = rgb, "dense", None
            if blockcopy is not None:
                grid = executed_grid(model)
                canvas = draw_blocks(rgb, grid, tuple(inputs["image"].shape[-2:]), blockcopy.block_size)
                label = f"frame {index}: executed {grid.mean():.0%} of {grid.size} blocks"
            drawn, detections = draw_output(canvas, output, metadata, args.confidence_threshold)
            writer.write(put_label(drawn, label))
            summary["grids"].append(grid)
            summary["executed"].append(None if grid is None else float(grid.mean()))
            summary["detections"].append(detections)
            summary["frames"] += 1
    seconds = time.perf_counter() - started
    statistics = getattr(model, "statistics", None)
    summary["statistics"] = None if statistics is None else statistics.as_dict()
    print(f"Wrote {summary['frames']} frames to {args.output} ({1e3 * seconds / max(summary['frames'], 1):.1f} ms "
          "per frame with reading, drawing and writing)")
    if summary["statistics"] is not None:
        stats = summary["statistics"]
        print(f"Executed fraction {stats['executed_fraction']:.3f} "
              f"(policy frames {stats['policy_executed_fraction']:.3f}), "
              f"{stats['ms_per_frame']['total']:.1f} ms per frame in the model "
              f"({', '.join(f'{k} {v:.1f}' for k, v in stats['ms_per_frame'].items() if k != 'total')})")
    return summary


if __name__ == "__main__":
    main()
