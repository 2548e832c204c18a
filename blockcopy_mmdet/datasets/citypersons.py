"""CityPersons as video for MMDetection: the clips of Cityscapes frames that end at each annotated image.

CityPersons (Zhang et al., CVPR 2017) boxes the persons of the Cityscapes images that have fine ground
truth; BlockCopy evaluates on Cityscapes' video snippets (``leftImg8bit_sequence``): a clip is the
``clip_length`` (20) frames ``f - 19 .. f`` ending at an annotated frame ``f``, it starts with a full
execution, and only its last frame is scored.

The annotation files (COCO style, as Pedestron ships them in ``datasets/CityPersons/``):

- ``val_gt.json``: the ground truth of the official evaluation script (Pedestron's
  ``tools/cityPerson/eval_demo.py`` loads it with its COCO class); 500 images of frankfurt, lindau and
  munster. Keys: ``categories`` (ids 1-5: pedestrian, rider, sitting person, other person, people
  group; 0: ignore region), ``images`` and ``annotations``.
- ``images``: ``id`` (int, 1..500), ``height`` 1024, ``width`` 2048, and the name: ``im_name`` =
  ``<city>_<seq>_<frame>_leftImg8bit.png`` in ``val_gt.json``; ``file_name`` with the same bare name in
  ``val_gt_for_mmdetction.json`` (the test file of Pedestron's CSP and MGAN configs, whose images lie
  in one ``val_all_in_folder``); ``file_name`` = ``<city>/<name>`` in ``val_gt_mm_nested.json``; both
  ``im_name`` and ``file_name`` = ``<city>/<name>`` in ``test_images.json`` (no boxes). The training
  file ``train.json`` (used by the CSP config with the ``leftImg8bit/train`` images) is not in the
  stored repository snapshot; Pedestron's converter (``tools/convert_datasets/citypersons``) writes
  ``file_name`` = ``leftImg8bit/train/<city>/<name>``, marks the boxes to ignore with ``iscrowd`` (no
  ``ignore``, ``vis_ratio``) and gives every box the image's ``height``, not its own. Only the last
  component of a name is read here, so all these forms work.
- The annotated frame number (the last six digits) is 19 for only 233 of the 500 val images
  (e.g. ``frankfurt_000000_000294``); 13 val images have no box at all (they still count for FPPI).
- ``annotations``: ``id``, ``image_id``, ``category_id`` (1 for every box, ignore regions included),
  ``bbox`` ``[x, y, w, h]`` of the full body (ints, pixels of the 2048x1024 image), ``vis_bbox`` (the
  visible part), ``height`` (= ``bbox[3]``), ``vis_ratio`` (visible fraction, 0..1), ``ignore`` (0/1)
  and ``iscrowd`` (0/1; ``iscrowd=1`` boxes all have ``ignore=1``). Of the 5,795 val boxes, 2,638 have
  ``ignore=1`` (the file does not say why: all boxes have category 1); the evaluation setups ignore
  more by ``height`` and ``vis_ratio``.

Each frame is one data item (mmdet's format, for a pipeline such as ``LoadImageFromFile`` ->
``PackDetInputs``):

- ``img_path`` (str): ``<data_root>/<data_prefix['img']>/<city>/<city>_<seq>_<frame>_leftImg8bit.png``;
- ``img_id`` (int): the annotated image's CityPersons ``id``, the same for every frame of its clip;
- ``clip_id`` (int): the clip's position in the dataset (0, 1, ...), in annotation-file order;
- ``frame_id`` (int): 0 .. ``clip_length - 1``; ``clip_length`` (int);
- ``annotated`` (bool): True only on the last frame;
- ``height``, ``width`` (int): the annotated image's size, which all frames of a snippet share;
- ``scale_factor``: ``(1.0, 1.0)``: frames go to the model at their own size, and a detector's
  rescaling reads this; a ``Resize`` in the pipeline replaces it with its own factor;
- ``instances`` (annotated frame only; unannotated frames have no ground truth rather than an empty
  one): per box ``bbox`` ``[x1, y1, x2, y2]`` (``x + w``, ``y + h``, as mmdet's COCO loader),
  ``bbox_label`` 0, ``ignore_flag`` (from ``ignore``; from ``iscrowd`` where a file has no ``ignore``),
  and ``height`` / ``vis_ratio`` when the file has them (the evaluation setups filter on them).

Frames come clip after clip, in order. Only local files are listed (the frames are checked to exist when
the dataset loads).
"""
from __future__ import annotations

from collections import defaultdict
from typing import ClassVar

from mmdet.datasets import BaseDetDataset
from mmdet.registry import DATASETS
from mmengine.fileio import exists, load

from blockcopy_core.data import cityscapes
from blockcopy_core.data import clips as video_clips

from .samplers import clip_lengths_of


@DATASETS.register_module()
class CityPersonsVideoDataset(BaseDetDataset):
    """CityPersons clips: for every annotated image, the ``clip_length`` Cityscapes frames ending at it.

    Args:
        ann_file: the CityPersons annotation file (e.g. ``val_gt.json``; ``train.json`` for warm-up clips);
            relative paths are under ``data_root``.
        data_root: the root the relative paths are joined to.
        data_prefix: ``dict(img=...)``, the split's ``leftImg8bit_sequence/<split>`` folder.
        pipeline: mmdet transforms applied to each frame's data item.
        test_mode: mmengine's flag; in either mode a pipeline returning None raises instead of the frame
            being replaced by a random other one (a clip cannot skip frames).
        clip_length: frames per clip, ending at the annotated frame (the method's 20).
        max_clips: keep only the first N clips (annotation-file order), for quick runs; None keeps all.
        **kwargs: other arguments of mmdet's ``BaseDetDataset`` (``metainfo``, ``backend_args``,
            ``lazy_init``, ``serialize_data``, ...). Its ``indices`` selects frames, which can cut a clip:
            use ``max_clips`` instead.

    Raises (when the data list loads):
        FileNotFoundError: the annotation file, the frame folder, a city folder or a frame is missing; the
            message names the path and the expected layout.
        ValueError: an annotation file that is not CityPersons' format, or an annotated frame too early in
            its snippet for a clip to end at it.
    """

    METAINFO: ClassVar[dict] = {"classes": ("pedestrian",), "palette": [(220, 20, 60)]}

    def __init__(self, *, clip_length: int = cityscapes.CLIP_LENGTH, max_clips: int | None = None,
                 data_prefix: dict | None = None, **kwargs) -> None:
        if isinstance(clip_length, bool) or not isinstance(clip_length, int) or clip_length < 1:
            raise ValueError(f"clip_length must be a positive int, got {clip_length!r}")
        if max_clips is not None and (isinstance(max_clips, bool) or not isinstance(max_clips, int)
                                      or max_clips < 1):
            raise ValueError(f"max_clips must be a positive int or None, got {max_clips!r}")
        data_prefix = {"img": ""} if data_prefix is None else data_prefix
        if "img" not in data_prefix:
            raise ValueError(f"data_prefix must hold 'img', the leftImg8bit_sequence/<split> folder; got "
                             f"{data_prefix!r}")
        self.clip_length = clip_length
        self.max_clips = max_clips
        super().__init__(data_prefix=data_prefix, **kwargs)

    def layout(self) -> str:
        """The expected on-disk layout, with this dataset's paths, as error messages show it."""
        length = self.clip_length
        return (
            "Expected CityPersons on Cityscapes video:\n"
            f"  ann_file ({self.ann_file}): CityPersons boxes in COCO style, e.g. Pedestron's "
            "datasets/CityPersons/val_gt.json (train.json for warm-up): images with id, height, width and "
            f"im_name or file_name ([folders/]<city>_<seq>_<frame:06d>{cityscapes.IMAGE_SUFFIX}); annotations "
            "with image_id, bbox [x, y, w, h], ignore (and height, vis_ratio)\n"
            f"  data_root + data_prefix['img'] ({self.data_prefix['img']}): the split's video frames, "
            f"{cityscapes.SEQUENCE_FRAMES} (leftImg8bit_sequence_trainvaltest.zip), i.e. "
            f"<city>/<city>_<seq>_<frame:06d>{cityscapes.IMAGE_SUFFIX} in that folder\n"
            f"A clip is the {length} frames <frame-{length - 1}> .. <frame> ending at each annotated image.")

    def load_data_list(self) -> list[dict]:
        """One data item per frame, clip after clip (see the module docstring)."""
        layout = self.layout()
        if not exists(self.ann_file, backend_args=self.backend_args):
            raise cityscapes.layout_error("CityPersons annotation file", self.ann_file, layout)
        images, boxes = _read_annotations(self.ann_file, self.backend_args, layout)
        if self.max_clips is not None:
            images = images[: self.max_clips]
        frames_dir = self.data_prefix["img"]
        cityscapes.list_folder(frames_dir, "video-frame folder (leftImg8bit_sequence/<split>)", layout)
        listings: dict[str, set[str]] = {}
        data_list = []
        for clip_id, (image, (city, seq, frame)) in enumerate(images):
            paths = cityscapes.clip_frame_paths(frames_dir, city, seq, frame, self.clip_length, layout, listings)
            for frame_id, path in enumerate(paths):
                item = {"img_path": path, "img_id": image["id"], "clip_id": clip_id, "frame_id": frame_id,
                        "clip_length": self.clip_length, "annotated": frame_id == self.clip_length - 1,
                        "height": image["height"], "width": image["width"], "scale_factor": (1.0, 1.0)}
                if item["annotated"]:
                    item["instances"] = [_instance(box, self.ann_file) for box in boxes[image["id"]]]
                data_list.append(item)
        return data_list

    def __getitem__(self, idx: int) -> dict:
        """The frame's data item after the pipeline. mmengine's ``BaseDataset`` replaces an item the
        pipeline drops (returns None) by a random other one outside test mode; in a clip that would put a
        foreign frame into the stream, so this fails instead."""
        if not self._fully_initialized:
            self.full_init()
        data = self.prepare_data(idx)
        if data is None:
            raise RuntimeError(f"the pipeline dropped frame {idx} ({self.get_data_info(idx)['img_path']}); "
                               "a video clip cannot skip frames")
        return data

    def clip_ranges(self) -> list[range]:
        """The dataset indices of each clip, in order (e.g. to draw warm-up clips from)."""
        return video_clips.shard_clips(clip_lengths_of(self), rank=0, world_size=1)[1]  # all clips, one shard


def _read_annotations(ann_file: str, backend_args: dict | None,
                      layout: str) -> tuple[list[tuple[dict, tuple[str, str, str]]], dict[int, list[dict]]]:
    """The file's images, each with its parsed ``(city, seq, frame)``, in file order, and its boxes by
    image id; ValueError naming the file for anything that is not CityPersons' format."""
    content = load(ann_file, file_format="json", backend_args=backend_args)
    if not isinstance(content, dict) or not isinstance(content.get("images"), list) or not content["images"]:
        raise ValueError(f"CityPersons annotation file {ann_file} has no 'images' list (COCO style "
                         f"expected)\n{layout}")
    images = []
    for image in content["images"]:
        missing = [key for key in ("id", "height", "width") if key not in image]
        if "file_name" not in image and "im_name" not in image:
            missing.append("im_name or file_name")
        if missing:
            raise ValueError(f"CityPersons annotation file {ann_file}: image {image} lacks {', '.join(missing)}"
                             f"\n{layout}")
        name = image.get("file_name", image.get("im_name"))
        images.append((image, cityscapes.parse_image_name(name, ann_file, layout)))
    boxes: dict[int, list[dict]] = defaultdict(list)
    for box in content.get("annotations", []):
        if "image_id" not in box or "bbox" not in box:
            raise ValueError(f"CityPersons annotation file {ann_file}: annotation {box} lacks image_id or "
                             f"bbox\n{layout}")
        boxes[box["image_id"]].append(box)
    return images, boxes


def _instance(box: dict, ann_file: str) -> dict:
    """A CityPersons box as an mmdet instance: corners, the one class, the ignore flag, height and
    visibility."""
    if len(box["bbox"]) != 4:
        raise ValueError(f"CityPersons annotation file {ann_file}: bbox of annotation {box.get('id')} is not "
                         f"[x, y, w, h]: {box['bbox']}")
    x, y, w, h = (float(v) for v in box["bbox"])
    # CityPersons' own flag; COCO's iscrowd where a file has none (Pedestron's converter marks the boxes
    # the evaluation ignores that way).
    ignore = box["ignore"] if "ignore" in box else box.get("iscrowd", 0)
    instance = {"bbox": [x, y, x + w, y + h], "bbox_label": 0, "ignore_flag": int(bool(ignore))}
    for key in ("height", "vis_ratio"):
        if key in box:
            instance[key] = float(box[key])
    return instance
