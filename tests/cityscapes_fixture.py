"""A tiny Cityscapes tree in the real on-disk formats, for tests of the video datasets.

``write_cityscapes(root)`` writes, per split, a few 30-frame snippets in ``leftImg8bit_sequence``
(frames ``f-19 .. f+10`` around each annotated frame ``f``, as the real snippets), the annotated frame
again in ``leftImg8bit``, and its gtFine files: ``polygons.json`` (``imgHeight``, ``imgWidth``,
``objects`` with ``label`` and ``polygon``), ``labelIds.png`` (uint8 label ids), ``labelTrainIds.png``
(uint8 train ids, 255 = ignore) and ``instanceIds.png`` (uint16: ``id * 1000 + k`` for the k-th
instance of an instance class, the label id elsewhere). The PNGs are rasterised from the polygons
with PIL's polygon fill on a background of ``unlabeled``, later objects over earlier ones, as
cityscapesscripts' ``json2labelImg`` / ``json2instanceImg`` do; all ids come from cityscapesscripts'
``labels`` table.

Every frame's picture is the label colours, with frame number ``% 256`` in the 2x2 top-left pixels
(all channels), so a test can tell which frame a loader delivered.
"""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
from cityscapesscripts.helpers.labels import id2label, name2label
from PIL import Image, ImageDraw

HEIGHT, WIDTH = 64, 128

CLIPS = {
    # (city, sequence, annotated frame); frankfurt_000000_000294 as in the real val split: the
    # annotated frame number is not always 19.
    "train": [("aachen", "000000", 19), ("aachen", "000001", 19)],
    "val": [("frankfurt", "000000", 294), ("lindau", "000000", 19)],
}
"""The default clips per split."""

# Background (drawn first, in this order) and the instances of the two scene layouts that clips take
# in turn; boxes (x0, y0, x1, y1) inclusive, things at least 100 pixels (the evaluation's smallest
# region) and disjoint, so that every instance stays whole.
STUFF = [("road", (0, 40, 127, 63)), ("sky", (0, 0, 127, 15)), ("building", (0, 16, 63, 31)),
         ("vegetation", (64, 16, 127, 31)), ("sidewalk", (0, 32, 127, 39)),
         ("ego vehicle", (0, 60, 127, 63))]
THINGS = [
    [("car", (8, 40, 31, 55)), ("car", (36, 42, 55, 55)), ("person", (62, 20, 71, 45)),
     ("rider", (80, 18, 89, 39)), ("bicycle", (78, 42, 95, 55))],
    [("truck", (4, 30, 35, 55)), ("bus", (40, 26, 71, 55)), ("train", (76, 20, 123, 41)),
     ("motorcycle", (78, 44, 97, 57)), ("person", (104, 40, 113, 58))],
]


def _polygon(box: tuple[int, int, int, int]) -> list[list[int]]:
    x0, y0, x1, y1 = box
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _rasterise(objects: list[dict], mode: str, background: int, value) -> np.ndarray:
    """Draw the objects' polygons in order (later over earlier) with ``value(label, k)``."""
    image = Image.new(mode, (WIDTH, HEIGHT), background)
    draw = ImageDraw.Draw(image)
    counts: dict[str, int] = {}
    for obj in objects:
        label = name2label[obj["label"]]
        k = counts.get(label.name, 0)
        if label.hasInstances:
            counts[label.name] = k + 1
        draw.polygon([tuple(p) for p in obj["polygon"]], fill=value(label, k))
    return np.asarray(image)


def annotated_frame_files(root: str, split: str, city: str, seq: str, frame: int) -> dict[str, str]:
    """Paths of one annotated frame: ``image`` (leftImg8bit) and the gtFine ``polygons``,
    ``instanceIds``, ``labelIds``, ``labelTrainIds`` files."""
    stem = f"{city}_{seq}_{frame:06d}"
    gt = os.path.join(root, "gtFine", split, city, stem + "_gtFine_")
    return {"image": os.path.join(root, "leftImg8bit", split, city, stem + "_leftImg8bit.png"),
            "polygons": gt + "polygons.json", "instanceIds": gt + "instanceIds.png",
            "labelIds": gt + "labelIds.png", "labelTrainIds": gt + "labelTrainIds.png"}


def sequence_frame_path(root: str, split: str, city: str, seq: str, frame: int) -> str:
    """``leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame:06d>_leftImg8bit.png`` under root."""
    return os.path.join(root, "leftImg8bit_sequence", split, city,
                        f"{city}_{seq}_{frame:06d}_leftImg8bit.png")


def write_cityscapes(root: str | os.PathLike, clips: dict[str, list[tuple[str, str, int]]] | None = None,
                     frames_before: int = 19, frames_after: int = 10) -> dict[str, list[str]]:
    """Write the tree under ``root`` (the ``cityscapes`` folder).

    Args:
        root: where to write.
        clips: split -> ``(city, sequence, annotated frame)`` per snippet; default :data:`CLIPS`.
        frames_before, frames_after: sequence frames written before and after each annotated frame.

    Returns:
        split -> clip ids (``<city>_<seq>_<frame:06d>``), in the order written.
    """
    root = os.fspath(root)
    clips = CLIPS if clips is None else clips
    written: dict[str, list[str]] = {}
    for split, snippets in clips.items():
        written[split] = []
        for position, (city, seq, frame) in enumerate(snippets):
            objects = [{"label": name, "polygon": _polygon(box)}
                       for name, box in STUFF + THINGS[position % len(THINGS)]]
            files = annotated_frame_files(root, split, city, seq, frame)
            for path in files.values():
                os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(files["polygons"], "w") as f:
                json.dump({"imgHeight": HEIGHT, "imgWidth": WIDTH, "objects": objects}, f, indent=2)
            unlabeled = name2label["unlabeled"]
            label_ids = _rasterise(objects, "L", unlabeled.id, lambda label, k: label.id)
            train_ids = _rasterise(objects, "L", unlabeled.trainId, lambda label, k: label.trainId)
            instance_ids = _rasterise(
                objects, "I", unlabeled.id,
                lambda label, k: label.id * 1000 + k if label.hasInstances else label.id)
            cv2.imwrite(files["labelIds"], label_ids.astype(np.uint8))
            cv2.imwrite(files["labelTrainIds"], train_ids.astype(np.uint8))
            cv2.imwrite(files["instanceIds"], instance_ids.astype(np.uint16))  # 16-bit PNG, as Cityscapes

            colours = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            for label_id in np.unique(label_ids):
                colours[label_ids == label_id] = id2label[int(label_id)].color
            for number in range(frame - frames_before, frame + frames_after + 1):
                rgb = colours.copy()
                rgb[:2, :2] = number % 256
                bgr = np.ascontiguousarray(rgb[:, :, ::-1])
                path = sequence_frame_path(root, split, city, seq, number)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                cv2.imwrite(path, bgr)
                if number == frame:  # the annotated picture is the same frame
                    cv2.imwrite(files["image"], bgr)
            written[split].append(f"{city}_{seq}_{frame:06d}")
    return written

