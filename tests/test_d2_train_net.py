"""tools/train_net.py --eval-only end to end on a tiny Cityscapes tree written in the real on-disk layout
(random weights, ResNet-18 trunks, CPU): BlockCopy Mask R-CNN and semantic FPN, and the dense twin."""
import importlib.util
import json

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
         "TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.WEIGHTS", "", "MODEL.BLOCKCOPY.WARMUP_CLIPS", "3", "DATALOADER.NUM_WORKERS", "0"]


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
