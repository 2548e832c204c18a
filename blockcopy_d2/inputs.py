"""The video fields of Detectron2 input dicts: ``clip_id`` (str), ``frame_index`` and ``annotated`` (bool:
the frame is scored). A batch of input dicts is one time step of N streams."""
from __future__ import annotations


def clip_ids_of(batched_inputs: list[dict]) -> tuple:
    """The batch's clip ids, one per stream (None for an input outside any clip)."""
    return tuple(item.get("clip_id") for item in batched_inputs)


def is_annotated(batched_inputs: list[dict]) -> bool:
    """Whether the batch holds a scored frame (inputs without the field count as scored)."""
    return any(item.get("annotated", True) for item in batched_inputs)
