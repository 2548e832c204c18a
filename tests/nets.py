"""Small and standard architectures the engine's tests run on (random weights, eval mode)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from blockcopy_core.functional import resize_bilinear_tf


class Lambda(nn.Module):
    """A module running ``fn``: puts a functional op into a model."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that folding mistakes would show."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def resnet50_trunk() -> nn.Module:
    """torchvision ResNet-50 up to stride 32."""
    return _randomize_norms(nn.Sequential(*list(torchvision.models.resnet50().children())[:-2]))


class Conv2dSame(nn.Conv2d):
    """A convolution with TensorFlow 'SAME' padding, written as F.pad before the convolution."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        x = F.pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 4, 1)
        self.expand = nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, tf_same: bool):
        super().__init__()
        mid = cin * 3
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.Hardswish())
        if tf_same:
            depthwise = Conv2dSame(mid, mid, kernel, stride, groups=mid, bias=False)
        else:
            depthwise = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self.depthwise = nn.Sequential(depthwise, nn.BatchNorm2d(mid), nn.ReLU6())
        self.se = SqueezeExcite(mid)
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3Like(nn.Module):
    """Squeeze-excite, depthwise convs, hard-swish, TF-'SAME' padding (F.pad), padding='same'."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(Conv2dSame(3, 16, 3, 2, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 3, 1, tf_same=False),
            InvertedResidual(16, 24, 3, 2, tf_same=True),
            InvertedResidual(24, 24, 5, 1, tf_same=False),
            InvertedResidual(24, 40, 5, 2, tf_same=True),
            InvertedResidual(40, 40, 3, 1, tf_same=True),
        )
        self.dilated = nn.Conv2d(40, 32, 3, padding="same", dilation=2)

    def forward(self, x):
        return self.dilated(self.blocks(self.stem(x)))


def mobilenet_v3_like() -> nn.Module:
    return _randomize_norms(MobileNetV3Like())


def torchvision_mobilenet_v3() -> nn.Module:
    return _randomize_norms(torchvision.models.mobilenet_v3_small().features)


class ResNetFPN(nn.Module):
    """torchvision's ResNet-18 + FPN (FrozenBatchNorm2d, F.interpolate to a size, extra max-pool level)."""

    def __init__(self):
        super().__init__()
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
        self.body = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=0)
        g = torch.Generator().manual_seed(1)
        for m in self.body.modules():
            if isinstance(m, torchvision.ops.FrozenBatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)

    def forward(self, x):
        return dict(self.body(x))


def resnet_fpn() -> nn.Module:
    return ResNetFPN().eval()


class UNetLike(nn.Module):
    """Encoder-decoder with max-pooling, bilinear and nearest upsampling, transposed conv and concat."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.enc1, self.enc2, self.enc3 = block(3, 8), block(8, 16), block(16, 32)
        self.pool = nn.MaxPool2d(2)
        self.up3 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.dec2 = block(32, 16)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec1 = block(24, 8)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(F.max_pool2d(e2, 3, 2, 1))
        d2 = self.dec2(torch.cat([self.up3(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up2(d2), e1], dim=1))
        return {"logits": self.head(d1), "coarse": F.interpolate(d2, scale_factor=2.0, mode="nearest")}


def unet_like() -> nn.Module:
    return _randomize_norms(UNetLike())


class OpZoo(nn.Module):
    """One of each remaining supported op: kernel sizes, strides, dilation, pooling, GroupNorm, ..."""

    def __init__(self):
        super().__init__()
        self.c7 = nn.Conv2d(3, 8, 7, stride=2, padding=3)
        self.c5d = nn.Conv2d(8, 8, 5, padding=4, dilation=2, groups=2)
        self.gn = nn.GroupNorm(4, 8)
        self.c1s2 = nn.Conv2d(8, 12, 1, stride=2)
        self.c4s4 = nn.Conv2d(8, 12, 4, stride=4)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)
        self.up_t2 = nn.ConvTranspose2d(12, 12, 2, stride=2)
        self.up_t3 = nn.ConvTranspose2d(12, 12, 3, stride=2, padding=1, output_padding=1)
        self.prelu = nn.PReLU(12)

    def forward(self, x):
        x = F.silu(self.gn(self.c5d(F.gelu(self.c7(x)))))
        a = self.prelu(self.c1s2(x))
        b = F.avg_pool2d(self.c4s4(x), 2, 2)
        b = F.interpolate(b, scale_factor=4, mode="bicubic", align_corners=False)
        y = self.avg(a) * torch.sigmoid(b) + F.adaptive_avg_pool2d(a, 1)
        y = resize_bilinear_tf(F.leaky_relu(y, 0.1), 2) - 0.5 * self.up_t2(y) + self.up_t3(y)
        return torch.cat(torch.chunk(y, 2, dim=1)[::-1], dim=1).softmax(dim=1)


def op_zoo() -> nn.Module:
    return OpZoo().eval()


# name: (factory, block size, frame height, frame width). Frames are non-square (2x3 blocks), small
# enough for CI, and every net's deepest map still spans several pixels per block or frame.
ARCHITECTURES = {
    "resnet50_trunk": (resnet50_trunk, 32, 64, 96),
    "mobilenet_v3_like": (mobilenet_v3_like, 32, 64, 96),
    "torchvision_mobilenet_v3": (torchvision_mobilenet_v3, 32, 64, 96),
    "resnet_fpn": (resnet_fpn, 64, 128, 192),
    "unet_like": (unet_like, 32, 64, 96),
    "op_zoo": (op_zoo, 32, 64, 96),
}
