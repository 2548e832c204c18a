"""tools/test.py end to end on a synthetic CityPersons tree in the real on-disk formats (CPU, random weights,
CSP at a quarter of its width): dense and BlockCopy configs, the official miss rates, BlockCopy's results and
policy files, equality of the `all` policy with dense, 2 processes equal to 1, checkpoints that do not fit."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet")

from citypersons_fixture import write_citypersons  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# tools/test.py by path: "test" is also the name of Python's own regression-test package
_spec = importlib.util.spec_from_file_location("mmdet_test_tool", ROOT / "tools" / "test.py")
test_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_tool)

from blockcopy_mmdet.checkpoint import CheckpointMismatchError  # noqa: E402

DENSE = str(ROOT / "configs/CityPersons/csp_r50_dense.py")
BLOCKCOPY = str(ROOT / "configs/CityPersons/csp_r50_blockcopy_tau0.3.py")
# The real layer structure at a quarter of the width; every box kept, so that runs have detections to compare.
REDUCED = {"backbone.base_channels": 16, "neck.in_channels": [128, 256, 512], "neck.out_channels": 32,
           "bbox_head.in_channels": 96, "bbox_head.feat_channels": 32, "bbox_head.norm_cfg.num_groups": 8,
           "test_cfg.score_thr": 0.0}
CLIP_LENGTH = 4
MR_KEYS = {f"citypersons/MR_{setup}" for setup in ("Reasonable", "Reasonable_small", "Heavy", "All", "Bare", "Partial")}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_citypersons(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    register_all_modules()
    cfg = Config.fromfile(DENSE)
    cfg.merge_from_dict({f"model.{key}": value for key, value in REDUCED.items()})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "csp_random.pth"
    torch.save({"state_dict": MODELS.build(cfg.model).state_dict()}, path)
    return str(path)


def _options(tree, work_dir: Path, blockcopy: bool, **extra) -> list[str]:
    model = "model.detector." if blockcopy else "model."
    data_root = tree.cityscapes.removesuffix("cityscapes")
    options = {f"{model}{key}": value for key, value in REDUCED.items()}
    options.update({"test_dataloader.dataset.data_root": data_root, "test_dataloader.num_workers": 0,
                    "test_evaluator.ann_file": tree.ann_files["val"],
                    "test_evaluator.outfile_prefix": f"{work_dir}/dets"})
    if blockcopy:
        options.update({"model.blockcopy.block_size": 64, "test_dataloader.dataset.clip_length": CLIP_LENGTH,
                        "custom_hooks.0.warmup_dataset.data_root": data_root,
                        "custom_hooks.0.warmup_dataset.clip_length": CLIP_LENGTH, "custom_hooks.0.warmup_clips": 3})
    options.update(extra)
    return [f"{key}={json.dumps(value) if isinstance(value, list) else value}".replace(" ", "")
            for key, value in options.items()]


def _run(config: str, checkpoint: str, tree, work_dir: Path, blockcopy: bool, **extra) -> dict:
    return test_tool.main([config, checkpoint, "--work-dir", str(work_dir), "--cfg-options",
                           *_options(tree, work_dir, blockcopy, **extra)])


def _detections(work_dir: Path) -> list[tuple]:
    with open(work_dir / "dets.bbox.json") as f:
        return sorted((d["image_id"], *(round(v, 3) for v in d["bbox"]), round(d["score"], 4)) for d in json.load(f))


@pytest.fixture(scope="module")
def dense_run(tree, checkpoint, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("dense")
    return work_dir, _run(DENSE, checkpoint, tree, work_dir, blockcopy=False)


def test_dense_config_gives_the_citypersons_miss_rates(dense_run, tree):
    work_dir, metrics = dense_run
    assert MR_KEYS <= set(metrics)
    # The fixture's boxes are 100 px high and fully visible, or 60 px and half occluded: no box falls in
    # Reasonable_small or Partial (NaN: nothing to miss); random weights miss every other one.
    scored = {key: value for key, value in metrics.items() if key in MR_KEYS and value == value}
    assert set(scored) == MR_KEYS - {"citypersons/MR_Reasonable_small", "citypersons/MR_Partial"}
    assert all(0.0 < value <= 1.0 for value in scored.values())
    detections = _detections(work_dir)
    assert {d[0] for d in detections} == set(tree.image_ids["val"]) and len(detections) == 100 * 3


def test_blockcopy_all_policy_equals_dense(dense_run, tree, checkpoint, tmp_path, one_thread):
    metrics = _run(BLOCKCOPY, checkpoint, tree, tmp_path, blockcopy=True, **{"model.blockcopy.policy": "all"})
    assert _detections(tmp_path) == _detections(dense_run[0])
    assert {key: metrics[key] for key in MR_KEYS} == pytest.approx({key: dense_run[1][key] for key in MR_KEYS},
                                                                   nan_ok=True)


def test_blockcopy_run_warms_up_learns_and_writes_its_results(tree, checkpoint, tmp_path, one_thread):
    metrics = _run(BLOCKCOPY, checkpoint, tree, tmp_path, blockcopy=True)
    assert MR_KEYS <= set(metrics)
    results = json.loads(next(tmp_path.glob("*/blockcopy_results.json")).read_text())
    stats = results["statistics"]
    assert stats["frames"] == 3, "the three scored frames (one per clip, batch size 1)"
    assert results["unannotated_statistics"]["frames"] == 3 * (CLIP_LENGTH - 1)
    assert results["blockcopy"]["target"] == 0.3 and results["blockcopy"]["block_size"] == 64
    assert 0.0 < stats["executed_fraction"] < 1.0 and stats["gmacs_per_frame"] > 0
    assert set(stats["ms_per_frame"]) >= {"policy", "network", "information_gain", "update", "total"}
    assert results["metrics"]["citypersons/MR_All"] == pytest.approx(metrics["citypersons/MR_All"])
    policy = torch.load(tmp_path / "policy.pt", weights_only=True)
    fresh = MODELS.build(Config.fromfile(BLOCKCOPY).model)  # the same policy architecture, untrained
    trained = {key: value for key, value in policy.items() if key.startswith("policy.net.")}
    assert trained and any(not torch.equal(value, fresh.blockcopy.state_dict()[key]) for key, value in trained.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_detections_and_miss_rates_as_one(tree, checkpoint, tmp_path, one_thread):
    """Bit-equal results for the same threads per process: torch.distributed.run gives each process one
    thread, so the single process runs on one too (with two, CPU reductions split differently and scores
    move by ~1e-7, which can flip the 4th decimal compared here)."""
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"  # two GPUs, or CPU processes
    independent = {"model.independent_clips": True, "env_cfg.dist_cfg.backend": backend}
    one = _run(BLOCKCOPY, checkpoint, tree, tmp_path / "one", blockcopy=True, **independent)
    two_dir = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(ROOT / "tools/test.py"), BLOCKCOPY, checkpoint, "--launcher", "pytorch",
               "--work-dir", str(two_dir), "--cfg-options", *_options(tree, two_dir, blockcopy=True, **independent)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert _detections(two_dir) == _detections(tmp_path / "one")
    two = json.loads(next(two_dir.glob("*/blockcopy_results.json")).read_text())
    # the JSON file writes NaN as null
    written = {key: float("nan") if two["metrics"][key] is None else two["metrics"][key] for key in MR_KEYS}
    assert written == pytest.approx({key: one[key] for key in MR_KEYS}, nan_ok=True)
    assert two["statistics"]["frames"] == 3  # summed over both processes


def test_checkpoint_of_another_architecture_is_refused(tree, tmp_path):
    register_all_modules()
    mgan = MODELS.build(Config.fromfile(str(ROOT / "configs/_base_/models/mgan_vgg16.py")).model)
    path = tmp_path / "mgan.pth"
    torch.save({"state_dict": mgan.state_dict()}, path)
    with pytest.raises(CheckpointMismatchError, match=r"does not fit the model CSP(.|\n)*missing: backbone.conv1"):
        _run(DENSE, str(path), tree, tmp_path, blockcopy=False)


def test_unconverted_pedestron_checkpoint_is_named(tree, checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    renames = [(r"neck\.deconvs\.(\d)", lambda m: f"neck.p{3 + int(m[1])}"),
               (r"neck\.l2_norms\.(\d)", lambda m: f"neck.p{3 + int(m[1])}_l2"),
               (r"bbox_head\.center_", lambda m: "bbox_head.cls_"),
               (r"bbox_head\.scale_convs", lambda m: "bbox_head.reg_convs"),
               (r"bbox_head\.(center|scale|offset)_predictor",
                lambda m: {"center": "bbox_head.csp_cls", "scale": "bbox_head.csp_reg",
                           "offset": "bbox_head.csp_offset"}[m[1]])]
    pedestron = {}
    for key, value in state.items():  # Pedestron's names (see blockcopy_mmdet/models/csp_convert.py)
        for pattern, replace in renames:
            key = re.sub(pattern, replace, key)
        pedestron[key] = value
    path = tmp_path / "csp_pedestron.pth.stu"
    torch.save({"state_dict": pedestron}, path)
    with pytest.raises(CheckpointMismatchError, match="Pedestron .*CSP checkpoint: convert it first"):
        _run(DENSE, str(path), tree, tmp_path, blockcopy=False)


def test_missing_checkpoint_file_is_named(tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth does not exist"):
        _run(DENSE, str(tmp_path / "nothing.pth"), tree, tmp_path, blockcopy=False)


def test_hook_writes_a_video_of_the_policys_decisions(tree, checkpoint, tmp_path, one_thread):
    import cv2

    _run(BLOCKCOPY, checkpoint, tree, tmp_path, blockcopy=True, **{"custom_hooks.0.video_clips": 2,
                                                                    "custom_hooks.0.warmup_clips": 0})
    videos = sorted((tmp_path / "videos").glob("clip_*.mp4"))
    assert [v.name for v in videos] == ["clip_0.mp4", "clip_1.mp4"]
    capture = cv2.VideoCapture(str(videos[0]))
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, image = capture.read()
    capture.release()
    assert ok and frames == CLIP_LENGTH
    assert image.shape == (256, 512, 3)  # a 2x2 mosaic of half-size 256x512 frames


def test_clips_run_as_streams_of_one_batch(dense_run, tree, checkpoint, tmp_path, one_thread):
    """batch_size=2 with ClipBatchSampler: frame t of two clips per time step (the third clip alone); with the
    `all` policy the detections are still the dense ones, and the learned policy runs on 2 streams."""
    streams = {"test_dataloader.batch_size": 2, "test_dataloader.batch_sampler.type": "ClipBatchSampler"}
    _run(BLOCKCOPY, checkpoint, tree, tmp_path / "all", blockcopy=True, **streams, **{"model.blockcopy.policy": "all"})
    assert _detections(tmp_path / "all") == _detections(dense_run[0])
    _run(BLOCKCOPY, checkpoint, tree, tmp_path / "rl", blockcopy=True, **streams)
    stats = json.loads(next((tmp_path / "rl").glob("*/blockcopy_results.json")).read_text())["statistics"]
    assert stats["frames"] == 2, "two scored time steps: clips 0 and 1 together, then clip 2"
    assert stats["full_frames"] == 0 and 0.0 < stats["executed_fraction"] < 1.0
