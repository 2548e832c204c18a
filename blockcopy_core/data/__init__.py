"""Video input/output and ground truth for the sequences blockcopy is evaluated on."""
from .mot import (boxes_for_frames, load_mot_ground_truth, load_mot_ignore_boxes, read_mot_rows,
                  scale_boxes)
from .video import VideoReader, VideoWriter, pets09_s2l1_paths

__all__ = [
    "VideoReader",
    "VideoWriter",
    "boxes_for_frames",
    "load_mot_ground_truth",
    "load_mot_ignore_boxes",
    "pets09_s2l1_paths",
    "read_mot_rows",
    "scale_boxes",
]
