"""BlockCopyDetector on MMDetection's own detectors (CPU, random weights, small frames): the wrapper is the
plain detector's module tree, equals it frame after frame with every block executed, equals dense on a
static clip with any policy, starts clips from the data samples and refuses bad input clearly."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("mmdet")

from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402

import blockcopy_core as bc  # noqa: E402
from blockcopy_mmdet import BlockCopyDetector, input_format  # noqa: E402

HEIGHT, WIDTH = 256, 384
register_all_modules()


def _config(base: str, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "model.py"
    path.write_text(f"_base_ = 'mmdet::{base}'\n")
    model = Config.fromfile(str(path)).model
    model.backbone.init_cfg = None  # random weights: nothing to download
    return model


@pytest.fixture(scope="module")
def retinanet_cfg(tmp_path_factory):
    return _config("retinanet/retinanet_r18_fpn_1x_coco.py", tmp_path_factory)


@pytest.fixture(scope="module")
def fcos_cfg(tmp_path_factory):
    model = _config("fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py", tmp_path_factory)
    model["backbone"].update(depth=18)  # FCOS's GroupNorm head, per-level Scale and exp kept
    model["neck"]["in_channels"] = [64, 128, 256, 512]
    return model


@pytest.fixture(scope="module")
def faster_rcnn_cfg(tmp_path_factory):
    model = _config("faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", tmp_path_factory)
    model["backbone"].update(depth=18)
    model["neck"]["in_channels"] = [64, 128, 256, 512]
    model["test_cfg"]["rcnn"]["score_thr"] = 0.0  # random weights score low: keep detections to compare
    return model


def _build_pair(detector_cfg: dict, **blockcopy):
    torch.manual_seed(0)
    plain = MODELS.build(copy.deepcopy(detector_cfg)).eval()
    wrapped = MODELS.build(dict(type="BlockCopyDetector", detector=copy.deepcopy(detector_cfg),
                                blockcopy=dict(block_size=128, **blockcopy)))
    wrapped.load_state_dict(plain.state_dict(), strict=True)
    return plain, wrapped


def _batch(images: torch.Tensor, clip_ids, frame_id: int) -> dict:
    """A test batch as mmdet's dataloader gives it: (N, 3, H, W) 0..255 BGR images, one sample each."""
    samples = [DetDataSample(metainfo=dict(img_shape=(HEIGHT, WIDTH), ori_shape=(HEIGHT, WIDTH),
                                           scale_factor=(1.0, 1.0),
                                           clip_id=clip, frame_id=frame_id, annotated=True))
               for clip in clip_ids]
    return {"inputs": list(images), "data_samples": samples}


def _moving_clip(frames: int, streams: int = 1) -> list[torch.Tensor]:
    torch.manual_seed(1)
    base = torch.rand(streams, 3, HEIGHT, WIDTH) * 255
    clip = []
    for t in range(frames):
        frame = base.clone()
        frame[..., 40:100, 30 + 40 * t:90 + 40 * t] = 255.0  # a bright square moving right
        clip.append(frame)
    return clip


def _assert_same_detections(a, b, atol: float) -> None:
    assert len(a) == len(b) and len(a) > 0
    torch.testing.assert_close(b.bboxes, a.bboxes, atol=atol, rtol=0)
    torch.testing.assert_close(b.scores, a.scores, atol=atol, rtol=0)
    assert torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("which", ["retinanet", "fcos", "faster_rcnn"])
def test_all_policy_equals_plain_detector_frame_after_frame(which, request, one_thread):
    plain, wrapped = _build_pair(request.getfixturevalue(f"{which}_cfg"), policy="all")
    for t, frame in enumerate(_moving_clip(3, streams=2)):
        batch = _batch(frame, ["a", "b"], t)
        expected = plain.test_step(copy.deepcopy(batch))
        got = wrapped.test_step(copy.deepcopy(batch))
        for e, g in zip(expected, got):
            # Same convolutions on the same pixels; only the tile batching differs (float summation order).
            _assert_same_detections(e.pred_instances, g.pred_instances, atol=1e-4)
    assert wrapped.statistics.executed_fraction == 1.0


@pytest.mark.parametrize("which", ["retinanet", "faster_rcnn"])
def test_static_clip_equals_dense_for_a_learning_policy(which, request, one_thread):
    plain, wrapped = _build_pair(request.getfixturevalue(f"{which}_cfg"), policy="rl", target=0.3)
    frame = _moving_clip(1)[0]
    expected = plain.test_step(_batch(frame, [0], 0))[0].pred_instances
    for t in range(4):
        got = wrapped.test_step(_batch(frame, [0], t))[0].pred_instances
        _assert_same_detections(expected, got, atol=1e-4)
    stats = wrapped.statistics
    assert stats.frames == 4 and stats.full_frames == 1
    assert stats.policy_executed_fraction < 1.0, "the policy skipped blocks, and their copies are exact"


def test_state_dict_is_the_plain_detectors(retinanet_cfg):
    plain, wrapped = _build_pair(retinanet_cfg)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert not any("policy" in key for key in wrapped.state_dict())
    plain.load_state_dict(wrapped.state_dict(), strict=True)


def test_new_clip_starts_with_a_full_frame_and_policy_learns_online(retinanet_cfg, one_thread):
    _, wrapped = _build_pair(retinanet_cfg, policy="rl", target=0.3, update_interval=2)
    before = [p.detach().clone() for p in wrapped.blockcopy.policy.parameters()]
    clip = _moving_clip(4)
    for t, frame in enumerate(clip):
        wrapped.test_step(_batch(frame, [7], t))
    assert wrapped.statistics.full_frames == 1
    wrapped.test_step(_batch(clip[0], [8], 0))  # another clip id: a new clip
    assert wrapped.statistics.full_frames == 2
    after = list(wrapped.blockcopy.policy.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "REINFORCE updated the policy in test_step"


def test_pad_size_divisor_is_raised_to_the_block_size(retinanet_cfg):
    _, wrapped = _build_pair(retinanet_cfg)
    assert wrapped.data_preprocessor.pad_size_divisor == 128  # 32 in the plain config
    batch = wrapped.data_preprocessor({"inputs": [torch.zeros(3, 200, 300)], "data_samples": [DetDataSample()]})
    assert tuple(batch["inputs"].shape[-2:]) == (256, 384)


def test_frame_not_a_multiple_of_the_block_size_is_refused(retinanet_cfg):
    _, wrapped = _build_pair(retinanet_cfg)
    sample = DetDataSample(metainfo=dict(img_shape=(192, 384), ori_shape=(192, 384), scale_factor=(1.0, 1.0)))
    with pytest.raises(bc.InvalidInputError, match=r"192x384 .*block_size=128"):
        wrapped.predict(torch.zeros(1, 3, 192, 384), [sample])


def test_bad_settings_are_refused(retinanet_cfg):
    with pytest.raises(bc.ConfigError, match="target"):
        MODELS.build(dict(type="BlockCopyDetector", detector=retinanet_cfg, blockcopy=dict(target=1.5)))
    with pytest.raises(bc.ConfigError, match="classes"):
        MODELS.build(dict(type="BlockCopyDetector", detector=retinanet_cfg, classes=[80]))
    with pytest.raises((KeyError, TypeError, ValueError), match="block_sise"):
        MODELS.build(dict(type="BlockCopyDetector", detector=retinanet_cfg, blockcopy=dict(block_sise=64)))
    with pytest.raises(ValueError, match="already a BlockCopyDetector"):
        MODELS.build(dict(type="BlockCopyDetector",
                          detector=dict(type="BlockCopyDetector", detector=retinanet_cfg)))


def test_training_is_refused(retinanet_cfg):
    _, wrapped = _build_pair(retinanet_cfg)
    with pytest.raises(NotImplementedError, match="inference only"):
        wrapped.train()
    with pytest.raises(NotImplementedError, match="inference only"):
        wrapped.loss(torch.zeros(1, 3, HEIGHT, WIDTH), [DetDataSample()])


def test_policy_reads_the_preprocessors_pixel_format(retinanet_cfg):
    _, wrapped = _build_pair(retinanet_cfg)
    fmt = wrapped.blockcopy.adapter.input_format
    assert fmt == input_format(wrapped.data_preprocessor)
    assert fmt.channel_order == "RGB" and fmt.pixel_mean == pytest.approx((123.675, 116.28, 103.53))
    assert isinstance(wrapped, BlockCopyDetector)


def test_policy_weights_round_trip(retinanet_cfg, tmp_path, one_thread):
    _, wrapped = _build_pair(retinanet_cfg, policy="rl", update_interval=1)
    for t, frame in enumerate(_moving_clip(3)):
        wrapped.test_step(_batch(frame, [0], t))
    path = tmp_path / "policy.pt"
    torch.save(wrapped.blockcopy.state_dict(), path)
    loaded = MODELS.build(dict(type="BlockCopyDetector", detector=copy.deepcopy(retinanet_cfg),
                               blockcopy=dict(block_size=128, policy="rl", update_interval=1),
                               policy_weights=str(path)))
    for a, b in zip(wrapped.blockcopy.policy.parameters(), loaded.blockcopy.policy.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not a BlockCopy policy for this model"):
        MODELS.build(dict(type="BlockCopyDetector", detector=copy.deepcopy(retinanet_cfg),
                          blockcopy=dict(block_size=128), classes=[0], policy_weights=str(path)))


# --- CUDA: the pedestrian detectors through the engine's CUDA path (kernels, buckets, CUDA graphs) ---

PEDESTRIAN_CONFIGS = {"csp": "configs/_base_/models/csp_r50.py", "mgan": "configs/_base_/models/mgan_vgg16.py"}


def _pedestrian_cfg(name: str):
    from pathlib import Path

    cfg = Config.fromfile(str(Path(__file__).resolve().parents[1] / PEDESTRIAN_CONFIGS[name])).model
    if name == "mgan":
        cfg.test_cfg.rpn.max_per_img = 300  # the dense ROI stage is not what this test is about
    return cfg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["csp", "mgan"])
def test_cuda_pedestrian_detectors_on_a_static_clip_match_dense(name, dtype, no_tf32):
    """A static clip with the learning policy on CUDA (CUDA graphs per bucket, kernels for the tile
    moves, fp16 too): copied blocks hold exactly what they would compute, so every map the block-sparse
    part hands to the post-processing equals the dense detector's up to float rounding (tile convolutions
    may pick other cuDNN algorithms). Maps rather than boxes are compared: random weights give many
    equal scores, whose order NMS breaks arbitrarily."""
    from torch.utils import _pytree as pytree

    import blockcopy_mmdet.detector as detector_module

    register_all_modules()
    cfg = _pedestrian_cfg(name)
    torch.manual_seed(0)
    plain = MODELS.build(copy.deepcopy(cfg)).eval().cuda().to(dtype)
    wrapped = MODELS.build(dict(type="BlockCopyDetector", detector=copy.deepcopy(cfg),
                                blockcopy=dict(block_size=128, policy="rl", target=0.3)))
    wrapped.load_state_dict(plain.state_dict())
    wrapped.cuda().to(dtype)
    assert next(wrapped.blockcopy.policy.parameters()).dtype == torch.float32, "the policy trains in fp32"
    torch.manual_seed(1)
    frame = (torch.rand(1, 3, 512, 1024, device="cuda") * 255).to(dtype)
    sample = DetDataSample(metainfo=dict(img_shape=(512, 1024), ori_shape=(512, 1024), scale_factor=(1.0, 1.0),
                                         clip_id=0))
    expected = pytree.tree_leaves(detector_module.trunk_of(plain)(frame))
    seen = []
    decode = detector_module.predict_from_trunk

    def recording(detector, outputs, *args, **kwargs):
        seen.append([t.clone() for t in pytree.tree_leaves(outputs)])
        return decode(detector, outputs, *args, **kwargs)

    detector_module.predict_from_trunk = recording
    try:
        for t in range(6):
            results = wrapped.predict(frame, [copy.deepcopy(sample)])[0].pred_instances
            assert len(results) > 0
    finally:
        detector_module.predict_from_trunk = decode
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # relative to each map's largest value
    for t, maps in enumerate(seen):
        for got, want in zip(maps, expected):
            error = float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6))
            assert error <= tolerance, (t, tuple(want.shape), error)
    stats = wrapped.statistics
    assert stats.full_frames == 1 and stats.policy_executed_fraction < 1.0
    assert len(wrapped.sparse._graphs) >= 1, "the sparse frames ran as CUDA graphs"
