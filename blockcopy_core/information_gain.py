"""Information gain (IG): the policy's reward signal, computed from the task network's own outputs.

Implements section 3 of ``docs/method.md`` (BlockCopy, Verelst & Tuytelaars, ICCV 2021). IG is a
per-pixel map that is high where the output of frame t differs from the output of frame t-1; the
policy's per-block reward uses its per-block maximum (:func:`pool_to_blocks`).

Conventions
-----------
Box pixel coverage
    A box ``(x1, y1, x2, y2)`` in pixel coordinates (pixel ``(y, x)`` is the unit square
    ``[x, x + 1) x [y, y + 1)``) covers the pixels with indices
    ``floor(x1) <= x < ceil(x2)`` and ``floor(y1) <= y < ceil(y2)``: every pixel that the box reaches
    into, even partially. A box with integer coordinates covers exactly ``(y2 - y1) * (x2 - x1)``
    pixels; a box of zero width or height at integer coordinates covers none. Parts outside the image
    are clipped.
Matching
    Each current detection is matched to the previous detection with the highest IoU; an IoU of 0 is
    no match (painting ``(1 - 0) * score`` would equal the unmatched case anyway). Ties go to the
    previous detection that comes first. With ``labels`` given, only detections of the same class can
    match (the paper ignores classes, which is the default). Several current detections may match
    the same previous one: max-composition keeps the largest value painted into its box.
Semantic segmentation
    ``KL(current || previous)``: see :func:`semantic_information_gain`.

All functions run on the device of their inputs without Python loops over pixels, boxes or streams
(only very many detections are painted in a few chunks, to bound memory).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_iou

# Largest number of elements of the per-detection value maps painted at once (64 MiB in fp32): k
# masks of H x W pixels, or k boxes per stream on the cell grids of N streams.
_PAINT_CHUNK_ELEMENTS = 1 << 24


def box_information_gain(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    prev_boxes: torch.Tensor,
    prev_scores: torch.Tensor,
    height: int,
    width: int,
    labels: torch.Tensor | None = None,
    prev_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """IG map of one stream of object detections (Algorithm 1 of the paper).

    Args:
        boxes: (K, 4) current boxes ``x1, y1, x2, y2`` in pixels; K may be 0.
        scores: (K,) current detection scores.
        prev_boxes: (P, 4) boxes of the previous frame; P may be 0.
        prev_scores: (P,) their scores.
        height, width: size of the output map in pixels.
        labels, prev_labels: optional (K,) and (P,) integer classes; when given (both or neither),
            only detections of the same class are matched.

    Returns:
        (height, width) IG map on ``boxes.device``, values >= 0.
    """
    _check_detections(boxes, scores, labels, "boxes")
    _check_detections(prev_boxes, prev_scores, prev_labels, "prev_boxes")
    _check_same_device(boxes, prev_boxes)
    _check_labels_pairing(labels, prev_labels)
    _check_size(height, width)
    ig = padded_box_information_gain(
        boxes[None], scores[None], prev_boxes[None], prev_scores[None], height, width,
        labels=None if labels is None else labels[None], prev_labels=None if prev_labels is None else prev_labels[None])
    return ig[0]


def batch_box_information_gain(
    detections: Sequence[Mapping[str, torch.Tensor]],
    prev_detections: Sequence[Mapping[str, torch.Tensor]],
    height: int,
    width: int,
) -> torch.Tensor:
    """IG maps of N streams of object detections at once.

    Equal to stacking one :func:`box_information_gain` call per stream, but computed in one pass: the
    detections of all streams are concatenated and only pairs of the same stream can match.

    Args:
        detections: length-N sequence of dicts with ``boxes`` (K_i, 4), ``scores`` (K_i,) and
            optionally ``labels`` (K_i,) for the current frame of each stream.
        prev_detections: length-N sequence of the same dicts for the previous frame.
        height, width: size of the output maps in pixels.

    Labels are used when every dict of both sequences has ``labels``; a mix raises ValueError.

    Returns:
        (N, height, width) IG maps on the device of the first stream's boxes.
    """
    if len(detections) != len(prev_detections):
        raise ValueError(f"detections has {len(detections)} streams but prev_detections has "
                         f"{len(prev_detections)}")
    if len(detections) == 0:
        raise ValueError("batch_box_information_gain needs at least one stream")
    _check_size(height, width)
    has_labels = ["labels" in d for d in (*detections, *prev_detections)]
    if any(has_labels) and not all(has_labels):
        raise ValueError("either every detection dict (current and previous) has 'labels' or none")
    device = detections[0]["boxes"].device
    current = pad_detections(detections, all(has_labels), device, "detections")
    previous = pad_detections(prev_detections, all(has_labels), device, "prev_detections")
    return padded_box_information_gain(
        current["boxes"], current["scores"], previous["boxes"], previous["scores"], height, width,
        valid=current["valid"], prev_valid=previous["valid"], labels=current["labels"],
        prev_labels=previous["labels"])


def mask_information_gain(
    masks: torch.Tensor,
    scores: torch.Tensor,
    prev_masks: torch.Tensor,
    prev_scores: torch.Tensor,
    labels: torch.Tensor | None = None,
    prev_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """IG map of one stream of instance segmentations: Algorithm 1 with masks instead of boxes.

    Args:
        masks: (K, H, W) current instance masks, bool, or float probabilities binarised at
            ``>= 0.5``; K may be 0.
        scores: (K,) current detection scores.
        prev_masks: (P, H, W) masks of the previous frame; P may be 0.
        prev_scores: (P,) their scores.
        labels, prev_labels: optional (K,) and (P,) integer classes, as in
            :func:`box_information_gain`.

    Returns:
        (H, W) IG map on ``masks.device``, values >= 0.
    """
    _check_masks(masks, scores, labels, "masks")
    _check_masks(prev_masks, prev_scores, prev_labels, "prev_masks")
    _check_same_device(masks, prev_masks)
    _check_labels_pairing(labels, prev_labels)
    if masks.shape[1:] != prev_masks.shape[1:]:
        raise ValueError(f"masks are {tuple(masks.shape[1:])} but prev_masks are "
                         f"{tuple(prev_masks.shape[1:])}")
    labels, prev_labels = (None, None) if labels is None else (labels[None], prev_labels[None])
    return padded_mask_information_gain(masks[None], scores[None], prev_masks[None], prev_scores[None],
                                        labels=labels, prev_labels=prev_labels)[0]


def semantic_information_gain(probs: torch.Tensor, prev_probs: torch.Tensor,
                              eps: float = 1e-8) -> torch.Tensor:
    """IG maps for semantic segmentation: pixelwise KL(current || previous).

    ``sum_c p_c * log(p_c / q_c)`` with p the current and q the previous class distribution. This is
    the information gain in its Bayesian sense, the KL divergence of the posterior (the prediction
    after seeing frame t) from the prior (what was known from frame t-1): the extra information that
    executing the block brought. Terms with ``p_c = 0`` count 0; ``q`` is clamped to ``eps`` so a
    class that the previous frame ruled out gives a large, finite value; the result is clamped at 0
    (clamping and rounding can make it a hair negative). Computed in at least fp32.

    Args:
        probs: (N, C, H, W) current per-pixel class probabilities (softmax output).
        prev_probs: (N, C, H, W) previous ones.
        eps: lower bound for the previous probabilities, > 0.

    Returns:
        (N, H, W) IG maps, values >= 0.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be (N, C, H, W), got shape {tuple(probs.shape)}")
    if probs.shape != prev_probs.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and prev_probs {tuple(prev_probs.shape)} "
                         "differ in shape")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    _check_same_device(probs, prev_probs)
    dtype = _float_dtype(probs, prev_probs)
    p, q = probs.to(dtype), prev_probs.to(dtype)
    kl = torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(eps))
    return kl.sum(dim=1).clamp_min(0)


def pool_to_blocks(ig: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per-block IG: the maximum of the IG map over each block's pixels.

    ``block_size`` is counted in pixels of ``ig``. For a map at a lower resolution than the frame,
    divide the frame's block size by the map's stride: a map at stride 4 of frames cut into blocks of
    128 pixels is pooled with ``pool_to_blocks(ig, 128 // 4)``.

    Args:
        ig: (H, W), (N, H, W) or (N, 1, H, W) IG map(s).
        block_size: block side in pixels of ``ig``; must divide H and W.

    Returns:
        (N, 1, H // block_size, W // block_size), N = 1 for a (H, W) input.
    """
    if ig.dim() == 2:
        ig = ig[None, None]
    elif ig.dim() == 3:
        ig = ig[:, None]
    elif ig.dim() != 4 or ig.shape[1] != 1:
        raise ValueError("ig must be (H, W), (N, H, W) or (N, 1, H, W), "
                         f"got shape {tuple(ig.shape)}")
    if int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    block_size = int(block_size)
    height, width = ig.shape[-2:]
    if height % block_size or width % block_size:
        raise ValueError(f"block_size {block_size} does not divide the IG map of {height}x{width}; "
                         "for a map at stride s of the frame, pass the frame's block size // s")
    # A reshape and one reduction: much faster on GPUs than max_pool2d with block-sized kernels.
    blocks = ig.reshape(ig.shape[0], 1, height // block_size, block_size, width // block_size,
                        block_size)
    return blocks.amax(dim=(3, 5))


def padded_box_information_gain(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    prev_boxes: torch.Tensor,
    prev_scores: torch.Tensor,
    height: int,
    width: int,
    *,
    valid: torch.Tensor | None = None,
    prev_valid: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    prev_labels: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Algorithm 1 for N streams whose detections are padded to fixed counts, with static shapes.

    Runs without host synchronisation, so it can be captured in a CUDA graph: slots outside ``valid``
    take no part (they match nothing and paint nothing), which gives the same maps as dropping them.

    Args:
        boxes: (N, K, 4) current boxes ``x1, y1, x2, y2`` of each stream, in pixels of the map.
        scores: (N, K) their scores.
        prev_boxes: (N, P, 4) boxes of the previous frame; prev_scores: (N, P).
        height, width: size of the IG map in pixels.
        valid, prev_valid: (N, K) and (N, P) bool, the slots holding detections (None: all).
        labels, prev_labels: (N, K) and (N, P) classes, both or neither; when given, only detections of
            the same class match.
        block_size: None for the (N, height, width) map; a block side in map pixels (dividing height and
            width) for the map's per-block maximum, (N, 1, height // block_size, width // block_size),
            computed from the boxes without painting the map.
    """
    _check_labels_pairing(labels, prev_labels)
    dtype = _float_dtype(scores, prev_scores)
    boxes, prev_boxes = boxes.to(dtype), prev_boxes.to(dtype)
    scores, prev_scores = scores.to(dtype), prev_scores.to(dtype)
    iou = _stream_box_iou(boxes, prev_boxes)
    if valid is not None:
        scores = torch.where(valid, scores, 0.0)
        iou = iou * valid[:, :, None]
    if prev_valid is not None:
        prev_scores = torch.where(prev_valid, prev_scores, 0.0)
        iou = iou * prev_valid[:, None, :]
    iou = _restrict_pairs(iou, labels, prev_labels)
    values, prev_values = _matched_values(iou, scores, prev_scores)
    all_boxes, all_values = torch.cat([boxes, prev_boxes], dim=1), torch.cat([values, prev_values], dim=1)
    if block_size is None:
        return paint_boxes(all_boxes, all_values, height, width)
    return _block_maxima(all_boxes, all_values, height, width, block_size)


def padded_mask_information_gain(
    masks: torch.Tensor,
    scores: torch.Tensor,
    prev_masks: torch.Tensor,
    prev_scores: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    prev_valid: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    prev_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`mask_information_gain` for N streams whose instances are padded to fixed counts, with static
    shapes and without host synchronisation (capturable in a CUDA graph): slots outside ``valid`` take
    no part (their masks count as empty: they match nothing and paint nothing), which gives the maps of
    dropping them.

    Args:
        masks: (N, K, H, W) current instance masks, bool or probabilities binarised at ``>= 0.5``.
        scores: (N, K) their scores.
        prev_masks: (N, P, H, W) masks of the previous frame; prev_scores: (N, P).
        valid, prev_valid: (N, K) and (N, P) bool, the slots holding instances (None: all).
        labels, prev_labels: (N, K) and (N, P) classes, both or neither, as in :func:`box_information_gain`.

    Returns:
        (N, H, W) IG maps.
    """
    _check_labels_pairing(labels, prev_labels)
    if masks.dim() != 4 or prev_masks.dim() != 4 or masks.shape[-2:] != prev_masks.shape[-2:]:
        raise ValueError(f"masks and prev_masks must be (N, K, H, W) and (N, P, H, W), got "
                         f"{tuple(masks.shape)} and {tuple(prev_masks.shape)}")
    dtype = _float_dtype(scores, prev_scores)
    masks, prev_masks = _binarise(masks), _binarise(prev_masks)
    scores, prev_scores = scores.to(dtype), prev_scores.to(dtype)
    if valid is not None:
        masks, scores = masks & valid[..., None, None], torch.where(valid, scores, 0.0)
    if prev_valid is not None:
        prev_masks, prev_scores = prev_masks & prev_valid[..., None, None], torch.where(prev_valid, prev_scores, 0.0)
    iou = _restrict_pairs(_mask_iou(masks, prev_masks).to(dtype), labels, prev_labels)
    values, prev_values = _matched_values(iou, scores, prev_scores)
    return torch.maximum(_paint_masks(masks, values, dtype), _paint_masks(prev_masks, prev_values, dtype))


def _stream_box_iou(boxes: torch.Tensor, prev_boxes: torch.Tensor) -> torch.Tensor:
    """(N, K, P) IoU of each stream's (N, K, 4) and (N, P, 4) boxes, 0 where both are empty."""
    streams, count, prev_count = boxes.shape[0], boxes.shape[1], prev_boxes.shape[1]
    iou = box_iou(boxes.flatten(0, 1), prev_boxes.flatten(0, 1)).view(streams, count, streams, prev_count)
    return iou.diagonal(dim1=0, dim2=2).permute(2, 0, 1).nan_to_num(0.0)


def pad_detections(dets: Sequence[Mapping[str, torch.Tensor]], use_labels: bool, device: torch.device,
                   name: str) -> dict[str, torch.Tensor | None]:
    """The detections of N streams padded to the largest count: boxes (N, K, 4), scores (N, K), labels
    (N, K) or None, valid (N, K) bool."""
    for i, d in enumerate(dets):
        _check_detections(d["boxes"], d["scores"], d.get("labels") if use_labels else None,
                          f"{name}[{i}]['boxes']")
        if d["boxes"].device != device:
            raise ValueError(f"{name}[{i}] is on {d['boxes'].device}, the first stream on {device}")
    keys = ("boxes", "scores", "labels") if use_labels else ("boxes", "scores")
    counts = [d["scores"].shape[0] for d in dets]
    if len(set(counts)) == 1:  # a top-k decoder's fixed count: one stack per key, nothing padded
        padded = {key: torch.stack([d[key] for d in dets]) for key in keys}
        padded["valid"] = torch.ones(len(dets), counts[0], dtype=torch.bool, device=device)
    else:
        padded = {key: pad_sequence([d[key] for d in dets], batch_first=True) for key in keys}
        padded["valid"] = pad_sequence([torch.ones(count, dtype=torch.bool, device=device) for count in counts],
                                       batch_first=True)
    return {"labels": None, **padded}


def _matched_values(iou: torch.Tensor, scores: torch.Tensor,
                    prev_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The values that current and previous detections paint into their boxes or masks.

    Args:
        iou: (..., K, P) IoU of current and previous detections, 0 for pairs that may not match.
        scores: (..., K) current scores.
        prev_scores: (..., P) previous scores.

    Returns:
        (..., K) ``(1 - IoU_best) * score`` and (..., P) previous values: for a previous detection matched
        by current ones, the largest ``(1 - IoU_best) * score_prev`` among them; otherwise its score.
    """
    if iou.shape[-1] == 0:
        return scores.clone(), prev_scores.clone()
    best_iou, best = iou.max(dim=-1)
    keep = 1 - best_iou
    # Unmatched current detections scatter -1, below any matched factor (in [0, 1)), so the -1
    # sentinel of the accumulator survives exactly for never-matched previous detections.
    factor = torch.where(best_iou > 0, keep, -1.0)
    prev_factor = torch.full_like(prev_scores, -1.0).scatter_reduce(-1, best, factor, "amax")
    prev_factor = torch.where(prev_factor < 0, 1.0, prev_factor)
    return keep * scores, prev_factor * prev_scores


def _block_maxima(boxes: torch.Tensor, values: torch.Tensor, height: int, width: int,
                  block_size: int) -> torch.Tensor:
    """The per-block maximum of :func:`paint_boxes`'s map, (N, 1, height // block_size, width //
    block_size), from the boxes alone: a block's value is the largest value of the boxes reaching into
    its pixels (0 if none)."""
    if height % block_size or width % block_size:
        raise ValueError(f"block_size {block_size} does not divide the IG map of {height}x{width}")
    rows = _block_cover(boxes[..., 1], boxes[..., 3], height, block_size)
    cols = _block_cover(boxes[..., 0], boxes[..., 2], width, block_size)
    if values.shape[1] == 0:
        return values.new_zeros(values.shape[0], 1, rows.shape[-1], cols.shape[-1])
    covered = rows[..., :, None] & cols[..., None, :]
    return (covered * values[..., None, None]).amax(dim=1, keepdim=True)


def _block_cover(low: torch.Tensor, high: torch.Tensor, size: int, block_size: int) -> torch.Tensor:
    """(N, K, size // block_size) bool: whether box k covers a pixel of each block along one axis (the
    pixels ``floor(low) <= i < ceil(high)``, clipped to [0, size))."""
    first = low.floor().clamp(0, size)[..., None]
    last = high.ceil().clamp(0, size)[..., None]
    starts = torch.arange(0, size, block_size, device=low.device, dtype=low.dtype)
    return (first < starts + block_size) & (last > starts) & (first < last)


def paint_boxes(boxes: torch.Tensor, values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Max-composite constant values over boxes into per-stream maps that start at 0.

    Each axis is cut into cells that no box edge crosses (:func:`_axis_cells`), so every box covers a
    whole rectangle of cells. The max is composed on that cell grid, (K, <= 2K + 2, <= 2K + 2) per
    stream instead of (K, H, W) per stream, in chunks of boxes, then read out at every pixel.

    Args:
        boxes: (N, K, 4) ``x1, y1, x2, y2`` of each stream's boxes.
        values: (N, K) value of each box.

    Returns:
        (N, height, width).
    """
    row_cover, row_cell = _axis_cells(boxes[..., 1], boxes[..., 3], height)
    col_cover, col_cell = _axis_cells(boxes[..., 0], boxes[..., 2], width)
    num_streams, num_boxes = values.shape
    grid = values.new_zeros(num_streams, row_cover.shape[-1], col_cover.shape[-1])
    chunk = max(1, _PAINT_CHUNK_ELEMENTS // max(1, grid.numel()))
    for start in range(0, num_boxes, chunk):
        part = slice(start, start + chunk)
        covered = row_cover[:, part, :, None] & col_cover[:, part, None, :]
        grid = torch.maximum(grid, (covered * values[:, part, None, None]).amax(dim=1))
    stream = torch.arange(num_streams, device=boxes.device)[:, None, None]
    return grid[stream, row_cell[:, :, None], col_cell[:, None, :]]


def _axis_cells(low: torch.Tensor, high: torch.Tensor,
                size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut one image axis into cells that no box edge crosses.

    A box covers the pixels ``floor(low) <= i < ceil(high)``, clipped to [0, size). The cells are the
    intervals ``[b_c, b_(c+1))`` between sorted boundaries: the boxes' clipped pixel edges plus 0 and
    size (2K + 2 of them, repeats allowed), or simply one cell per pixel when that is fewer. Since
    every box edge is a boundary, a box covers a pixel exactly when it covers the pixel's cell.

    Args:
        low, high: (N, K) box extents along the axis, in pixels.
        size: number of pixels along the axis.

    Returns:
        (N, K, C) bool, whether box k covers cell c, and (N, size) long, the cell of each pixel.
    """
    num_streams, num_boxes = low.shape
    first = low.floor().clamp(0, size)
    last = high.ceil().clamp(0, size)
    pixels = torch.arange(size, device=low.device, dtype=low.dtype).expand(num_streams, size)
    if 2 * num_boxes + 2 < size:
        ends = [low.new_zeros(num_streams, 1), low.new_full((num_streams, 1), float(size))]  # no host copy
        bounds = torch.cat([first, last, *ends], dim=1).sort(dim=1).values
        pixel_cell = torch.searchsorted(bounds, pixels.contiguous(), right=True) - 1
    else:
        bounds = pixels
        pixel_cell = torch.arange(size, device=low.device).expand(num_streams, size)
    covered = (bounds[:, None, :] >= first[..., None]) & (bounds[:, None, :] < last[..., None])
    return covered, pixel_cell


def _paint_masks(masks: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Max-composite constant (..., K) values over (..., K, H, W) bool masks into a (..., H, W) map starting
    at 0."""
    out = torch.zeros(masks.shape[:-3] + masks.shape[-2:], dtype=dtype, device=masks.device)
    pixels = out.numel()
    chunk = max(1, _PAINT_CHUNK_ELEMENTS // max(pixels, 1))
    for start in range(0, masks.shape[-3], chunk):
        part = slice(start, start + chunk)
        maps = torch.where(masks[..., part, :, :], values[..., part, None, None], 0)
        out = torch.maximum(out, maps.amax(dim=-3))
    return out


def _mask_iou(masks: torch.Tensor, prev_masks: torch.Tensor) -> torch.Tensor:
    """(..., K, P) IoU of two sets of (..., K, H, W) and (..., P, H, W) bool masks; 0 where both are empty.

    Pixel counts are exact in fp32 up to 2**24 pixels per mask.
    """
    a = masks.flatten(-2).float()
    b = prev_masks.flatten(-2).float()
    inter = a @ b.mT
    union = a.sum(-1)[..., :, None] + b.sum(-1)[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), 0.0)


def _restrict_pairs(iou: torch.Tensor, labels: torch.Tensor | None,
                    prev_labels: torch.Tensor | None) -> torch.Tensor:
    """Zero the (..., K, P) IoU of pairs of different classes when (..., K) and (..., P) labels are given."""
    if labels is None:
        return iou
    return iou * (labels[..., :, None] == prev_labels[..., None, :])


def _binarise(masks: torch.Tensor) -> torch.Tensor:
    """Bool masks: bool input as is, probabilities thresholded at >= 0.5."""
    return masks if masks.dtype == torch.bool else masks >= 0.5


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The floating dtype to compute in: the inputs' promoted dtype, at least fp32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_detections(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor | None,
                      name: str) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must be (K, 4) x1, y1, x2, y2, got shape {tuple(boxes.shape)}")
    _check_per_detection(scores, boxes.shape[0], labels, name)


def _check_masks(masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor | None,
                 name: str) -> None:
    if masks.dim() != 3:
        raise ValueError(f"{name} must be (K, H, W), got shape {tuple(masks.shape)}")
    _check_per_detection(scores, masks.shape[0], labels, name)


def _check_per_detection(scores: torch.Tensor, count: int, labels: torch.Tensor | None,
                         name: str) -> None:
    if scores.shape != (count,):
        raise ValueError(f"scores for {name} must be ({count},), got shape {tuple(scores.shape)}")
    if labels is not None and labels.shape != (count,):
        raise ValueError(f"labels for {name} must be ({count},), got shape {tuple(labels.shape)}")


def _check_labels_pairing(labels: torch.Tensor | None, prev_labels: torch.Tensor | None) -> None:
    if (labels is None) != (prev_labels is None):
        raise ValueError("give labels and prev_labels together, or neither")


def _check_same_device(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"current inputs are on {a.device} but previous ones on {b.device}")


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}")
