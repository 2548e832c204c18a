"""CSP's neck (Liu et al., "High-level Semantic Feature Detection", CVPR 2019, as in Pedestron): each
backbone level is upsampled to stride 4 by a transposed convolution, L2-normalised over its channels with
a learned per-channel scale, and the levels are concatenated along channels."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from torch import Tensor, nn


class ChannelL2Norm(nn.Module):
    """``weight * x / (||x||_2 + eps)`` with the norm over the channels of each position.

    The eps is added to the norm (Pedestron's L2Norm), unlike ``F.normalize``, which clamps the norm
    from below. Input and output are (N, C, H, W).
    """

    def __init__(self, channels: int, scale: float = 10.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(x, ord=2, dim=1, keepdim=True) + self.eps
        return self.weight.view(1, -1, 1, 1) * (x / norm)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


@MODELS.register_module()
class CSPNeck(BaseModule):
    """Upsample, normalise and concatenate backbone levels into one stride-4 map.

    Args:
        in_channels: channels of the backbone levels, e.g. (512, 1024, 2048) for ResNet-50 stages 2-4.
        out_channels: channels of each upsampled level; the output has ``len(in_channels) * out_channels``.
        upsample_strides: the factor each level is upsampled by (its stride over the output's), e.g.
            (2, 4, 4) for a ResNet with strides 8, 16, 16 (dilated last stage) to reach stride 4.
        kernel_size: kernel of the transposed convolutions; the padding is ``(kernel_size - s) / 2`` so
            that each output is exactly ``s`` times its input (Pedestron: kernel 4, padding 1, 0, 0).
        l2_norm_scale: initial value of the per-channel scales after the normalisation.
        l2_norm_eps: added to the L2 norm before dividing by it.
    """

    def __init__(self, in_channels: Sequence[int] = (512, 1024, 2048), out_channels: int = 256,
                 upsample_strides: Sequence[int] = (2, 4, 4), kernel_size: int = 4, l2_norm_scale: float = 10.0,
                 l2_norm_eps: float = 1e-10, init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        if len(in_channels) != len(upsample_strides):
            raise ValueError(f"CSPNeck needs one upsampling stride per input level, got {len(in_channels)} "
                             f"in_channels {tuple(in_channels)} and upsample_strides {tuple(upsample_strides)}")
        for stride in upsample_strides:
            if stride < 1 or kernel_size < stride or (kernel_size - stride) % 2:
                raise ValueError(f"CSPNeck cannot upsample exactly by {stride} with kernel_size {kernel_size}: "
                                 "kernel_size - stride must be even and not negative")
        self.in_channels = tuple(in_channels)
        self.out_channels = out_channels
        self.upsample_strides = tuple(upsample_strides)
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(c, out_channels, kernel_size, stride=s, padding=(kernel_size - s) // 2)
            for c, s in zip(self.in_channels, self.upsample_strides))
        self.l2_norms = nn.ModuleList(ChannelL2Norm(out_channels, l2_norm_scale, l2_norm_eps) for _ in in_channels)

    def forward(self, inputs: Sequence[Tensor]) -> tuple[Tensor]:
        """``inputs``: the backbone levels, (N, C_i, H / s_i, W / s_i) with ``s_i = 4 * upsample_strides[i]``.

        Returns a 1-tuple: the (N, len(in_channels) * out_channels, H / 4, W / 4) map.
        """
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"CSPNeck expects {len(self.in_channels)} feature maps, got {len(inputs)}")
        levels = [norm(deconv(x)) for x, deconv, norm in zip(inputs, self.deconvs, self.l2_norms)]
        return (torch.cat(levels, dim=1),)
