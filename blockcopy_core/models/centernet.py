"""CenterNet with a MobileNetV3 backbone (COCO, 80 classes), loaded from a TensorFlow.js graph model.

The weights come from the TFJS graph ``centernet.json``/``centernet.bin`` of the npm package
``@vladmandic/human`` 3.3.6 (trained with the MSCOCO config of the mobilenetv3_centernet project).
The network is rebuilt here as an ordinary ``nn.Module``:

- backbone: MobileNetV3 (stem, 15 inverted residual blocks with depthwise convs, squeeze-excite and
  ReLU/hard-swish, a final 1x1 conv to 480 channels), batch norm already folded into conv biases;
- neck: lateral "reverse" branches at strides 4/8/16 (1x1 conv, 5x5 separable conv), upsampling
  branches (3x3 + 5x5 separable convs, TF legacy bilinear x2) concatenated with them, then a global
  context gate (spatial mean, two 1x1 convs, sigmoid);
- heads: a class heatmap (sigmoid) and box geometry ``wh`` at stride 4.

``wh`` holds, for each heatmap cell (x, y), the distances in input pixels from the point
(stride * x, stride * y) to the box's left, top, right and bottom edges. ``decode_detections`` turns
the dense outputs into boxes exactly as the graph's own ``tower_0/detections`` subgraph does.
Class indices are the 80 contiguous COCO classes in the usual order; 0 is "person".
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from blockcopy_core.functional import resize_bilinear_tf
from blockcopy_core.models.tfjs import load_tfjs_graph
from blockcopy_core.paths import cache_dir, shared_dir

MODEL_SUBDIR = "models/centernet_mobilenetv3_coco"
MODEL_FILES = ("centernet.json", "centernet.bin")
NPM_PACKAGE = "@vladmandic/human@3.3.6"
NUM_CLASSES = 80
PERSON_CLASS = 0  # COCO_CLASSES[PERSON_CLASS] == "person", as the graph numbers classes
OUTPUT_STRIDE = 4

COCO_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)


@dataclass(frozen=True)
class BlockConfig:
    """One inverted residual block: depthwise kernel, expanded/output channels, squeeze-excite
    channels (0: none), activation ("relu" or "hswish") and stride."""

    kernel_size: int
    expanded: int
    out: int
    se: int
    activation: str
    stride: int


STEM_CHANNELS = 16
LAST_CHANNELS = 480
BLOCKS = (
    BlockConfig(3, 16, 16, 0, "relu", 1),
    BlockConfig(3, 64, 24, 0, "relu", 2),
    BlockConfig(3, 72, 24, 0, "relu", 1),
    BlockConfig(5, 72, 32, 24, "relu", 2),
    BlockConfig(5, 96, 32, 24, "relu", 1),
    BlockConfig(5, 96, 32, 24, "relu", 1),
    BlockConfig(3, 192, 64, 0, "hswish", 2),
    BlockConfig(3, 160, 64, 0, "hswish", 1),
    BlockConfig(3, 144, 64, 0, "hswish", 1),
    BlockConfig(3, 144, 64, 0, "hswish", 1),
    BlockConfig(3, 384, 88, 96, "hswish", 1),
    BlockConfig(3, 528, 88, 136, "hswish", 1),
    BlockConfig(5, 528, 120, 136, "hswish", 2),
    BlockConfig(5, 720, 120, 184, "hswish", 1),
    BlockConfig(5, 720, 120, 184, "hswish", 1),
)
# Where the neck taps the backbone: the expanded (hidden) activations of blocks 3 and 5 (strides 4
# and 8), the output of block 11 (stride 16) and the last conv (stride 32).
C2_HIDDEN_OF_BLOCK = 3
C3_HIDDEN_OF_BLOCK = 5
C4_OUTPUT_OF_BLOCK = 11


def tf_same_padding(kernel_size: int, stride: int) -> tuple[int, int, int, int]:
    """TF 'SAME' padding ``(left, right, top, bottom)`` for inputs whose size is a multiple of stride.

    TF pads ``max(kernel_size - stride, 0)`` in total, the odd pixel on the right/bottom.
    """
    total = max(kernel_size - stride, 0)
    before = total // 2
    return before, total - before, before, total - before


class HardSwish(nn.Module):
    """``x * scale * relu6(x + 3)`` with the graph's own ``scale``.

    The graph stores 1/6 in float16 (0.16663); the network is sensitive enough that an exact 1/6
    moves ``wh`` by ~3 px and the heatmap by ~2e-3, so the loader passes the stored value.
    """

    def __init__(self, scale: float = 1 / 6):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        return x * self.scale * F.relu6(x + 3.0)


def make_activation(name: str, hard_scale: float) -> nn.Module:
    """The activation module called ``name`` ("relu" or "hswish")."""
    if name == "relu":
        return nn.ReLU()
    if name == "hswish":
        return HardSwish(hard_scale)
    raise ValueError(f"unknown activation {name!r}")


class ConvAct(nn.Module):
    """Conv2d with bias and TF 'SAME' padding, then an activation.

    Odd kernels at stride 1 pad symmetrically inside the conv; strided convs pad explicitly with
    zeros (TF puts the extra pixel on the right/bottom), which is exact for even input sizes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        activation: nn.Module | None = None,
    ):
        super().__init__()
        left, right, top, bottom = tf_same_padding(kernel_size, stride)
        symmetric = left == right and top == bottom
        self.pad = None if symmetric else (left, right, top, bottom)
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=left if symmetric else 0, groups=groups
        )
        self.act = activation if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return self.act(self.conv(x))


class SqueezeExcite(nn.Module):
    """MobileNetV3 squeeze-excite: spatial mean, 1x1 conv + ReLU, 1x1 conv, hard sigmoid gate."""

    def __init__(self, channels: int, squeezed: int, hard_scale: float):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.hard_scale = hard_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W), each channel scaled by its gate in [0, 1]."""
        pooled = x.mean((2, 3), keepdim=True)
        gate = F.relu6(self.expand(F.relu(self.reduce(pooled))) + 3.0) * self.hard_scale
        return gate * x


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand, depthwise conv, optional squeeze-excite, 1x1 linear project,
    plus the input when stride is 1 and channels match. Without expansion the expand conv is absent.
    """

    def __init__(self, in_channels: int, config: BlockConfig, hard_scale: float):
        super().__init__()
        hidden = config.expanded
        self.expand = (
            ConvAct(in_channels, hidden, activation=make_activation(config.activation, hard_scale))
            if hidden != in_channels
            else nn.Identity()
        )
        self.depthwise = ConvAct(
            hidden,
            hidden,
            config.kernel_size,
            config.stride,
            groups=hidden,
            activation=make_activation(config.activation, hard_scale),
        )
        self.squeeze_excite = SqueezeExcite(hidden, config.se, hard_scale) if config.se else nn.Identity()
        self.project = ConvAct(hidden, config.out)
        self.use_residual = config.stride == 1 and in_channels == config.out

    def forward_with_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C_in, H, W) -> output (N, C_out, H / s, W / s) and expanded (N, C_hidden, H, W)."""
        hidden = self.expand(x)
        out = self.project(self.squeeze_excite(self.depthwise(hidden)))
        if self.use_residual:
            out = out + x
        return out, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
        return self.forward_with_hidden(x)[0]


class MobileNetV3Backbone(nn.Module):
    """The MobileNetV3 feature extractor; returns the four maps the CenterNet neck taps."""

    def __init__(self, hard_scale: float = 1 / 6):
        super().__init__()
        self.stem = ConvAct(3, STEM_CHANNELS, 3, 2, activation=HardSwish(hard_scale))
        blocks = []
        channels = STEM_CHANNELS
        for config in BLOCKS:
            blocks.append(InvertedResidual(channels, config, hard_scale))
            channels = config.out
        self.blocks = nn.ModuleList(blocks)
        self.last_conv = ConvAct(channels, LAST_CHANNELS, activation=HardSwish(hard_scale))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) -> {"c2": (N, 72, H/4, W/4), "c3": (N, 96, H/8, W/8),
        "c4": (N, 88, H/16, W/16), "c5": (N, 480, H/32, W/32)}."""
        features = {}
        x = self.stem(x)
        for index, block in enumerate(self.blocks):
            x, hidden = block.forward_with_hidden(x)
            if index == C2_HIDDEN_OF_BLOCK:
                features["c2"] = hidden
            elif index == C3_HIDDEN_OF_BLOCK:
                features["c3"] = hidden
            elif index == C4_OUTPUT_OF_BLOCK:
                features["c4"] = x
        features["c5"] = self.last_conv(x)
        return features


class SeparableConv(nn.Module):
    """TF ``separable_conv2d``: depthwise k x k ('SAME', no bias), then pointwise 1x1 with bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W)."""
        return self.pointwise(self.depthwise(x))


class LateralBranch(nn.Module):
    """A neck "reverse" branch: 1x1 conv + ReLU to a few channels, then a 5x5 separable conv."""

    def __init__(self, in_channels: int, reduced: int, out_channels: int):
        super().__init__()
        self.reduce = ConvAct(in_channels, reduced, activation=nn.ReLU())
        self.separable = SeparableConv(reduced, out_channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W)."""
        return self.separable(self.reduce(x))


class UpsampleBranch(nn.Module):
    """A neck upsampling step: 3x3 and 5x5 separable convs summed, then TF bilinear x2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.branch_x = SeparableConv(in_channels, out_channels, 3)
        self.branch_y = SeparableConv(in_channels, out_channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, 2H, 2W)."""
        return resize_bilinear_tf(self.branch_x(x) + self.branch_y(x), 2)


class GlobalContext(nn.Module):
    """Channel gate from the whole image: spatial mean, 1x1 conv + ReLU, 1x1 conv, sigmoid."""

    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        pooled = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(pooled))))


class CenterNetHead(nn.Module):
    """The CenterNet neck (c5 -> c2 upsampling with lateral branches) and its two output heads."""

    def __init__(self, num_classes: int = NUM_CLASSES, wh_scale: float = 16.0):
        super().__init__()
        self.c2_reverse = LateralBranch(BLOCKS[C2_HIDDEN_OF_BLOCK].expanded, 18, 64)
        self.c3_reverse = LateralBranch(BLOCKS[C3_HIDDEN_OF_BLOCK].expanded, 24, 96)
        self.c4_reverse = LateralBranch(BLOCKS[C4_OUTPUT_OF_BLOCK].out, 22, 128)
        self.c5_upsample = UpsampleBranch(LAST_CHANNELS, 128)
        self.c4_upsample = UpsampleBranch(128 + 128, 96)
        self.c3_upsample = UpsampleBranch(96 + 96, 64)
        self.global_context = GlobalContext(64 + 64, 32)
        self.cls_output = SeparableConv(128, num_classes, 3)
        self.wh_output = SeparableConv(128, 4, 3)
        # a 0-d buffer, not a float attribute: torch.compile with freezing multiplied by 3.0 instead of
        # a float 16.0 here (CPU, torch 2.14; the model's hard-swish also adds 3.0), and a tensor it gets
        # right. Not persistent: the state dict keeps its keys.
        self.register_buffer("wh_scale", torch.tensor(float(wh_scale)), persistent=False)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Backbone maps (see ``MobileNetV3Backbone``) -> {"heatmap": (N, K, H/4, W/4),
        "wh": (N, 4, H/4, W/4)}."""
        p4 = F.relu(torch.cat([self.c4_reverse(features["c4"]), self.c5_upsample(features["c5"])], 1))
        p3 = F.relu(torch.cat([self.c3_reverse(features["c3"]), self.c4_upsample(p4)], 1))
        p2 = F.relu(torch.cat([self.c2_reverse(features["c2"]), self.c3_upsample(p3)], 1))
        p2 = self.global_context(p2)
        return {"heatmap": torch.sigmoid(self.cls_output(p2)), "wh": self.wh_output(p2) * self.wh_scale}


class CenterNetMobileNetV3(nn.Module):
    """CenterNet-MobileNetV3 detector (dense outputs; see ``decode_detections`` for boxes).

    Args:
        num_classes: heatmap channels (80 COCO classes).
        hard_scale: the 1/6 of hard-swish and hard-sigmoid (the graph stores it in float16).
        wh_scale: the factor the graph applies to the raw ``wh`` head (16).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, hard_scale: float = 1 / 6, wh_scale: float = 16.0):
        super().__init__()
        self.backbone = MobileNetV3Backbone(hard_scale)
        self.head = CenterNetHead(num_classes, wh_scale)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the detector.

        Args:
            x: (N, 3, H, W) RGB in 0..255, H and W multiples of 32 (the graph feeds raw pixels to its
                first conv: there is no further preprocessing).

        Returns:
            {"heatmap": (N, num_classes, H/4, W/4) class probabilities (sigmoid),
             "wh": (N, 4, H/4, W/4) distances in input pixels from (4x, 4y) to the box's
             left, top, right, bottom edges}.
        """
        return self.head(self.backbone(x))


def _tf_block_scope(index: int) -> str:
    """The graph scope of inverted residual block ``index``."""
    return "MobilenetV3/expanded_conv" + (f"_{index}" if index else "")


def _conv_names(scope: str) -> dict[str, str]:
    """Graph names of a conv whose batch norm was folded into ``Conv2D_bn_offset``."""
    return {"conv.weight": f"{scope}/Conv2D_weights", "conv.bias": f"{scope}/Conv2D_bn_offset"}


def _separable_names(
    scope: str, pointwise: str = "separable_conv2d_weights", bias: str = "separable_conv2d_bn_offset"
) -> dict[str, str]:
    """Graph names of a ``SeparableConv`` (the pointwise conv's names vary between scopes)."""
    return {
        "depthwise.weight": f"{scope}/depthwise_weights",
        "pointwise.weight": f"{scope}/{pointwise}",
        "pointwise.bias": f"{scope}/{bias}",
    }


def _prefixed(prefix: str, names: dict[str, str]) -> dict[str, str]:
    """``names`` with their state-dict keys under the submodule ``prefix``."""
    return {f"{prefix}.{key}": value for key, value in names.items()}


def graph_parameter_names() -> dict[str, str]:
    """Map each ``CenterNetMobileNetV3`` state-dict key to its graph weight (without ``tower_0/``)."""
    names = _prefixed("backbone.stem", _conv_names("MobilenetV3/Conv"))
    channels = STEM_CHANNELS
    for index, config in enumerate(BLOCKS):
        scope, prefix = _tf_block_scope(index), f"backbone.blocks.{index}"
        if config.expanded != channels:
            names |= _prefixed(f"{prefix}.expand", _conv_names(f"{scope}/expand"))
        names |= {
            f"{prefix}.depthwise.conv.weight": f"{scope}/depthwise/depthwise_weights",
            f"{prefix}.depthwise.conv.bias": f"{scope}/depthwise/depthwise_bn_offset",
        }
        if config.se:
            for module, tf_name in (("reduce", "Conv"), ("expand", "Conv_1")):
                tf_scope = f"{scope}/squeeze_excite/{tf_name}"
                names |= {
                    f"{prefix}.squeeze_excite.{module}.weight": f"{tf_scope}/weights",
                    f"{prefix}.squeeze_excite.{module}.bias": f"{tf_scope}/biases",
                }
        names |= _prefixed(f"{prefix}.project", _conv_names(f"{scope}/project"))
        channels = config.out
    names |= _prefixed("backbone.last_conv", _conv_names("extern1"))
    for level in ("c2", "c3", "c4"):
        scope = f"CenternetHead/{level}_reverse"
        names |= _prefixed(f"head.{level}_reverse.reduce", _conv_names(f"{scope}/1x1"))
        names |= _prefixed(f"head.{level}_reverse.separable", _separable_names(f"{scope}/3x3"))
    for level in ("c5", "c4", "c3"):
        for branch in ("branch_x", "branch_y"):
            names |= _prefixed(
                f"head.{level}_upsample.{branch}",
                _separable_names(f"CenternetHead/{level}_upsample/{branch}_upsample_resize"),
            )
    names |= {
        "head.global_context.reduce.weight": "CenternetHead/conv1x1_se_a/Conv2D_weights",
        "head.global_context.reduce.bias": "CenternetHead/conv1x1_se_a/Conv2D_bn_offset",
        "head.global_context.expand.weight": "CenternetHead/conv1x1_se_b/weights",
    }
    for head in ("cls", "wh"):
        scope = f"CenternetHead/centernet_{head}_output"
        names |= _prefixed(f"head.{head}_output", _separable_names(scope, "pointwise_weights", "biases"))
    return names


def _to_torch_layout(array: np.ndarray, graph_name: str) -> torch.Tensor:
    """TF HWIO conv kernels -> OIHW; depthwise HWC1 kernels -> C1HW; biases unchanged."""
    if array.ndim == 4:
        axes = (2, 3, 0, 1) if graph_name.endswith("depthwise_weights") else (3, 2, 0, 1)
        array = array.transpose(axes)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _shared_scalar(weights: dict[str, np.ndarray], suffixes: tuple[str, ...], json_path: Path) -> float:
    """The one value of all scalar graph constants whose names end with one of ``suffixes``."""
    values = {float(array) for name, array in weights.items() if name.endswith(suffixes) and array.ndim == 0}
    if len(values) != 1:
        raise ValueError(
            f"{json_path}: expected one value for the constants *{suffixes}, found {sorted(values)}"
        )
    return values.pop()


def _scalar(weights: dict[str, np.ndarray], name: str, json_path: Path) -> float:
    """The scalar graph constant ``name``."""
    if name not in weights or weights[name].ndim != 0:
        raise ValueError(f"{json_path} has no scalar constant {name!r}")
    return float(weights[name])


def default_model_dir() -> Path:
    """The shared model folder if present, else the cache folder (fetched from npm when empty)."""
    shared = shared_dir() / MODEL_SUBDIR
    if shared.is_dir():
        return shared
    return fetch_model_files(cache_dir() / MODEL_SUBDIR)


def fetch_model_files(destination: Path) -> Path:
    """Put ``centernet.json``/``.bin`` from the npm package ``@vladmandic/human@3.3.6`` in ``destination``.

    Does nothing when both files are already there. Needs the ``npm`` client and registry access.
    """
    if all((destination / name).is_file() for name in MODEL_FILES):
        return destination
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"CenterNet model files are not in {destination} and fetching them needs npm "
            f"(`npm pack {NPM_PACKAGE}`), which is not installed"
        )
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        try:
            result = subprocess.run(
                [npm, "pack", NPM_PACKAGE], cwd=workdir, capture_output=True, text=True, timeout=900
            )
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"`npm pack {NPM_PACKAGE}` timed out") from error
        tarballs = list(Path(workdir).glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            raise RuntimeError(
                f"`npm pack {NPM_PACKAGE}` failed (exit {result.returncode}): "
                f"{result.stderr.strip()[-2000:]}"
            )
        with tarfile.open(tarballs[0]) as tarball:
            for name in MODEL_FILES:
                try:
                    member = tarball.extractfile(f"package/models/{name}")
                except KeyError:
                    member = None
                if member is None:
                    raise RuntimeError(f"{NPM_PACKAGE} has no file package/models/{name}")
                partial = destination / f"{name}.partial"
                partial.write_bytes(member.read())
                partial.replace(destination / name)
    return destination


def load_centernet(
    model_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> CenterNetMobileNetV3:
    """Build ``CenterNetMobileNetV3`` with the TFJS graph's weights (eval mode, float32).

    Args:
        model_dir: folder with ``centernet.json`` and ``centernet.bin``; by default the shared model
            folder, else a cache folder filled from npm on first use.
        device: where to put the model.
    """
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    json_path = model_dir / MODEL_FILES[0]
    graph = load_tfjs_graph(json_path)
    weights = {name.removeprefix("tower_0/"): array for name, array in graph.weights.items()}
    model = CenterNetMobileNetV3(
        hard_scale=_shared_scalar(weights, ("hard_swish/mul_1/y", "squeeze_excite/Conv_1/mul/y"), json_path),
        wh_scale=_scalar(weights, "mul/y", json_path),
    )
    state = {}
    expected = model.state_dict()
    for key, graph_name in graph_parameter_names().items():
        if graph_name not in weights:
            raise ValueError(f"{json_path} has no weight {graph_name!r} (needed for {key})")
        tensor = _to_torch_layout(weights[graph_name], graph_name)
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{json_path}: weight {graph_name!r} has shape {tuple(tensor.shape)}, "
                f"{key} needs {tuple(expected[key].shape)}"
            )
        state[key] = tensor
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def decode_detections(
    outputs: dict[str, torch.Tensor],
    score_threshold: float = 0.0,
    max_detections: int = 100,
    input_size: tuple[int, int] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Boxes from the dense outputs, as the graph's ``tower_0/detections`` subgraph computes them.

    A heatmap value is kept only where it equals the 3x3 max around it (max-pool NMS); the
    ``max_detections`` best (cell, class) pairs are taken in the graph's order (flattened over
    y, x, class); each box is ``(s*x - wh0, s*y - wh1, s*x + wh2, s*y + wh3)`` with ``s`` the
    output stride. Boxes are not clipped to the image (nor are they in the graph).

    Args:
        outputs: {"heatmap": (N, K, h, w), "wh": (N, 4, h, w)} from ``CenterNetMobileNetV3``.
        score_threshold: keep detections scoring at least this (0 keeps all, like the graph).
        max_detections: how many top scores to take per image (the graph takes 100).
        input_size: (H, W) of the network input; the stride is H / h (default: 4, the graph's).

    Returns:
        Per image, {"boxes": (D, 4) x1, y1, x2, y2 in input pixels, "scores": (D,),
        "labels": (D,) int64 COCO class indices (0 is person)}, best first.
    """
    heatmap, wh = outputs["heatmap"], outputs["wh"]
    batch, num_classes, height, width = heatmap.shape
    stride_y, stride_x = (
        (OUTPUT_STRIDE, OUTPUT_STRIDE)
        if input_size is None
        else (input_size[0] / height, input_size[1] / width)
    )
    is_peak = F.max_pool2d(heatmap, 3, stride=1, padding=1) == heatmap
    peaks = (heatmap * is_peak).permute(0, 2, 3, 1).reshape(batch, -1)
    scores, flat_index = peaks.topk(min(max_detections, peaks.shape[1]), dim=1)
    cell = torch.div(flat_index, num_classes, rounding_mode="floor")
    labels = flat_index % num_classes
    ys = torch.div(cell, width, rounding_mode="floor").to(wh.dtype) * stride_y
    xs = (cell % width).to(wh.dtype) * stride_x
    distances = wh.permute(0, 2, 3, 1).reshape(batch, height * width, 4)
    distances = distances.gather(1, cell.unsqueeze(-1).expand(-1, -1, 4))
    boxes = torch.stack(
        [xs - distances[..., 0], ys - distances[..., 1], xs + distances[..., 2], ys + distances[..., 3]],
        dim=-1,
    )
    if score_threshold <= 0:  # every peak (the heatmap is a sigmoid): fixed shapes, no host synchronisation
        return [{"boxes": boxes[i], "scores": scores[i], "labels": labels[i]} for i in range(batch)]
    keep = scores >= score_threshold
    return [
        {"boxes": boxes[i][keep[i]], "scores": scores[i][keep[i]], "labels": labels[i][keep[i]]}
        for i in range(batch)
    ]
