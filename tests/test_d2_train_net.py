"""tools/train_net.py --eval-only end to end on a tiny Cityscapes tree written in the real on-disk layout
(random weights, ResNet-18 trunks, CPU): BlockCopy Mask R-CNN and semantic FPN, and the dense twin."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2")
from detectron2.engine import default_argument_parser  # noqa: E402

from blockcopy_core.paths import REPO_ROOT  # noqa: E402
from blockcopy_d2.data import register_cityscapes_video  # noqa: E402
from cityscapes_fixture import write_cityscapes  # noqa: E402

CONFIGS = REPO_ROOT / "configs" / "Cityscapes"
SMALL = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
         "MODEL.FPN.OUT_CHANNELS", "64", "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "512",
         "TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.WEIGHTS", "", "MODEL.BLOCKCOPY.WARMUP_CLIPS", "3",
         "DATALOADER.NUM_WORKERS", "0"]


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets") / "cityscapes"
    write_cityscapes(root)
    register_cityscapes_video(root)
    yield root
    register_cityscapes_video()  # back to $DETECTRON2_DATASETS


def train_net(config: str, output, monkeypatch, *opts) -> dict:
    spec = importlib.util.spec_from_file_location("_train_net", REPO_ROOT / "tools" / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(output)  # cityscapesscripts writes matches.json into the working directory
    threads = torch.get_num_threads()
    try:
        module.main(default_argument_parser().parse_args(
            ["--config-file", str(CONFIGS / config), "--eval-only", *SMALL, "OUTPUT_DIR", str(output), *opts]))
    finally:
        torch.set_num_threads(threads)
    return json.loads((output / "results.json").read_text())


def test_mask_rcnn_blockcopy_end_to_end(cityscapes, tmp_path, monkeypatch):
    results = train_net("mask_rcnn_R_50_FPN_blockcopy_tau0.3.yaml", tmp_path, monkeypatch)
    run = results["datasets"]["cityscapes_video_fine_instance_seg_val"]
    assert set(run["metrics"]) >= {"segm", "bbox"} and "AP" in run["metrics"]["bbox"]
    stats, others = run["statistics"], run["unannotated_statistics"]
    assert stats["frames"] == 2 and others["frames"] == 2 * 19, "2 clips of 20 frames, the last scored"
    assert 0.0 < stats["policy_executed_fraction"] < 1.0 and stats["gmacs_per_frame"] > 0
    assert results["warmup"]["clips"] == 3 and results["warmup"]["frames"] == 3 * 20
    assert (tmp_path / "policy.pt").stat().st_size > 0 and results["blockcopy"]["TARGET"] == 0.3


def test_semantic_fpn_blockcopy_end_to_end(cityscapes, tmp_path, monkeypatch):
    results = train_net("semantic_R_50_FPN_blockcopy_tau0.3.yaml", tmp_path, monkeypatch)
    run = results["datasets"]["cityscapes_video_fine_sem_seg_val"]
    assert "IoU" in run["metrics"]["sem_seg"]  # the official script's mean IoU
    assert run["statistics"]["frames"] == 2 and 0.0 < run["statistics"]["policy_executed_fraction"] < 1.0


def test_dense_twin_end_to_end(cityscapes, tmp_path, monkeypatch):
    results = train_net("mask_rcnn_R_50_FPN_dense.yaml", tmp_path, monkeypatch)
    run = results["datasets"]["cityscapes_video_fine_instance_seg_val"]
    assert "AP" in run["metrics"]["segm"] and results["blockcopy"] is None and results["warmup"]["clips"] == 0


def run_processes(processes: int, root, output) -> dict:
    """train_net.py in its own process(es) through Detectron2's launch (gloo on the CPU)."""
    command = [sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--num-gpus", str(processes),
               "--eval-only", "--config-file", str(CONFIGS / "faster_rcnn_R_50_FPN_blockcopy_tau0.3.yaml"), *SMALL,
               "MODEL.WEIGHTS", "", "MODEL.BLOCKCOPY.INDEPENDENT_CLIPS", "True", "OUTPUT_DIR", str(output)]
    env = {**os.environ, "DETECTRON2_DATASETS": str(root.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=output, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((output / "results.json").read_text())


def test_two_processes_give_the_results_of_one(cityscapes, tmp_path):
    """Whole clips per process; with independent clips each clip's result is the same wherever it runs."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    single, double = run_processes(1, cityscapes, one), run_processes(2, cityscapes, two)
    name = "cityscapes_video_fine_instance_seg_val"
    assert "on rank 1" in (two / "log.txt").read_text() + (two / "log.txt.rank1").read_text()
    assert double["datasets"][name]["metrics"] == single["datasets"][name]["metrics"]
    for key in ("frames", "executed_fraction", "policy_selected_fraction", "gmacs_per_frame"):
        assert double["datasets"][name]["statistics"][key] == single["datasets"][name]["statistics"][key], key
