"""Adapters: what BlockCopy needs to know about a task network's outputs.

The policy loop (:class:`blockcopy_core.BlockCopy`) is task-agnostic; an adapter turns the model's
raw output structure into

* ``decode(outputs, frame_size)``: the task result of a frame (detections, class probabilities),
  returned to the user and remembered as the previous result;
* ``information_gain(result, prev_result, frame_size)``: the per-pixel information gain map
  (method.md section 3), at the frame's resolution or at an integer stride s of it; BlockCopy
  max-pools it per block;
* ``output_masks(result, frame_size)``: O_t, the per-class probability masks the policy sees at the
  next frame (method.md section 2), ``output_channels`` of them;
* ``policy_frame(frames)``: the frames as RGB in [0, 1], as the policy expects them, from the frames
  the model takes (described by the adapter's :class:`InputFormat`: pixel mean and std, channel order,
  value range). The engine's frame state stays in the model's input space.

:class:`DetectionAdapter` implements the last three for any detector from its detections;
:class:`CenterNetAdapter` adds the CenterNet decoding. :class:`SemanticSegmentationAdapter` covers
per-pixel classifiers.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import InvalidInputError
from .information_gain import (pad_detections, paint_boxes, padded_box_information_gain, pool_to_blocks,
                               semantic_information_gain)
from .models.centernet import NUM_CLASSES, OUTPUT_STRIDE, PERSON_CLASS, decode_detections

Detections = list[dict[str, torch.Tensor]]
"""Per stream ``{"boxes": (K, 4) x1y1x2y2 frame pixels, "scores": (K,), "labels": (K,) int64}``."""

FrameSize = tuple[int, int]
"""``(H, W)`` of the frames in pixels."""

STREET_CLASSES = (PERSON_CLASS, 1, 2, 3, 5, 7)
"""COCO person, bicycle, car, motorcycle, bus and truck: the road users of street scenes."""


@dataclass(frozen=True)
class InputFormat:
    """How the frames a model takes encode a picture: ``x = (pixels - pixel_mean) / pixel_std`` per
    channel, with ``pixels`` in [0, ``max_value``] in ``channel_order``.

    Detectron2's defaults are ``InputFormat(pixel_mean=(103.53, 116.28, 123.675), channel_order="BGR")``
    (``cfg.MODEL.PIXEL_MEAN``, ``PIXEL_STD``, ``INPUT.FORMAT``); MMDetection's detectors usually take
    ``InputFormat((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))`` after their data preprocessor
    converted BGR to RGB; CenterNet here takes plain RGB 0..255, ``InputFormat()``.

    Attributes:
        pixel_mean: per-channel mean subtracted by the framework, in the frames' channel order.
        pixel_std: per-channel divisor, in the frames' channel order.
        channel_order: ``"RGB"`` or ``"BGR"``.
        max_value: the pixel value of full intensity before normalisation (255 for 8-bit frames).
    """

    pixel_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: str = "RGB"
    max_value: float = 255.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "pixel_mean", tuple(float(v) for v in self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(float(v) for v in self.pixel_std))
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            raise ValueError(f"pixel_mean and pixel_std need 3 values (one per colour channel), got "
                             f"{self.pixel_mean} and {self.pixel_std}")
        if min(self.pixel_std) <= 0:
            raise ValueError(f"pixel_std must be positive, got {self.pixel_std}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if self.max_value <= 0:
            raise ValueError(f"max_value must be positive, got {self.max_value}")

    def check(self, frames: torch.Tensor) -> None:
        """Raise :class:`InvalidInputError` unless ``frames`` is (N, 3, H, W) floating point."""
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise InvalidInputError(
                f"frames must be (N, 3, H, W) colour frames ({self.channel_order}), got shape "
                f"{tuple(frames.shape)}: the policy reads 3 colour channels")
        if not frames.is_floating_point():
            raise InvalidInputError(f"frames must be floating point as the model takes them, got {frames.dtype}")

    def to_rgb(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) frames in this format -> (N, 3, H, W) RGB in [0, 1]."""
        self.check(frames)
        pixels = frames
        if self.pixel_std != (1.0, 1.0, 1.0):
            pixels = pixels * _channel_vector(self.pixel_std, frames)
        if self.pixel_mean != (0.0, 0.0, 0.0):
            pixels = pixels + _channel_vector(self.pixel_mean, frames)
        if self.channel_order == "BGR":
            pixels = pixels.flip(1)
        return pixels / self.max_value


def _channel_vector(values: tuple[float, float, float], like: torch.Tensor) -> torch.Tensor:
    """(1, 3, 1, 1) tensor of ``values`` on ``like``'s device, made by fills (no host copy: capturable)."""
    return torch.stack([like.new_full((), value) for value in values]).view(1, 3, 1, 1)


class _DeviceConstants:
    """Per-device copies of a fixed list of integers, made once outside CUDA-graph capture (a host-to-device
    copy cannot be captured)."""

    def __init__(self, values: Sequence[int]) -> None:
        self.values = tuple(int(v) for v in values)
        self._copies: dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self._copies:
            self._copies[device] = torch.as_tensor(self.values, device=device)
        return self._copies[device]


_fixed_shapes = False  # set by fixed_shapes()


@contextmanager
def fixed_shapes() -> Iterator[None]:
    """Run the adapters' decoding, O_t and IG as in a CUDA graph capture (irrelevant detections masked,
    not dropped: no host read, fixed shapes) also outside one, e.g. while a loop stage is traced for
    compilation before its capture."""
    global _fixed_shapes
    previous, _fixed_shapes = _fixed_shapes, True
    try:
        yield
    finally:
        _fixed_shapes = previous


def capturing(device: torch.device) -> bool:
    """Whether work on ``device`` must keep fixed shapes and read nothing on the host: inside
    :func:`fixed_shapes` or a CUDA graph capture."""
    return _fixed_shapes or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


class OutputAdapter(ABC):
    """Interface between a task network's outputs and the BlockCopy policy loop.

    Attributes:
        output_channels: C_out, the number of masks of ``output_masks``.
        input_format: how the model's input frames encode RGB (:class:`InputFormat`).
    """

    output_channels: int
    input_format: InputFormat = InputFormat()
    capturable: bool = False
    """Whether ``decode``, ``block_information_gain``, ``output_masks`` and ``policy_frame`` run without
    host synchronisation and give fixed shapes for fixed-shape model outputs, so that BlockCopy can
    capture them in CUDA graphs (``capture_loop``)."""

    @property
    def fixes_results(self) -> bool:
        """Whether :meth:`fixed_result` gives every result of a clip the same shapes, so that BlockCopy can
        capture ``output_masks`` and ``block_information_gain`` of results a framework decoded itself
        (``capture_loop`` with :meth:`BlockCopy.select`/:meth:`BlockCopy.observe`)."""
        return self.capturable

    def fixed_result(self, result: Any, frame_size: FrameSize) -> Any:
        """``result`` in the fixed shapes of :attr:`fixes_results`, with the same O_t and IG (the result
        itself where decoding already has fixed shapes)."""
        return result

    def policy_frame(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) model input -> (N, 3, H, W) RGB in [0, 1] for the policy."""
        return self.input_format.to_rgb(frames)

    @abstractmethod
    def decode(self, outputs: Any, frame_size: FrameSize) -> Any:
        """The task result of one frame of N streams from the model's dense outputs."""

    @abstractmethod
    def information_gain(self, result: Any, prev_result: Any, frame_size: FrameSize) -> torch.Tensor:
        """(N, H / s, W / s) IG map from this and the previous result.

        s is the map's stride in frame pixels, one integer for both axes that divides the block size
        (BlockCopy max-pools the map per block).
        """

    @abstractmethod
    def output_masks(self, result: Any, frame_size: FrameSize) -> torch.Tensor:
        """O_t: (N, output_channels, H', W') per-class probability masks of ``result``."""

    def block_information_gain(self, result: Any, prev_result: Any, frame_size: FrameSize,
                               block_size: int) -> torch.Tensor:
        """(N, 1, H // block_size, W // block_size): the IG map's maximum over each block."""
        ig_map = self.information_gain(result, prev_result, frame_size)
        return pool_to_blocks(ig_map, ig_pool_size(ig_map, frame_size, block_size))


def ig_pool_size(ig_map: torch.Tensor, frame_size: FrameSize, block_size: int) -> int:
    """Block side in cells of an (N, h, w) IG map of ``frame_size`` frames; checks that the map tiles the
    frame at an integer stride dividing the block size."""
    height, width = frame_size
    rows, cols = ig_map.shape[-2:]
    stride = height // rows if rows else 0
    if not stride or rows * stride != height or cols * stride != width or block_size % stride:
        raise ValueError(f"the adapter's {rows}x{cols} IG map does not cover {height}x{width} frames "
                         f"at an integer stride dividing the block size {block_size}")
    return block_size // stride


def paint_class_masks(detections: Detections, classes: Sequence[int], height: int, width: int,
                      stride: int) -> torch.Tensor:
    """(N, len(classes), height / stride, width / stride) masks: score painted into box, per class.

    Detections whose label is not in ``classes`` are left out. Box coverage follows the rule of
    :mod:`blockcopy_core.information_gain` on a map of ``stride`` pixels per cell:
    ``floor(x1 / stride) <= x < ceil(x2 / stride)`` and likewise in y. Overlapping boxes of a class
    keep the maximum score.
    """
    if height % stride or width % stride:
        raise ValueError(f"frame size {height}x{width} is not a multiple of the mask stride {stride}")
    device = detections[0]["boxes"].device
    padded = pad_detections(detections, True, device, "detections")
    padded["boxes"] = padded["boxes"].float() / stride
    return _paint_padded_class_masks(padded, torch.as_tensor(list(classes), device=device), height // stride,
                                     width // stride)


def _paint_padded_class_masks(padded: dict[str, torch.Tensor], class_ids: torch.Tensor, rows: int,
                              cols: int) -> torch.Tensor:
    """:func:`paint_class_masks` of padded detections (boxes (N, K, 4) in mask cells, scores, labels, valid
    (N, K)) for the (C,) classes ``class_ids``: (N, C, rows, cols), without host synchronisation."""
    boxes, scores = padded["boxes"], padded["scores"].float()
    streams, count = scores.shape
    classes = class_ids.shape[0]
    member = (padded["labels"][:, None, :] == class_ids[None, :, None]) & padded["valid"][:, None, :]
    values = torch.where(member, scores[:, None, :], 0.0).reshape(streams * classes, count)
    boxes = boxes[:, None].expand(streams, classes, count, 4).reshape(streams * classes, count, 4)
    return paint_boxes(boxes, values, rows, cols).view(streams, classes, rows, cols)


class DetectionAdapter(OutputAdapter):
    """Adapter base for object detectors: IG by Algorithm 1, O_t as score-painted boxes per class.

    Subclasses implement :meth:`detect` (all detections of a frame, for the user). The policy side
    uses only the confident detections of the listed classes: IG of low-score candidates (a detector's
    top-100 list is mostly noise near 0) would only add flicker to the reward, and each listed class
    costs one input channel of the policy network.

    IG is painted at ``stride`` pixels per cell. Box coverage at stride s is exact for the per-block
    maximum when s divides the block size: a box reaches into a block's pixels exactly when it reaches
    into the block's cells (``floor(x1 / s) < (b + 1) * B / s`` iff ``x1 < (b + 1) * B``), so the pooled
    block IG equals that of the full-resolution map while painting s^2 fewer pixels.

    Args:
        classes: the labels the policy sees and IG counts, in mask-channel order.
        score_threshold: detections below this score are ignored by IG and O_t.
        stride: pixels per cell of the IG map and of the masks O_t.
        class_aware: match current to previous detections only within a class (the paper matches
            regardless of class, which is the same for a single class).
        input_format: how the model's input frames encode RGB.
        max_detections: the most detections a stream's result holds (a detector's ``max_per_img``), or
            None for no bound. With a bound, :meth:`fixed_result` pads every result to it, so that a
            framework's own decoding can feed BlockCopy's captured loop; a result with more detections
            keeps its ``max_detections`` highest-scoring ones for IG and O_t.
    """

    def __init__(self, classes: Sequence[int], score_threshold: float = 0.3, stride: int = 4,
                 class_aware: bool = True, input_format: InputFormat = InputFormat(),
                 max_detections: int | None = None) -> None:
        if not classes:
            raise ValueError("classes must list at least one class label")
        if len(set(classes)) != len(classes) or min(classes) < 0:
            raise ValueError(f"classes must be distinct non-negative labels, got {tuple(classes)}")
        if stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride}")
        if max_detections is not None and max_detections < 1:
            raise ValueError(f"max_detections must be a positive integer or None, got {max_detections}")
        self.classes = tuple(int(c) for c in classes)
        self.score_threshold = float(score_threshold)
        self.stride = stride
        self.class_aware = class_aware
        self.input_format = input_format
        self.output_channels = len(self.classes)
        self.max_detections = max_detections
        self._class_ids = _DeviceConstants(self.classes)

    @property
    def fixes_results(self) -> bool:
        return self.capturable or self.max_detections is not None

    def fixed_result(self, result: Detections, frame_size: FrameSize) -> Detections:
        """Each stream's detections padded to ``max_detections`` rows (score 0, label -1: never relevant;
        other per-detection entries, such as instance masks, zero), the highest-scoring ones where a
        stream has more; boxes and scores in fp32. No host read: the counts are shapes."""
        if self.max_detections is None:
            return result
        count = self.max_detections
        fixed = []
        for dets in result:
            scores = dets["scores"]
            top = scores.topk(count).indices if scores.shape[0] > count else None
            padded = {}
            for key, value in dets.items():
                value = value if top is None else value[top]
                value = value.float() if key in ("boxes", "scores") else value.long() if key == "labels" else value
                rows = (0, 0) * (value.dim() - 1) + (0, count - value.shape[0])
                padded[key] = F.pad(value, rows, value=-1 if key == "labels" else 0)
            fixed.append(padded)
        return fixed

    @abstractmethod
    def detect(self, outputs: Any, frame_size: FrameSize) -> Detections:
        """All detections of N streams, boxes x1y1x2y2 in frame pixels, with ``labels``."""

    def decode(self, outputs: Any, frame_size: FrameSize) -> Detections:
        """The detections of each stream (see :meth:`detect`)."""
        return self.detect(outputs, frame_size)

    def relevant(self, detections: Detections) -> Detections:
        """The detections IG and O_t use: listed classes, score >= ``score_threshold`` (as lists; IG and O_t
        mask the others out instead, to keep shapes fixed)."""
        kept = []
        for dets in detections:
            keep = self._relevance(dets["scores"], dets["labels"])
            kept.append({key: value[keep] for key, value in dets.items()})
        return kept

    def _relevance(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Bool mask of the detections IG and O_t use, any shape."""
        # compared with each class id, not torch.isin: isin sorts with a host read for larger inputs, which a
        # CUDA graph cannot capture
        listed = (labels[..., None] == self._class_ids.on(labels.device)).any(-1)
        return (scores >= self.score_threshold) & listed

    def _policy_detections(self, detections: Detections) -> dict[str, torch.Tensor | None]:
        """The streams' detections padded to one count, boxes in IG-map cells, ``valid`` marking the
        relevant ones. Run eagerly, the others are dropped first (a host read, and far fewer boxes to
        paint: a decoder's top 100 are mostly below the threshold); in a CUDA graph capture they stay,
        masked (no host read, fixed shapes when the streams have equal counts)."""
        device = detections[0]["boxes"].device
        if capturing(device):
            padded = pad_detections(detections, True, device, "detections")
            padded["valid"] = padded["valid"] & self._relevance(padded["scores"], padded["labels"])
        else:
            padded = pad_detections(self.relevant(detections), True, device, "detections")
        padded["boxes"] = padded["boxes"].float() / self.stride
        return padded

    def _map_size(self, frame_size: FrameSize) -> tuple[int, int]:
        height, width = frame_size
        if height % self.stride or width % self.stride:
            raise ValueError(f"frame size {height}x{width} is not a multiple of the IG stride {self.stride}")
        return height // self.stride, width // self.stride

    def information_gain(self, result: Detections, prev_result: Detections,
                         frame_size: FrameSize) -> torch.Tensor:
        """(N, H / stride, W / stride) IG map of Algorithm 1 on the relevant detections."""
        return self._box_information_gain(result, prev_result, frame_size, None)

    def block_information_gain(self, result: Detections, prev_result: Detections, frame_size: FrameSize,
                               block_size: int) -> torch.Tensor:
        """(N, 1, H // block_size, W // block_size): the IG map's block maxima, computed from the boxes
        without painting the map (equal to pooling :meth:`information_gain`)."""
        if block_size % self.stride:
            raise ValueError(f"the IG stride {self.stride} does not divide the block size {block_size}")
        return self._box_information_gain(result, prev_result, frame_size, block_size // self.stride)

    def _box_information_gain(self, result: Detections, prev_result: Detections, frame_size: FrameSize,
                              block_cells: int | None) -> torch.Tensor:
        current, previous = self._policy_detections(result), self._policy_detections(prev_result)
        labels = (current["labels"], previous["labels"]) if self.class_aware else (None, None)
        return padded_box_information_gain(
            current["boxes"], current["scores"], previous["boxes"], previous["scores"], *self._map_size(frame_size),
            valid=current["valid"], prev_valid=previous["valid"], labels=labels[0], prev_labels=labels[1],
            block_size=block_cells)

    def output_masks(self, result: Detections, frame_size: FrameSize) -> torch.Tensor:
        """(N, len(classes), H / stride, W / stride): relevant detections' scores painted per class."""
        padded = self._policy_detections(result)
        return _paint_padded_class_masks(padded, self._class_ids.on(padded["scores"].device),
                                         *self._map_size(frame_size))


class CenterNetAdapter(DetectionAdapter):
    """Adapter for :class:`blockcopy_core.models.centernet.CenterNetMobileNetV3`.

    ``decode`` runs :func:`decode_detections` (the graph's top-``max_detections`` peaks, no score
    threshold), so evaluation sees the detector's usual output; with ``decode_classes`` only those
    heatmap channels are decoded (faster, and the top peaks are all of the wanted classes). IG and
    O_t use the detections of ``classes`` scoring at least ``score_threshold``, painted at the
    heatmap's stride 4.

    O_t is painted boxes rather than the heatmap itself: CenterNet's heatmap is a peak at each object's
    centre, whereas the paper's O_{t-1} is the per-class probability of the object covering each pixel
    (detections painted per class), which tells the policy where an object's blocks are.

    The default classes are the street-scene road users (:data:`STREET_CLASSES`, 6 policy input
    channels); all 80 would make the policy's input 87 channels wide (its stem ~11x as costly as with
    one class) and spend it mostly on classes that never appear. Pass ``classes=(PERSON_CLASS,)`` for
    pedestrian detection.

    Args:
        classes: COCO class indices (0..79) the policy sees and IG counts.
        score_threshold: minimum score of a detection used by IG and O_t.
        max_detections: peaks decoded per image.
        decode_classes: COCO classes to decode (None: all 80); must include ``classes``.
        class_aware: see :class:`DetectionAdapter`.
    """

    capturable = True  # top-k decoding: max_detections per stream, no host synchronisation

    def __init__(self, classes: Sequence[int] = STREET_CLASSES, score_threshold: float = 0.3,
                 max_detections: int = 100, decode_classes: Sequence[int] | None = None,
                 class_aware: bool = True) -> None:
        if max(classes) >= NUM_CLASSES or (decode_classes is not None and max(decode_classes) >= NUM_CLASSES):
            raise ValueError(f"CenterNet has classes 0..{NUM_CLASSES - 1}")
        if decode_classes is not None and not set(classes) <= set(decode_classes):
            raise ValueError(f"decode_classes {tuple(decode_classes)} must include classes {tuple(classes)}")
        super().__init__(classes, score_threshold, OUTPUT_STRIDE, class_aware, InputFormat(), max_detections)
        self.decode_classes = None if decode_classes is None else tuple(int(c) for c in decode_classes)
        self._decode_channels = _DeviceConstants(self.decode_classes or ())

    def detect(self, outputs: dict[str, torch.Tensor], frame_size: FrameSize) -> Detections:
        if self.decode_classes is None:
            return decode_detections(outputs, max_detections=self.max_detections, input_size=frame_size)
        heatmap = outputs["heatmap"]
        channels = self._decode_channels.on(heatmap.device)
        # a stack of channel slices: index_select on a channels_last heatmap took 7 ms on a CPU core
        subset = {"heatmap": torch.stack([heatmap[:, c] for c in self.decode_classes], dim=1), "wh": outputs["wh"]}
        detections = decode_detections(subset, max_detections=self.max_detections, input_size=frame_size)
        return [{**dets, "labels": channels[dets["labels"]]} for dets in detections]


class SemanticSegmentationAdapter(OutputAdapter):
    """Adapter for per-pixel classifiers: IG is the pixelwise KL divergence, O_t the class probabilities.

    Args:
        num_classes: C, the classes of the probability maps (the policy's C_out).
        select: maps the model's outputs to (N, C, h, w) logits or probabilities (default: the outputs
            themselves); h, w divide the frame size with one common integer stride.
        from_logits: apply a softmax over classes to what ``select`` returns.
        input_format: how the model's input frames encode RGB.
    """

    capturable = True

    def __init__(self, num_classes: int, select: Callable[[Any], torch.Tensor] | None = None,
                 from_logits: bool = True, input_format: InputFormat = InputFormat()) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.output_channels = num_classes
        self.select = select
        self.from_logits = from_logits
        self.input_format = input_format

    def decode(self, outputs: Any, frame_size: FrameSize) -> torch.Tensor:
        """(N, C, h, w) class probabilities."""
        maps = outputs if self.select is None else self.select(outputs)
        if maps.dim() != 4 or maps.shape[1] != self.output_channels:
            raise ValueError(f"expected (N, {self.output_channels}, h, w) class maps, got {tuple(maps.shape)}")
        return F.softmax(maps.float(), dim=1) if self.from_logits else maps

    def information_gain(self, result: torch.Tensor, prev_result: torch.Tensor,
                         frame_size: FrameSize) -> torch.Tensor:
        """(N, h, w) KL(current || previous) per pixel."""
        return semantic_information_gain(result, prev_result)

    def output_masks(self, result: torch.Tensor, frame_size: FrameSize) -> torch.Tensor:
        """(N, C, h, w): the class probabilities themselves."""
        return result
