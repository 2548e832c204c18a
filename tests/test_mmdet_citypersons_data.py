"""CityPersons video data for MMDetection: clips, errors, clip-ordered sampling, loading through mmengine.

Runs on a tiny CityPersons tree in the real formats (tests/citypersons_fixture.py).
"""
# Imports follow the importorskip below; configs are written as mmengine's are, with dict(...).
# ruff: noqa: E402, C408
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

pytest.importorskip("mmdet")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mmdet.utils import register_all_modules
from mmengine.dist import collect_results
from mmengine.registry import DATA_SAMPLERS, DATASETS
from mmengine.runner import Runner

from blockcopy_mmdet.datasets import ClipBatchSampler, ClipSampler, CityPersonsVideoDataset
from citypersons_fixture import BOXES, CLIPS, EMPTY, HEIGHT, WIDTH, write_citypersons
from cityscapes_fixture import sequence_frame_path

META_KEYS = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "clip_id", "frame_id",
             "clip_length", "annotated")
PIPELINE = [dict(type="LoadImageFromFile"), dict(type="PackDetInputs", meta_keys=META_KEYS)]
LAYOUT_LINE = "leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame:06d>_leftImg8bit.png"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    register_all_modules()  # mmdet's registries as default scope, as mmdet's tools do
    return write_citypersons(tmp_path_factory.mktemp("data"))


def _config(tree, split="val", **kwargs) -> dict:
    config = dict(type="CityPersonsVideoDataset", ann_file=tree.ann_files[split], data_root=tree.cityscapes,
                  data_prefix=dict(img=f"leftImg8bit_sequence/{split}/"), pipeline=PIPELINE, test_mode=True)
    config.update(kwargs)
    return config


def _dataset(tree, split="val", **kwargs) -> CityPersonsVideoDataset:
    return DATASETS.build(_config(tree, split, **kwargs))


@pytest.mark.parametrize("split", ["val", "train"])
def test_every_annotated_image_is_a_20_frame_clip_ending_at_it(tree, split):
    dataset = _dataset(tree, split)
    items = [dataset.get_data_info(i) for i in range(len(dataset))]
    assert len(items) == 20 * len(CLIPS[split])
    for clip_id, (clip, image_id) in enumerate(zip(CLIPS[split], tree.image_ids[split], strict=True)):
        city, seq, annotated = clip
        frames = items[20 * clip_id: 20 * (clip_id + 1)]
        assert [d["img_path"] for d in frames] == [
            sequence_frame_path(tree.cityscapes, split, city, seq, n) for n in range(annotated - 19, annotated + 1)]
        assert [d["frame_id"] for d in frames] == list(range(20))
        assert [d["annotated"] for d in frames] == [False] * 19 + [True]
        for d in frames:
            assert (d["img_id"], d["clip_id"], d["clip_length"]) == (image_id, clip_id, 20)
            assert (d["height"], d["width"], d["scale_factor"]) == (HEIGHT, WIDTH, (1.0, 1.0))
        assert all("instances" not in d for d in frames[:-1])  # unannotated: no ground truth at all
        expected = [] if clip in EMPTY else [
            {"bbox": [x, y, x + w, y + h], "bbox_label": 0, "ignore_flag": ignore, "height": h, "vis_ratio": vis}
            for x, y, w, h, ignore, vis in BOXES]
        assert frames[-1]["instances"] == expected
    assert dataset.metainfo["classes"] == ("pedestrian",)


def test_clip_ranges_max_clips_and_clip_length(tree):
    dataset = _dataset(tree)
    assert dataset.clip_ranges() == [range(0, 20), range(20, 40), range(40, 60)]
    assert len(_dataset(tree, max_clips=2)) == 40
    assert _dataset(tree, max_clips=5).clip_ranges() == dataset.clip_ranges()  # more than there are: all
    short = _dataset(tree, clip_length=5)
    city, seq, annotated = CLIPS["val"][0]
    assert [short.get_data_info(i)["img_path"] for i in range(5)] == [
        sequence_frame_path(tree.cityscapes, "val", city, seq, n) for n in range(annotated - 4, annotated + 1)]
    assert [short.get_data_info(i)["annotated"] for i in range(5)] == [False] * 4 + [True]


def test_ignore_flag_falls_back_to_iscrowd(tree, tmp_path):
    with open(tree.ann_files["val"]) as f:
        content = json.load(f)
    for box in content["annotations"]:
        box["iscrowd"] = box.pop("ignore")
    ann_file = tmp_path / "no_ignore.json"
    ann_file.write_text(json.dumps(content))
    last = _dataset(tree, ann_file=str(ann_file), max_clips=1).get_data_info(19)
    assert [box["ignore_flag"] for box in last["instances"]] == [ignore for *_, ignore, _ in BOXES]


def _copy(tree, tmp_path) -> tuple[str, str]:
    """A copy of the val frames and annotation file that a test may damage."""
    root = str(tmp_path / "cityscapes")
    shutil.copytree(os.path.join(tree.cityscapes, "leftImg8bit_sequence", "val"),
                    os.path.join(root, "leftImg8bit_sequence", "val"))
    ann_file = str(tmp_path / "val_gt.json")
    shutil.copy(tree.ann_files["val"], ann_file)
    return root, ann_file


@pytest.mark.parametrize("missing", ["annotation file", "frame folder", "city folder", "first frame", "last frame"])
def test_missing_data_raises_naming_the_path_and_layout(tree, tmp_path, missing):
    root, ann_file = _copy(tree, tmp_path)
    city, seq, annotated = CLIPS["val"][1]
    path = {
        "annotation file": ann_file,
        "frame folder": os.path.join(root, "leftImg8bit_sequence", "val"),
        "city folder": os.path.join(root, "leftImg8bit_sequence", "val", "lindau"),
        "first frame": sequence_frame_path(root, "val", city, seq, annotated - 19),
        "last frame": sequence_frame_path(root, "val", city, seq, annotated),
    }[missing]
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    with pytest.raises(FileNotFoundError) as error:
        DATASETS.build(dict(_config(tree), ann_file=ann_file, data_root=root))
    message = str(error.value)
    assert path in message
    assert LAYOUT_LINE in message and "CityPersons boxes in COCO style" in message and ann_file in message
    if missing == "first frame":
        assert f"frame 0 of 20 of clip {city}_{seq}_{annotated:06d}" in message
    if missing == "last frame":
        assert f"frame 19 of 20 of clip {city}_{seq}_{annotated:06d}" in message


@pytest.mark.parametrize("damage, error, match", [
    (lambda c: c["images"][0].update(im_name="frankfurt_000000_000294.png"), ValueError,
     "does not end in _leftImg8bit.png"),
    (lambda c: c["images"][0].update(im_name="frankfurt_x_000294_leftImg8bit.png"), ValueError,
     "not of the form <city>_<seq>_<frame:06d>"),
    (lambda c: c["images"][0].pop("im_name"), ValueError, "lacks im_name or file_name"),
    (lambda c: c["images"][1].pop("height"), ValueError, "lacks height"),
    (lambda c: c.pop("images"), ValueError, "has no 'images' list"),
    (lambda c: c["annotations"][0].update(bbox=[1, 2, 3]), ValueError, r"is not \[x, y, w, h\]"),
])
def test_malformed_annotation_file_raises(tree, tmp_path, damage, error, match):
    with open(tree.ann_files["val"]) as f:
        content = json.load(f)
    damage(content)
    ann_file = tmp_path / "bad.json"
    ann_file.write_text(json.dumps(content))
    with pytest.raises(error, match=match):
        _dataset(tree, ann_file=str(ann_file))


def test_bad_arguments_and_too_early_frames_raise(tree):
    with pytest.raises(ValueError, match="too small for a clip of 300 frames"):
        _dataset(tree, clip_length=300)  # frankfurt_000000_000294 has no 300 frames before it
    with pytest.raises(ValueError, match="clip_length must be a positive int"):
        _dataset(tree, clip_length=0)
    with pytest.raises(ValueError, match="max_clips must be a positive int or None"):
        _dataset(tree, max_clips=0)
    with pytest.raises(ValueError, match="data_prefix must hold 'img'"):
        _dataset(tree, data_prefix=dict(img_path="leftImg8bit_sequence/val/"))


class _Frames:
    """A stand-in video dataset: items with ``clip_id`` and ``frame_id`` only."""

    def __init__(self, lengths):
        self.items = [{"clip_id": c, "frame_id": t} for c, n in enumerate(lengths) for t in range(n)]

    def __len__(self):
        return len(self.items)

    def get_data_info(self, index):
        return dict(self.items[index])


@pytest.mark.parametrize("lengths", [[20, 20, 20], [3, 1, 4, 1, 5, 9, 2], [20]])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_clip_sampler_gives_each_rank_whole_clips_covering_every_frame_once(lengths, world_size):
    starts = np.cumsum([0] + lengths)
    clips = [list(range(starts[c], starts[c + 1])) for c in range(len(lengths))]
    seen = []
    for rank in range(world_size):
        sampler = ClipSampler(_Frames(lengths), rank=rank, world_size=world_size)
        indices = list(sampler)
        assert len(indices) == len(sampler)
        assert indices == [i for c in sampler.clip_indices for i in clips[c]]  # whole clips, in order
        assert abs(len(sampler.clip_indices) - len(lengths) / world_size) < 1
        seen += indices
    assert seen == list(range(sum(lengths)))  # every frame exactly once: no padding


def test_clip_sampler_on_the_dataset_with_1_and_2_ranks(tree):
    dataset = _dataset(tree)
    assert list(ClipSampler(dataset)) == list(range(60))  # not distributed: mmengine's get_dist_info
    rank0, rank1 = (ClipSampler(dataset, seed=7, rank=r, world_size=2) for r in range(2))
    assert list(rank0) == list(range(40)) and list(rank1) == list(range(40, 60))  # 2 + 1 clips, unpadded
    for sampler in (rank0, rank1):
        clip_ids = [dataset.get_data_info(i)["clip_id"] for i in sampler]
        assert all(clip_ids.count(c) == 20 for c in set(clip_ids))


def test_clip_sampler_rejects_frames_out_of_order():
    shuffled = _Frames([3, 3])
    shuffled.items[1], shuffled.items[2] = shuffled.items[2], shuffled.items[1]
    with pytest.raises(ValueError, match="frame_id 2, expected 1"):
        ClipSampler(shuffled)
    torn = _Frames([2, 2])
    torn.items = torn.items[:1] + torn.items[2:] + torn.items[1:2]
    with pytest.raises(ValueError, match="not contiguous"):
        ClipSampler(torn)
    not_video = _Frames([2])
    not_video.items = [{"img_path": "x.png"}]
    with pytest.raises(KeyError, match="not a video dataset"):
        ClipSampler(not_video)


def _batches(dataset, batch_size, rank=0, world_size=1):
    sampler = ClipSampler(dataset, rank=rank, world_size=world_size)
    return list(ClipBatchSampler(sampler, batch_size)), len(ClipBatchSampler(sampler, batch_size))


def test_clip_batch_sampler_runs_n_clips_as_n_streams(tree):
    dataset = _dataset(tree)
    batches, length = _batches(dataset, 2)
    assert batches == [[t, 20 + t] for t in range(20)] + [[40 + t] for t in range(20)]  # last group: 1 clip
    assert length == 40
    for batch in batches:  # never two frames of one clip in a batch; all streams at the same frame
        infos = [dataset.get_data_info(i) for i in batch]
        assert len({d["clip_id"] for d in infos}) == len(batch)
        assert len({d["frame_id"] for d in infos}) == 1
    assert _batches(dataset, 1)[0] == [[i] for i in range(60)]
    assert _batches(dataset, 4)[0] == [[t, 20 + t, 40 + t] for t in range(20)]
    assert _batches(dataset, 2, rank=0, world_size=2)[0] == [[t, 20 + t] for t in range(20)]
    assert _batches(dataset, 2, rank=1, world_size=2)[0] == [[40 + t] for t in range(20)]

    with pytest.raises(ValueError, match=r"clips \[0, 1\].*\[4, 3\] frames"):
        _batches(_Frames([4, 3, 3]), 2)
    with pytest.raises(TypeError, match="needs a ClipSampler"):
        ClipBatchSampler(range(10), 2)
    assert DATA_SAMPLERS.get("ClipSampler") is ClipSampler
    assert DATA_SAMPLERS.get("ClipBatchSampler") is ClipBatchSampler


def _check_frame(inputs: torch.Tensor, sample, tree, clip_id: int, frame_id: int) -> None:
    """The packed frame is frame ``frame_id`` of clip ``clip_id``, with the metadata the model needs."""
    city, seq, annotated = CLIPS["val"][clip_id]
    number = annotated - 19 + frame_id
    assert inputs.shape == (3, HEIGHT, WIDTH) and inputs.dtype == torch.uint8
    assert int(inputs[0, 0, 0]) == number % 256 and int(inputs[0, 0, 2]) == tree.image_ids["val"][clip_id]
    meta = sample.metainfo
    assert set(META_KEYS) <= set(meta)
    assert meta["img_path"] == sequence_frame_path(tree.cityscapes, "val", city, seq, number)
    assert (meta["img_id"], meta["clip_id"], meta["frame_id"]) == (tree.image_ids["val"][clip_id], clip_id, frame_id)
    assert (meta["clip_length"], meta["annotated"]) == (20, frame_id == 19)
    assert meta["ori_shape"] == meta["img_shape"] == (HEIGHT, WIDTH)
    assert meta["scale_factor"] == (1.0, 1.0)


def test_runner_builds_a_loader_of_n_streams(tree):
    loader = Runner.build_dataloader(dict(
        dataset=_config(tree), sampler=dict(type="ClipSampler"), batch_sampler=dict(type="ClipBatchSampler"),
        batch_size=2, num_workers=0))
    batches = list(loader)
    assert len(batches) == len(loader) == 40
    for index, batch in enumerate(batches):
        t, clips = index % 20, ([0, 1] if index < 20 else [2])
        assert len(batch["inputs"]) == len(batch["data_samples"]) == len(clips)
        for inputs, sample, clip_id in zip(batch["inputs"], batch["data_samples"], clips, strict=True):
            _check_frame(inputs, sample, tree, clip_id, t)


def test_runner_builds_a_loader_with_the_plain_sampler_and_batch_size_1(tree):
    loader = Runner.build_dataloader(dict(dataset=_config(tree, max_clips=2), sampler=dict(type="ClipSampler"),
                                          batch_size=1, num_workers=1))
    batches = list(loader)
    assert len(batches) == 40
    for index, batch in enumerate(batches):
        _check_frame(batch["inputs"][0], batch["data_samples"][0], tree, index // 20, index % 20)


def _two_ranks(rank: int, init_file: str, config: dict, tmpdir: str, out: str) -> None:
    """One of 2 processes: load its clips through mmengine and collect one result per frame on rank 0."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    register_all_modules()
    loader = Runner.build_dataloader(dict(dataset=config, sampler=dict(type="ClipSampler"),
                                          batch_sampler=dict(type="ClipBatchSampler"), batch_size=2,
                                          num_workers=0))
    results = [(sample.clip_id, sample.frame_id, sample.img_id)
               for batch in loader for sample in batch["data_samples"]]
    collected = collect_results(results, len(loader.dataset), "cpu", tmpdir=tmpdir)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"results": results, "collected": collected}, f)
    dist.destroy_process_group()


def test_two_processes_get_whole_clips_and_mmengine_collects_every_frame_once(tree, tmp_path):
    out = str(tmp_path / "out")
    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), _config(tree), str(tmp_path / "collect"), out), nprocs=2)
    ranks = []
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            ranks.append(json.load(f))
    assert [len(r["results"]) for r in ranks] == [40, 20]  # clips 0-1 and clip 2: unequal, unpadded
    assert sorted({c for c, _, _ in ranks[0]["results"]}) == [0, 1] and {c for c, _, _ in ranks[1]["results"]} == {2}
    assert ranks[1]["collected"] is None
    collected = [tuple(r) for r in ranks[0]["collected"]]
    # zip_longest joins the ranks' lists (interleaved, not in dataset order) and keeps the longer one's tail
    assert sorted(collected) == sorted(tuple(r) for rank in ranks for r in rank["results"])
    assert len(collected) == len(set(collected)) == 60
    assert re.fullmatch(r"\[\[0, 0, 1\], \[2, 0, 3\].*", json.dumps(ranks[0]["collected"]))
