"""A tiny CityPersons tree in the real on-disk formats, for tests of the CityPersons video dataset.

``write_citypersons(root)`` writes

- ``root/cityscapes/leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame:06d>_leftImg8bit.png``: the
  frames ``f-19 .. f+2`` around each annotated frame ``f`` (real snippets run ``f-19 .. f+10``), RGB
  PNGs of 256x512 (Cityscapes' 1024x2048 at a quarter);
- ``root/CityPersons/val_gt.json`` and ``root/CityPersons/train.json`` as Pedestron ships CityPersons:
  ``categories`` (1-5 and 0, as the real files), ``images`` with ``id`` (from 1 per file), ``height``,
  ``width`` and the name (val: ``im_name``, the bare name, as the official evaluation's ``val_gt.json``;
  train: ``file_name`` = ``leftImg8bit/train/<city>/<name>``, as Pedestron's converter writes it), and
  ``annotations`` with ``id``, ``image_id``, ``category_id`` 1, ``iscrowd``, ``ignore``, ``bbox``
  ``[x, y, w, h]``, ``vis_bbox``, ``height`` and ``vis_ratio``.

Every annotated image has the boxes of :data:`BOXES` except the clips listed in :data:`EMPTY` (real val
images without any box exist too). On frame ``n`` of a snippet annotated at ``f`` each person is drawn as
a filled rectangle shifted left by ``2 * (f - n)`` pixels, so that it lies exactly on its box in the
annotated frame and moves from frame to frame. The top-left 2x2 pixels hold ``n % 256`` and the 2x2
pixels right of them the image's CityPersons id (all channels), so a test can tell which frame of which
clip a loader delivered.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import cv2
import numpy as np

from cityscapes_fixture import sequence_frame_path

HEIGHT, WIDTH = 256, 512

CLIPS = {
    # (city, sequence, annotated frame): frankfurt_000000_000294 and frankfurt_000001_000538 are real val
    # names (the annotated frame number is not always 19); 3 val clips shard unevenly over 2 ranks.
    "val": [("frankfurt", "000000", 294), ("frankfurt", "000001", 538), ("lindau", "000000", 19)],
    "train": [("aachen", "000000", 19), ("bochum", "000000", 313)],
}
"""The default clips per split, in annotation-file order."""

EMPTY = {("lindau", "000000", 19)}
"""Annotated images without boxes."""

BOXES = [
    # (x, y, w, h, ignore, vis_ratio)
    (100, 60, 41, 100, 0, 1.0),   # fully visible, 100 px high: in CityPersons' "Reasonable" setup
    (300, 90, 25, 60, 0, 0.5),    # half occluded: "Heavy occlusion", not "Reasonable"
    (420, 120, 16, 40, 1, 1.0),   # marked ignore
]
"""The boxes of each annotated image (pixels of the 256x512 frame)."""

CATEGORIES = [{"id": 1, "name": "pedestrian"}, {"id": 2, "name": "rider"}, {"id": 3, "name": "sitting person"},
              {"id": 4, "name": "other person"}, {"id": 5, "name": "people group"},
              {"id": 0, "name": "ignore region"}]

BACKGROUND = 64
PERSON = (220, 20, 60)  # RGB, Cityscapes' colour of the person label


@dataclass
class CityPersonsTree:
    """What :func:`write_citypersons` wrote.

    Attributes:
        cityscapes: the Cityscapes root (holds ``leftImg8bit_sequence``).
        ann_files: split -> annotation file.
        clips: split -> ``(city, seq, annotated frame)`` per image, in file order.
        image_ids: split -> the images' CityPersons ids, in file order.
    """

    cityscapes: str
    ann_files: dict[str, str]
    clips: dict[str, list[tuple[str, str, int]]]
    image_ids: dict[str, list[int]]


def image_name(city: str, seq: str, frame: int) -> str:
    return f"{city}_{seq}_{frame:06d}_leftImg8bit.png"


def _boxes_of(clip: tuple[str, str, int]) -> list[tuple]:
    return [] if clip in EMPTY else BOXES


def _frame(clip: tuple[str, str, int], image_id: int, number: int) -> np.ndarray:
    """The RGB picture of snippet frame ``number`` of the clip annotated at ``clip[2]``."""
    rgb = np.full((HEIGHT, WIDTH, 3), BACKGROUND, np.uint8)
    shift = 2 * (clip[2] - number)
    for x, y, w, h, _, _ in _boxes_of(clip):
        rgb[y: y + h, max(x - shift, 0): max(x + w - shift, 0)] = PERSON
    rgb[:2, :2] = number % 256
    rgb[:2, 2:4] = image_id
    return rgb


def write_citypersons(root: str | os.PathLike, clips: dict[str, list[tuple[str, str, int]]] | None = None,
                      frames_before: int = 19, frames_after: int = 2) -> CityPersonsTree:
    """Write the tree under ``root``.

    Args:
        root: where to write (``cityscapes/`` and ``CityPersons/`` are made inside).
        clips: split -> ``(city, sequence, annotated frame)`` per image; default :data:`CLIPS`.
        frames_before, frames_after: sequence frames written before and after each annotated frame.
    """
    root = os.fspath(root)
    clips = CLIPS if clips is None else clips
    cityscapes = os.path.join(root, "cityscapes")
    ann_dir = os.path.join(root, "CityPersons")
    os.makedirs(ann_dir, exist_ok=True)
    ann_files, image_ids = {}, {}
    for split, annotated in clips.items():
        images, annotations = [], []
        for image_id, clip in enumerate(annotated, start=1):
            city, seq, frame = clip
            name = image_name(city, seq, frame)
            image = {"id": image_id, "height": HEIGHT, "width": WIDTH}
            if split == "train":
                image["file_name"] = f"leftImg8bit/train/{city}/{name}"
            else:
                image["im_name"] = name
            images.append(image)
            for x, y, w, h, ignore, vis_ratio in _boxes_of(clip):
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                    "ignore": ignore, "bbox": [x, y, w, h], "vis_bbox": [x, y, w, round(h * vis_ratio)],
                    "height": h, "vis_ratio": vis_ratio})
            for number in range(frame - frames_before, frame + frames_after + 1):
                path = sequence_frame_path(cityscapes, split, city, seq, number)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                cv2.imwrite(path, np.ascontiguousarray(_frame(clip, image_id, number)[:, :, ::-1]))
        ann_files[split] = os.path.join(ann_dir, "val_gt.json" if split == "val" else f"{split}.json")
        with open(ann_files[split], "w") as f:
            json.dump({"categories": CATEGORIES, "images": images, "annotations": annotations}, f)
        image_ids[split] = [image["id"] for image in images]
    return CityPersonsTree(cityscapes, ann_files, {split: list(c) for split, c in clips.items()}, image_ids)
