"""The Detectron2 path on real data: CenterNet-MobileNetV3 meta-architectures, PETS09-S2L1 datasets and
evaluator, and tools/train_net.py, against the main job (tools/run_video.py).

CPU, one thread; skipped without detectron2 or without the shared PETS09 files and CenterNet model.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import blockcopy_d2.data  # noqa: E402,F401
from blockcopy_core.data import VideoReader  # noqa: E402
from blockcopy_core.models.centernet import PERSON_CLASS, decode_detections, load_centernet  # noqa: E402
from blockcopy_d2.centernet import add_centernet_config, centernet_model_dir  # noqa: E402
from blockcopy_d2.config import add_blockcopy_config  # noqa: E402
from blockcopy_d2.data import (PETS09_EVAL, PETS09_WARMUP, VideoFrameMapper, add_pets09_config,  # noqa: E402
                               load_pets09_s2l1, pets09_s2l1_files, register_pets09_s2l1)
from blockcopy_d2.data.sampler import clips_of  # noqa: E402
from blockcopy_d2.engine import load_weights  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "PETS09"
DENSE, TAU03 = CONFIGS / "centernet_mnv3_dense.yaml", CONFIGS / "centernet_mnv3_blockcopy_tau0.3.yaml"
FRAMES, WARMUP = 12, 4  # warm-up: one clip of 4 frames, 3 epochs = 3 clips; frames 5..12 scored


def _files_present() -> bool:
    try:
        pets09_s2l1_files()
        centernet_model_dir(_cfg(DENSE))
    except FileNotFoundError:
        return False
    return True


def _cfg(config_file: Path, *opts) -> "CfgNode":  # noqa: F821
    cfg = get_cfg()
    add_blockcopy_config(cfg)
    add_centernet_config(cfg)
    add_pets09_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


pytestmark = pytest.mark.skipif(not _files_present(), reason="needs the shared PETS09-S2L1 files and CenterNet model")


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """train_net --eval-only (dense and tau 0.3) and the main job, both on frames 1..12, warm-up 1..4."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("d2_pets09")
    train_net = _load_tool("train_net")
    runs = {}
    try:
        for label, config in (("dense", DENSE), ("rl", TAU03)):
            args = default_argument_parser().parse_args([
                "--config-file", str(config), "--eval-only", "MODEL.DEVICE", "cpu",
                "DATASETS.PETS09.FRAMES", str(FRAMES), "DATASETS.PETS09.WARMUP_FRAMES", str(WARMUP),
                "MODEL.BLOCKCOPY.WARMUP_CLIPS", "3", "OUTPUT_DIR", str(out / label)])
            train_net.main(args)
            runs[label] = out / label
        main_job = _load_tool("run_video").main([
            "--frames", str(FRAMES), "--warmup", str(WARMUP), "--taus", "0.3", "--methods", "rl", "--threads", "1",
            "--no-video", "--device", "cpu", "--output-dir", str(out / "main_job")])
    finally:
        torch.set_num_threads(threads)
        register_pets09_s2l1()  # back to the default settings for the other tests
    return runs, {row["method"]: row for row in main_job["runs"]}


def test_train_net_eval_only_writes_results_with_statistics(short_runs):
    runs, _ = short_runs
    for label in ("dense", "rl"):
        results = json.loads((runs[label] / "results.json").read_text())
        evaluation = results["datasets"][PETS09_EVAL]
        assert evaluation["metrics"]["pedestrian"]["frames"] == FRAMES - WARMUP
        stats = evaluation["statistics"]
        assert stats["frames"] == FRAMES - WARMUP and evaluation["unannotated_statistics"]["frames"] == WARMUP
        assert set(stats["ms_per_frame"]) >= {"policy", "network", "postprocess", "information_gain", "update",
                                              "total"}
        assert stats["gmacs_per_frame"] == pytest.approx(stats["network_gmacs_per_frame"]
                                                         + stats["policy_gmacs_per_frame"])
    dense = json.loads((runs["dense"] / "results.json").read_text())
    rl = json.loads((runs["rl"] / "results.json").read_text())
    assert dense["blockcopy"] is None and dense["policy_weights"] is None and dense["warmup"]["clips"] == 0
    assert dense["datasets"][PETS09_EVAL]["statistics"]["executed_fraction"] == 1.0
    assert rl["blockcopy"]["TARGET"] == 0.3
    assert (rl["warmup"]["clips"], rl["warmup"]["frames"]) == (3, 3 * WARMUP)
    assert 0.0 < rl["datasets"][PETS09_EVAL]["statistics"]["executed_fraction"] < 1.0
    assert rl["datasets"][PETS09_EVAL]["statistics"]["policy_gmacs_per_frame"] > 0
    assert rl["policy_weights"] == "policy.pt", "named relative to results.json: no machine paths"
    policy = runs["rl"] / "policy.pt"
    assert any(key.startswith("policy.net.") for key in torch.load(policy, weights_only=False))


def test_short_run_equals_the_main_job(short_runs):
    runs, main_job = short_runs
    for label in ("dense", "rl"):
        evaluation = json.loads((runs[label] / "results.json").read_text())["datasets"][PETS09_EVAL]
        expected = main_job[label]
        assert evaluation["metrics"]["pedestrian"]["MR"] == 100.0 * expected["miss_rate"]
        assert evaluation["metrics"]["pedestrian"]["AP50"] == 100.0 * expected["ap50"]
        stats = evaluation["statistics"]
        assert stats["frames"] == expected["eval_frames"]
        assert stats["executed_fraction"] == expected["executed_fraction"]
        assert stats["gmacs_per_frame"] == expected["gmacs_per_frame"]
        if label == "rl":
            assert stats["policy_selected_fraction"] == expected["selected_fraction"]


def test_model_weights_and_policy_weights_load(short_runs, tmp_path):
    runs, _ = short_runs
    state = load_centernet().state_dict()
    state["head.cls_output.pointwise.bias"] = torch.full_like(state["head.cls_output.pointwise.bias"], -3.0)
    torch.save(state, tmp_path / "centernet.pth")  # a task-model checkpoint for DetectionCheckpointer
    cfg = _cfg(TAU03, "MODEL.WEIGHTS", str(tmp_path / "centernet.pth"),
               "MODEL.BLOCKCOPY.POLICY_WEIGHTS", str(runs["rl"] / "policy.pt"))
    model = build_model(cfg)
    load_weights(cfg, model)
    assert (model.centernet.head.cls_output.pointwise.bias == -3.0).all()
    saved = torch.load(runs["rl"] / "policy.pt", weights_only=False)
    for key, value in model.blockcopy.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, saved[key]), key
    dense = _cfg(DENSE, "MODEL.BLOCKCOPY.POLICY_WEIGHTS", str(runs["rl"] / "policy.pt"))
    with pytest.raises(ValueError, match="no block policy"):
        load_weights(dense, build_model(dense))


@pytest.fixture(scope="module")
def dense_model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = _cfg(DENSE, "MODEL.CENTERNET.DECODE_CLASSES", "[]")
    model = build_model(cfg).eval()
    frame = next(iter(VideoReader(pets09_s2l1_files()[0], stop=1, as_tensor=True)))  # (3, 576, 768) RGB
    yield cfg, model, frame
    torch.set_num_threads(threads)


def test_plain_meta_arch_equals_load_centernet_and_decode(dense_model):
    _, model, frame = dense_model
    with torch.no_grad():
        output = model([{"image": frame.flip(0)}])[0]["instances"]  # BGR, Detectron2's default
        expected = decode_detections(load_centernet()(frame[None].float()), input_size=(576, 768))[0]
    assert output.image_size == (576, 768)
    assert torch.equal(output.pred_boxes.tensor, expected["boxes"])
    assert torch.equal(output.scores, expected["scores"])
    assert torch.equal(output.pred_classes, expected["labels"])
    assert (output.pred_classes == PERSON_CLASS).any()


def test_bgr_and_rgb_inputs_and_output_size(dense_model):
    cfg, model, frame = dense_model
    record = load_pets09_s2l1(PETS09_EVAL, frames=2, warmup_frames=1)[0]
    bgr = VideoFrameMapper(cfg)(record)
    assert "annotations" not in bgr and bgr["clip_id"] == f"{PETS09_EVAL}/0" and bgr["annotated"] is False
    assert torch.equal(bgr["image"], frame.flip(0))
    rgb_cfg = cfg.clone()
    rgb_cfg.INPUT.FORMAT = "RGB"
    assert torch.equal(VideoFrameMapper(rgb_cfg)(record)["image"], frame)
    rgb_model = build_model(rgb_cfg).eval()
    with torch.no_grad():
        from_bgr = model([bgr])[0]["instances"]
        from_rgb = rgb_model([{"image": frame}])[0]["instances"]
        swapped = model([{"image": frame}])[0]["instances"]  # RGB fed as BGR: a different picture
        doubled = model([{"image": frame.flip(0), "height": 1152, "width": 1536}])[0]["instances"]
    assert torch.equal(from_bgr.pred_boxes.tensor, from_rgb.pred_boxes.tensor)
    assert torch.equal(from_bgr.scores, from_rgb.scores)
    assert not torch.equal(from_bgr.scores, swapped.scores)
    assert doubled.image_size == (1152, 1536)
    assert torch.allclose(doubled.pred_boxes.tensor, 2 * from_bgr.pred_boxes.tensor)


def test_blockcopy_meta_arch_starts_a_clip_when_clip_ids_change():
    cfg = _cfg(TAU03)
    model = build_model(cfg).eval()
    frames = torch.randint(0, 256, (3, 3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        for clip, frame in zip(("a", "a", "b"), frames):
            model([{"image": frame, "clip_id": clip, "annotated": True}])
        model([{"image": frames[0]}])  # no clip id: an image of its own
    assert model.annotated_statistics.frames == 4 and model.annotated_statistics.full_frames == 3
    with pytest.raises(NotImplementedError, match="not supported"):
        model.train()([{"image": frames[0]}])


def test_pets09_datasets_follow_the_main_job_protocol():
    register_pets09_s2l1()
    warmup, evaluation = DatasetCatalog.get(PETS09_WARMUP), DatasetCatalog.get(PETS09_EVAL)
    warmup_clips = clips_of(warmup)
    assert [len(clip) for clip in warmup_clips] == [20] * 15
    assert [r["image_id"] for r in warmup_clips[1]] == list(range(21, 41))
    assert [r["frame_index"] for r in warmup_clips[1]] == list(range(20))
    assert not any(r["annotated"] for r in warmup)
    assert len(clips_of(evaluation)) == 1 and len(evaluation) == 795
    assert [r["image_id"] for r in evaluation if r["annotated"]] == list(range(301, 796))
    annotations = [a for r in evaluation for a in r["annotations"]]
    assert sum(not a["iscrowd"] for a in annotations) == 4476 and len(annotations) == 4650
    short = load_pets09_s2l1(PETS09_WARMUP, frames=100, warmup_frames=50, clip_length=20)
    assert [len(clip) for clip in clips_of(short)] == [20, 20, 10]
    with pytest.raises(ValueError, match="not contiguous"):
        clips_of([{"clip_id": "a", "frame_index": 0}, {"clip_id": "b", "frame_index": 0},
                  {"clip_id": "a", "frame_index": 0}])


def test_missing_files_raise_clear_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_model(_cfg(DENSE, "MODEL.CENTERNET.MODEL_DIR", str(missing)))
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing / "vtest.avi"))):
        load_pets09_s2l1(PETS09_EVAL, video=missing / "vtest.avi")
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing / "gt.txt"))):
        load_pets09_s2l1(PETS09_EVAL, ground_truth=missing / "gt.txt")
    train_net = _load_tool("train_net")
    with pytest.raises(SystemExit, match="training the task model is not supported"):
        train_net.main(default_argument_parser().parse_args(["--config-file", str(DENSE)]))
