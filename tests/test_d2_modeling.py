"""The Detectron2 plugin's models: BlockCopy R-CNN, RetinaNet and semantic FPN from model-zoo configs
(random weights, ResNet-18 trunks, small frames, CPU)."""
import pytest
import torch

pytest.importorskip("detectron2")
from detectron2 import model_zoo  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import blockcopy_core as bc  # noqa: E402
from blockcopy_core.paths import REPO_ROOT  # noqa: E402
from blockcopy_d2 import add_blockcopy_config  # noqa: E402
from blockcopy_d2.config import merge_config_file  # noqa: E402
from blockcopy_d2.engine import load_weights, save_policy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
HEIGHT, WIDTH, BLOCK = 256, 512, 128  # RetinaNet's P7 has stride 128
BASES = {
    "mask_rcnn": ("Cityscapes/mask_rcnn_R_50_FPN.yaml", "BlockCopyGeneralizedRCNN"),
    "faster_rcnn": ("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", "BlockCopyGeneralizedRCNN"),
    "retinanet": ("COCO-Detection/retinanet_R_50_FPN_1x.yaml", "BlockCopyRetinaNet"),
    "semantic": ("Misc/semantic_R_50_FPN_1x.yaml", "BlockCopySemanticSegmentor"),
}


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


def config(kind: str, blockcopy: bool, device: str = "cpu", **keys):
    """A model-zoo config made small (ResNet-18, 64 FPN channels, few detections); with ``blockcopy``
    switched to BlockCopy by names and MODEL.BLOCKCOPY keys only, as a user's YAML does."""
    cfg = get_cfg()
    add_blockcopy_config(cfg)
    base, meta_arch = BASES[kind]
    cfg.merge_from_file(model_zoo.get_config_file(base))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = 10
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    if blockcopy:
        cfg.MODEL.META_ARCHITECTURE = meta_arch
        cfg.MODEL.BLOCKCOPY.BACKBONE = cfg.MODEL.BACKBONE.NAME
        cfg.MODEL.BACKBONE.NAME = "build_blockcopy_backbone"
        if kind.endswith("rcnn"):
            cfg.MODEL.PROPOSAL_GENERATOR.NAME = "BlockCopyRPN"
        cfg.MODEL.BLOCKCOPY.BLOCK_SIZE = BLOCK
        for key, value in keys.items():
            cfg.MODEL.BLOCKCOPY[key] = value
    return cfg


def models(kind: str, device: str = "cpu", **keys):
    """The plain model and its BlockCopy twin holding the same (random) weights, in eval mode."""
    torch.manual_seed(0)
    plain = build_model(config(kind, False, device)).eval()
    blockcopy = build_model(config(kind, True, device, **keys))
    blockcopy.load_state_dict(plain.state_dict(), strict=True)
    return plain, blockcopy


def clip(frames: int, clip_id: str = "clip", static: bool = False, streams: int = 1) -> list[list[dict]]:
    """Batches of input dicts: (3, H, W) uint8 BGR images of a textured scene with a moving square."""
    gen = torch.Generator().manual_seed(0)
    scene = torch.randint(0, 256, (streams, 3, HEIGHT, WIDTH), generator=gen, dtype=torch.uint8)
    batches = []
    for t in range(frames):
        image = scene.clone()
        if not static:
            image[:, :, 60:140, 40 + 50 * t:120 + 50 * t] = 255
        batches.append([{"image": image[s], "height": HEIGHT, "width": WIDTH, "clip_id": f"{clip_id}{s}",
                         "frame_index": t} for s in range(streams)])
    return batches


def assert_same_outputs(actual: list[dict], expected: list[dict], tol: float) -> None:
    for a, e in zip(actual, expected):
        if "sem_seg" in e:
            torch.testing.assert_close(a["sem_seg"], e["sem_seg"], rtol=tol, atol=tol)
            continue
        a, e = a["instances"], e["instances"]
        assert len(a) == len(e)
        torch.testing.assert_close(a.pred_boxes.tensor, e.pred_boxes.tensor, rtol=tol, atol=tol)
        torch.testing.assert_close(a.scores, e.scores, rtol=tol, atol=tol)
        assert torch.equal(a.pred_classes, e.pred_classes)
        if e.has("pred_masks"):
            assert (a.pred_masks != e.pred_masks).float().mean() <= tol


@pytest.mark.parametrize("kind", list(BASES))
def test_all_policy_equals_the_plain_model_frame_after_frame(kind):
    plain, blockcopy = models(kind, POLICY="all")
    with torch.no_grad():
        for batch in clip(3):
            assert_same_outputs(blockcopy(batch), plain(batch), tol=0.0)
    stats = blockcopy.blockcopy.statistics
    assert stats.frames == 3 and stats.executed_fraction == 1.0


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("kind", ["retinanet", "semantic"])
@pytest.mark.parametrize("policy", ["random", "rl"])
@pytest.mark.usefixtures("no_tf32")
def test_static_clip_equals_dense_for_any_policy(kind, policy, device):
    """Nothing changes, so copied features are what the model would compute: the output is dense's (on
    CUDA: block-sparse frames replayed from CUDA graphs, with bucket extras)."""
    plain, blockcopy = models(kind, device, POLICY=policy, TARGET=0.5)
    with torch.no_grad():
        for batch in clip(4, static=True):
            assert_same_outputs(blockcopy(batch), plain(batch), tol=1e-4)
    assert blockcopy.blockcopy.statistics.policy_executed_fraction < 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
@pytest.mark.usefixtures("no_tf32")
def test_captured_loop_runs_through_the_plugin(kind):
    """MODEL.BLOCKCOPY.CAPTURE_LOOP: Detectron2's results (masks or boxes) padded to DETECTIONS_PER_IMAGE
    feed the captured loop from the second frame on; a static clip still gives the dense outputs."""
    plain, blockcopy = models(kind, "cuda", TARGET=0.5, CAPTURE_LOOP=True)
    with torch.no_grad():
        for batch in clip(5, static=True):
            assert_same_outputs(blockcopy(batch), plain(batch), tol=1e-4)
    loop = blockcopy.blockcopy._loop
    assert loop is not None and not loop.decodes and loop.frame_number == 3  # frames 2-5 replayed
    assert blockcopy.blockcopy.statistics.policy_executed_fraction < 1.0


def test_capture_loop_is_a_config_key():
    with pytest.raises(bc.ConfigError, match="capture_loop"):
        models("retinanet", POLICY="random", CAPTURE_LOOP=True)
    with pytest.raises(bc.ConfigError, match="COMPILE_LOOP"):
        models("retinanet", COMPILE_LOOP=True)


def test_compiled_engine_runs_through_the_plugin():
    """MODEL.BLOCKCOPY.COMPILE: backbone and head run compiled programs (two buckets: few compiles on
    the CPU) and a static clip still gives the dense outputs."""
    plain, blockcopy = models("retinanet", POLICY="random", TARGET=0.5, COMPILE=True, BUCKETS=2)
    with torch.no_grad():
        for batch in clip(3, static=True):
            assert_same_outputs(blockcopy(batch), plain(batch), tol=1e-4)
    assert blockcopy.backbone.compile_seconds, "the backbone ran compiled programs"
    assert blockcopy.head.compile_seconds, "the head ran compiled programs"


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_sparse_frames_run_the_policy_and_follow_clips(device):
    _, blockcopy = models("mask_rcnn", device, POLICY="random", TARGET=0.5)
    head = blockcopy.proposal_generator.rpn_head
    with torch.no_grad():
        for batch in clip(3, "a", streams=2) + clip(2, "b", streams=2):
            outputs = blockcopy(batch)
            assert len(outputs) == 2 and outputs[0]["instances"].pred_masks.shape[-2:] == (HEIGHT, WIDTH)
            assert torch.equal(head.executed_grid, blockcopy.backbone.executed_grid), "the RPN head follows"
    stats = blockcopy.statistics
    assert (stats.frames, stats.full_frames) == (5, 2)
    assert blockcopy.annotated_statistics.frames == 5, "inputs without 'annotated' are scored"
    assert 0.0 < stats.policy_executed_fraction < 1.0
    assert isinstance(head, bc.BlockSparseModel) and head.last_stats.executed_blocks < 2 * 2 * 4


@pytest.mark.parametrize("kind", list(BASES))
def test_plain_checkpoint_loads_with_no_missing_or_unexpected_keys(kind, tmp_path):
    plain, _ = models(kind)
    DetectionCheckpointer(plain, save_dir=str(tmp_path)).save("plain")
    blockcopy = build_model(config(kind, True))
    assert list(blockcopy.state_dict()) == list(plain.state_dict())
    incompatible = DetectionCheckpointer(blockcopy)._load_model(torch.load(tmp_path / "plain.pth", weights_only=False))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    for (name, a), (_, b) in zip(blockcopy.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name


def test_policy_is_saved_beside_the_model_and_loaded_from_the_config(tmp_path):
    _, blockcopy = models("retinanet", POLICY="rl")
    with torch.no_grad():
        for batch in clip(5):
            blockcopy(batch)
    cfg = config("retinanet", True, POLICY="rl", POLICY_WEIGHTS=str(tmp_path / "policy.pt"))
    cfg.OUTPUT_DIR = str(tmp_path)
    assert save_policy(cfg, blockcopy) == tmp_path / "policy.pt"
    _, resumed = models("retinanet", POLICY="rl")
    load_weights(cfg, resumed)
    for a, b in zip(resumed.blockcopy.policy.parameters(), blockcopy.blockcopy.policy.parameters()):
        assert torch.equal(a, b)
    cfg.MODEL.BLOCKCOPY.POLICY_WEIGHTS = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="POLICY_WEIGHTS"):
        load_weights(cfg, resumed)


@pytest.mark.parametrize("keys, error, message", [
    ({"BLOCK_SIZE": 64}, bc.ConfigError, r"MODEL\.BLOCKCOPY\.BLOCK_SIZE.*largest stride 128"),
    ({"POLICY": "oracle"}, bc.ConfigError, r"MODEL\.BLOCKCOPY\.POLICY.*registered policies"),
    ({"TARGET": 1.5}, bc.ConfigError, r"MODEL\.BLOCKCOPY\.TARGET"),
])
def test_bad_config_fails_at_build_time(keys, error, message):
    with pytest.raises(error, match=message):
        build_model(config("retinanet", True, **keys))


def test_meta_architecture_needs_the_blockcopy_backbone_and_runs_inference_only():
    cfg = config("retinanet", True)
    cfg.MODEL.BACKBONE.NAME = cfg.MODEL.BLOCKCOPY.BACKBONE
    with pytest.raises(ValueError, match="build_blockcopy_backbone"):
        build_model(cfg)
    _, blockcopy = models("retinanet")
    with pytest.raises(NotImplementedError, match="inference only"):
        blockcopy.train()


CONFIGS = sorted((REPO_ROOT / "configs" / "Cityscapes").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_cityscapes_configs_build_their_models(path):
    """Each config is a few lines over a model-zoo config (``_BASE_: detectron2://...``)."""
    cfg = get_cfg()
    add_blockcopy_config(cfg)
    merge_config_file(cfg, str(path))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    blockcopy = "blockcopy" in path.stem.lower()
    assert type(model).__name__.startswith("BlockCopy") == blockcopy
    if blockcopy:
        assert model.blockcopy.config.block_size == 128
        assert f"tau{model.blockcopy.config.target:g}" in path.stem or path.stem.startswith("Base")
    assert len(path.read_text().splitlines()) <= 20


def test_config_chain_errors_name_the_files(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "missing.yaml"\n')
    cfg = get_cfg()
    with pytest.raises(FileNotFoundError, match=r"_BASE_ 'missing.yaml' of config .*child.yaml"):
        merge_config_file(cfg, str(child))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_config_file(cfg, str(tmp_path / "nothing.yaml"))


def test_policy_moves_with_the_model_but_stays_out_of_its_state_dict():
    _, blockcopy = models("retinanet", POLICY="rl")
    assert not any(key.startswith("blockcopy.") for key in blockcopy.state_dict())
    blockcopy.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in blockcopy.parameters())
    # The policy follows the model's device, not its dtype: it keeps training in fp32.
    assert all(p.dtype == torch.float32 for p in blockcopy.blockcopy.policy.parameters())
