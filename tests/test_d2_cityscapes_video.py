"""Cityscapes video datasets for Detectron2: clips, errors, clip-ordered sampling, evaluation.

Runs on a tiny Cityscapes tree in the real formats (tests/cityscapes_fixture.py); the end-to-end
tests feed Detectron2's own Cityscapes evaluators predictions made from the ground truth, which must
score the maximum.
"""
# Imports follow the importorskip below.
# ruff: noqa: E402
from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest

pytest.importorskip("detectron2")

import torch
from cityscapesscripts.helpers.labels import id2label
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import (CityscapesInstanceEvaluator, CityscapesSemSegEvaluator,
                                   DatasetEvaluator, inference_on_dataset)
from detectron2.structures import Instances
from PIL import Image

from blockcopy_d2.data.cityscapes_video import AnnotatedFramesEvaluator, register_cityscapes_video
from blockcopy_d2.data.sampler import (ClipBatchSampler, ClipInferenceSampler,
                                       build_clip_test_loader, clips_of)
from cityscapes_fixture import (CLIPS, HEIGHT, WIDTH, annotated_frame_files,
                                sequence_frame_path, write_cityscapes)

NAMES = [f"cityscapes_video_fine_{task}_{split}" for split in ("train", "val")
         for task in ("instance_seg", "sem_seg")]


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("datasets") / "cityscapes")
    write_cityscapes(root)
    return root


@pytest.fixture
def registered(cityscapes) -> str:
    register_cityscapes_video(cityscapes)  # tests may have pointed the names elsewhere
    return cityscapes


def _frame_number(path: str) -> int:
    return int(re.fullmatch(r".+_(\d{6})_leftImg8bit\.png", os.path.basename(path)).group(1))


def test_datasets_are_20_frame_clips_ending_at_the_annotated_frame(registered):
    root = registered
    for name in NAMES:
        split = name.rsplit("_", 1)[1]
        dicts = DatasetCatalog.get(name)
        clips = clips_of(dicts)
        assert [clip[0]["clip_id"] for clip in clips] == [f"{c}_{s}_{f:06d}" for c, s, f in CLIPS[split]]
        for clip, (city, seq, annotated) in zip(clips, CLIPS[split]):
            assert [d["frame_index"] for d in clip] == list(range(20))
            assert [d["file_name"] for d in clip] == [
                sequence_frame_path(root, split, city, seq, n) for n in range(annotated - 19, annotated + 1)]
            assert [_frame_number(d["file_name"]) for d in clip] == list(range(annotated - 19, annotated + 1))
            assert [d["annotated"] for d in clip] == [False] * 19 + [True]
            for d in clip:
                assert (d["height"], d["width"]) == (HEIGHT, WIDTH)
                assert d["image_id"] == os.path.basename(d["file_name"])
                assert os.path.isfile(d["file_name"])
            last = clip[-1]
            files = annotated_frame_files(root, split, city, seq, annotated)
            # The basename the Cityscapes evaluators key their ground truth on.
            assert os.path.basename(last["file_name"]) == os.path.basename(files["image"])
            if "instance_seg" in name:
                assert all("annotations" not in d for d in clip[:-1])
                _check_instances(last["annotations"], files["instanceIds"])
            else:
                assert all("sem_seg_file_name" not in d for d in clip[:-1])
                assert last["sem_seg_file_name"] == files["labelTrainIds"]

        metadata = MetadataCatalog.get(name)
        builtin = MetadataCatalog.get(name.replace("cityscapes_video_fine", "cityscapes_fine"))
        assert metadata.thing_classes == builtin.thing_classes
        assert metadata.stuff_classes == builtin.stuff_classes
        assert metadata.evaluator_type == builtin.evaluator_type
        assert metadata.gt_dir == os.path.join(root, "gtFine", split)
        assert metadata.image_dir == os.path.join(root, "leftImg8bit", split)
        assert metadata.sequence_dir == os.path.join(root, "leftImg8bit_sequence", split)
        assert metadata.get("ignore_label") == builtin.get("ignore_label")


def _check_instances(annotations: list[dict], instance_png: str) -> None:
    """Detectron2's annotations (parsed from the JSON polygons) agree with the instanceIds PNG."""
    import pycocotools.mask as mask_util

    thing_classes = MetadataCatalog.get("cityscapes_fine_instance_seg_val").thing_classes
    ids = np.asarray(Image.open(instance_png))
    truth = {int(i): ids == i for i in np.unique(ids) if i >= 1000}
    assert len(annotations) == len(truth)
    for anno in annotations:
        rles = mask_util.frPyObjects(anno["segmentation"], HEIGHT, WIDTH)
        mask = mask_util.decode(mask_util.merge(rles)).astype(bool)
        best = max(truth, key=lambda i: (mask & truth[i]).sum())
        iou = (mask & truth[best]).sum() / (mask | truth[best]).sum()
        assert iou > 0.9
        assert thing_classes[anno["category_id"]] == id2label[best // 1000].name
        assert not anno["iscrowd"]


def test_registration_is_lazy_idempotent_and_defaults_to_detectron2_datasets(tmp_path, monkeypatch,
                                                                            cityscapes):
    nowhere = tmp_path / "nowhere" / "cityscapes"
    assert register_cityscapes_video(nowhere) == NAMES  # reads nothing: the folder does not exist
    register_cityscapes_video(nowhere)
    with pytest.raises(FileNotFoundError, match=re.escape(str(nowhere / "leftImg8bit_sequence" / "val"))):
        DatasetCatalog.get("cityscapes_video_fine_sem_seg_val")

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2"))
    register_cityscapes_video()
    assert MetadataCatalog.get(NAMES[0]).gt_dir == str(tmp_path / "d2" / "cityscapes" / "gtFine" / "train")

    register_cityscapes_video(cityscapes)  # re-pointed: the metadata follows
    assert MetadataCatalog.get(NAMES[0]).gt_dir == os.path.join(cityscapes, "gtFine", "train")
    assert len(DatasetCatalog.get("cityscapes_video_fine_sem_seg_val")) == 40


@pytest.mark.parametrize("missing", ["sequence folder", "gtFine folder", "sequence frame", "gt file"])
def test_missing_data_raises_naming_the_path_and_layout(tmp_path, cityscapes, missing):
    root = str(tmp_path / "cityscapes")
    shutil.copytree(cityscapes, root)
    city, seq, frame = CLIPS["val"][0]
    path = {
        "sequence folder": os.path.join(root, "leftImg8bit_sequence", "val"),
        "gtFine folder": os.path.join(root, "gtFine", "val"),
        "sequence frame": sequence_frame_path(root, "val", city, seq, frame - 19),  # the clip's 1st
        "gt file": annotated_frame_files(root, "val", city, seq, frame)["instanceIds"],
    }[missing]
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    register_cityscapes_video(root)
    with pytest.raises(FileNotFoundError) as error:
        DatasetCatalog.get("cityscapes_video_fine_instance_seg_val")
    message = str(error.value)
    assert path in message
    assert "leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame:06d>_leftImg8bit.png" in message
    assert "gtFine/<split>/<city>/<city>_<seq>_<frame:06d>_gtFine_{polygons.json" in message
    if missing == "sequence frame":
        assert f"frame 0 of 20 of clip {city}_{seq}_{frame:06d}" in message


@pytest.mark.parametrize("lengths", [[20, 20], [20] * 5, [3, 1, 4, 1, 5, 9, 2]])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_gives_each_rank_whole_clips_covering_every_frame_once(lengths, world_size):
    starts = np.cumsum([0] + lengths)
    clips = [list(range(starts[c], starts[c + 1])) for c in range(len(lengths))]
    seen = []
    for rank in range(world_size):
        sampler = ClipInferenceSampler(lengths, rank=rank, world_size=world_size)
        indices = list(sampler)
        assert len(indices) == len(sampler)
        # a contiguous run of whole clips, frames in order
        assert indices == [i for c in sampler.clip_indices for i in clips[c]]
        assert abs(len(sampler.clip_indices) - len(lengths) / world_size) < 1
        seen += indices
    assert seen == list(range(sum(lengths)))


def test_sampler_shards_by_detectron2_comm(registered, monkeypatch):
    from detectron2.utils import comm

    clips = clips_of(DatasetCatalog.get("cityscapes_video_fine_sem_seg_val"))
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    got = []
    for rank in range(2):
        monkeypatch.setattr(comm, "get_rank", lambda rank=rank: rank)
        got.append(list(ClipInferenceSampler([len(c) for c in clips])))
    assert got == [list(range(20)), list(range(20, 40))]


def test_batch_sampler_runs_n_clips_as_n_streams():
    sampler = ClipInferenceSampler([4, 4, 4, 4, 4], rank=0, world_size=1)
    batches = list(ClipBatchSampler(sampler, clips_per_batch=2))
    assert batches == ([[t, 4 + t] for t in range(4)] + [[8 + t, 12 + t] for t in range(4)]
                       + [[16 + t] for t in range(4)])
    assert len(ClipBatchSampler(sampler, clips_per_batch=2)) == 12
    assert list(ClipBatchSampler(sampler)) == [[i] for i in range(20)]

    uneven = ClipInferenceSampler([4, 3, 3], rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"clips \[0, 1\].*\[4, 3\] frames"):
        ClipBatchSampler(uneven, clips_per_batch=2)
    assert len(list(ClipBatchSampler(uneven, clips_per_batch=1))) == 10  # one stream: any lengths


def test_clips_of_rejects_frames_out_of_order():
    frames = [{"clip_id": c, "frame_index": i} for c in "ab" for i in range(3)]
    assert [[d["frame_index"] for d in clip] for clip in clips_of(frames)] == [[0, 1, 2]] * 2
    with pytest.raises(ValueError, match="frame_index 2, expected 1"):
        clips_of([frames[0], frames[2], frames[1]])
    with pytest.raises(ValueError, match="not contiguous"):
        clips_of(frames[:3] + frames[3:] + frames[:3])
    with pytest.raises(KeyError, match="not a video dataset"):
        clips_of([{"file_name": "x.png"}])


def _cfg():
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = HEIGHT, WIDTH  # keep the frames' size
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def test_loader_delivers_frame_t_of_n_clips_per_batch(registered):
    loader = build_clip_test_loader(_cfg(), "cityscapes_video_fine_sem_seg_val", clips_per_batch=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 20
    for t, batch in enumerate(batches):
        assert [d["clip_id"] for d in batch] == [f"{c}_{s}_{f:06d}" for c, s, f in CLIPS["val"]]
        assert [d["frame_index"] for d in batch] == [t, t]
        assert [d["annotated"] for d in batch] == [t == 19] * 2
        for d, (_, _, annotated) in zip(batch, CLIPS["val"]):
            assert d["image"].shape == (3, HEIGHT, WIDTH)
            assert int(d["image"][0, 0, 0]) == (annotated - 19 + t) % 256  # the fixture's frame stamp


class _Recorder(DatasetEvaluator):
    def reset(self):
        self.calls = []

    def process(self, inputs, outputs):
        self.calls.append(([i["frame_index"] for i in inputs], list(outputs)))

    def evaluate(self):
        return {"calls": len(self.calls)}


def test_annotated_frames_evaluator_passes_only_annotated_frames():
    evaluator = AnnotatedFramesEvaluator(_Recorder())
    evaluator.reset()
    frames = [{"frame_index": i, "annotated": i == 2} for i in range(3)]
    for frame in frames:
        evaluator.process([frame, frame], [f"out{frame['frame_index']}"] * 2)
    assert evaluator.evaluator.calls == [([2, 2], ["out2", "out2"])]
    assert evaluator.evaluate() == {"calls": 1}
    with pytest.raises(KeyError, match="annotated"):
        evaluator.process([{"file_name": "x.png"}], [None])


class _GroundTruthModel(torch.nn.Module):
    """Predicts, for annotated frames, exactly the ground truth read from the gtFine PNGs."""

    def __init__(self, root: str, split: str, task: str):
        super().__init__()
        self.gt_dir, self.task = os.path.join(root, "gtFine", split), task
        self.thing_classes = MetadataCatalog.get(f"cityscapes_video_fine_instance_seg_{split}").thing_classes
        self.frames = 0

    def _gt(self, d: dict, kind: str) -> np.ndarray:
        city = d["clip_id"].rsplit("_", 2)[0]
        return np.asarray(Image.open(os.path.join(self.gt_dir, city, f"{d['clip_id']}_gtFine_{kind}.png")))

    def forward(self, inputs: list[dict]) -> list[dict]:
        self.frames += len(inputs)
        outputs = []
        for d in inputs:
            size = (d["height"], d["width"])
            if self.task == "instance_seg":
                instances = Instances(size)
                ids = self._gt(d, "instanceIds") if d["annotated"] else np.zeros(size, np.uint16)
                things = [i for i in np.unique(ids) if i >= 1000]
                instances.pred_masks = torch.from_numpy(np.stack([ids == i for i in things])
                                                        if things else np.zeros((0, *size), bool))
                classes = [self.thing_classes.index(id2label[int(i) // 1000].name) for i in things]
                instances.pred_classes = torch.tensor(classes, dtype=torch.long)
                instances.scores = torch.ones(len(things))
                outputs.append({"instances": instances})
            else:
                train_ids = torch.from_numpy(self._gt(d, "labelTrainIds").astype(np.int64)) \
                    if d["annotated"] else torch.full(size, 255)
                scores = torch.zeros(19, *size)
                valid = train_ids < 19
                scores[train_ids[valid], valid.nonzero()[:, 0], valid.nonzero()[:, 1]] = 1
                outputs.append({"sem_seg": scores})
        return outputs


def test_cityscapes_instance_evaluator_scores_ground_truth_at_ap_100(registered, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # cityscapesscripts writes matches.json into the working directory
    name = "cityscapes_video_fine_instance_seg_val"
    model = _GroundTruthModel(registered, "val", "instance_seg")
    loader = build_clip_test_loader(_cfg(), name, clips_per_batch=2)
    evaluator = AnnotatedFramesEvaluator(CityscapesInstanceEvaluator(name))
    results = inference_on_dataset(model, loader, evaluator)
    assert model.frames == 40
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP50"] == pytest.approx(100.0)


def test_cityscapes_sem_seg_evaluator_scores_ground_truth_at_miou_100(registered):
    name = "cityscapes_video_fine_sem_seg_val"
    model = _GroundTruthModel(registered, "val", "sem_seg")
    loader = build_clip_test_loader(_cfg(), name, clips_per_batch=1)
    evaluator = AnnotatedFramesEvaluator(CityscapesSemSegEvaluator(name))
    results = inference_on_dataset(model, loader, evaluator)
    assert model.frames == 40
    assert results["sem_seg"]["IoU"] == pytest.approx(100.0)
    assert results["sem_seg"]["iIoU"] == pytest.approx(100.0)
