"""The policy network: a ResNet-8 on a downscaled state, one execution logit per block."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .observation import block_grid_shape


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN layers and a shortcut (1x1 conv-BN when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, h, w) -> (N, C_out, h / stride, w / stride)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def initial_logit(target: float) -> float:
    """log(tau / (1 - tau)), tau clamped to [0.01, 0.99]: the logit whose probability is tau."""
    tau = min(max(target, 0.01), 0.99)
    return math.log(tau / (1.0 - tau))


class PolicyNet(nn.Module):
    """ResNet-8 mapping the state S_t = {I_t, H_{t-1}, O_{t-1}, A_{t-1}} to one logit per block.

    The four inputs are resized to ``(Gh * STRIDE, Gw * STRIDE)`` and concatenated
    (3 + 3 + C_out + 1 channels). The frame and frame state are thus downscaled by
    ``block_size / STRIDE`` (area averaging): by 4 for 128-px blocks (2048x1024 -> 512x256), by 2 for
    64-px blocks (blocks under 32 px upsample them). The backbone's total stride ``STRIDE = 32`` then
    leaves exactly one position per block: a conv stem (3x3 stride 2, BN, ReLU, 3x3 max-pool stride
    2), three stages of one BasicBlock each (stride 2 each) and a 1x1 conv head with one output
    channel: 1 + 3 * 2 + 1 = 8 weighted layers.

    The head's weight starts at zero and its bias at ``initial_logit(initial_target)``, so every block
    starts with execution probability ~ tau and the policy starts near the target cost.
    In training mode BatchNorm pools statistics over the N streams of a frame, so the streams'
    logits are independent of each other only in eval mode.

    Cost (conv multiply-accumulates, ``widths=(32, 64, 128, 256)``, counted in tests/test_policy.py):
    0.60 GMACs at 2048x1024 with 128-px blocks and 19 output classes (0.43 GMACs with one class),
    0.50 GMACs at 768x576 with 64-px blocks and 19 classes; 1.2 M parameters. The paper's policy
    costs about 6.5 GMACs at 2048x1024. The stem's share grows with C_out (0.25 of the 0.60 GMACs).

    Args:
        output_channels: C_out, the number of probability masks in O_{t-1}.
        block_size: block side in pixels of the full-resolution frame.
        widths: channels of the stem and of the three stages.
        initial_target: tau used to initialise the head's bias.
    """

    STRIDE = 32

    def __init__(
        self,
        output_channels: int,
        block_size: int,
        widths: tuple[int, int, int, int] = (32, 64, 128, 256),
        initial_target: float = 0.5,
    ) -> None:
        super().__init__()
        if output_channels < 1:
            raise ValueError(f"output_channels must be >= 1, got {output_channels}")
        if block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size}")
        if len(widths) != 4:
            raise ValueError(f"widths must give 4 channel counts (stem, 3 stages), got {widths}")
        self.output_channels = output_channels
        self.block_size = block_size
        in_channels = 3 + 3 + output_channels + 1
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        self.stages = nn.Sequential(*(BasicBlock(widths[i], widths[i + 1], 2) for i in range(3)))
        self.head = nn.Conv2d(widths[3], 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, initial_logit(initial_target))

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The backbone's input size ``(Gh * STRIDE, Gw * STRIDE)`` for an ``H x W`` frame."""
        grid_h, grid_w = block_grid_shape(height, width, self.block_size)
        return grid_h * self.STRIDE, grid_w * self.STRIDE

    def forward(
        self,
        frame: torch.Tensor,
        frame_state: torch.Tensor,
        prev_output: torch.Tensor,
        prev_grid: torch.Tensor,
    ) -> torch.Tensor:
        """Execution logits, one per block.

        Args:
            frame: I_t, (N, 3, H, W) in [0, 1]; H and W multiples of ``block_size``.
            frame_state: H_{t-1}, (N, 3, H, W).
            prev_output: O_{t-1}, (N, C_out, H', W') at any resolution.
            prev_grid: A_{t-1}, (N, 1, H // block_size, W // block_size), bool or float.

        Returns:
            (N, 1, H // block_size, W // block_size) logits.
        """
        grid = block_grid_shape(frame.shape[2], frame.shape[3], self.block_size)
        if tuple(prev_grid.shape[2:]) != grid:
            raise ValueError(f"prev_grid is {tuple(prev_grid.shape[2:])} blocks, the frame has a {grid} grid")
        size = (grid[0] * self.STRIDE, grid[1] * self.STRIDE)
        if prev_output.shape[1] != self.output_channels:
            raise ValueError(
                f"prev_output has {prev_output.shape[1]} channels, "
                f"the policy was built for {self.output_channels}"
            )
        dtype = self.head.weight.dtype
        inputs = (frame, frame_state, prev_output, prev_grid)
        state = torch.cat([area_resize(x.to(dtype), size) for x in inputs], dim=1)
        return self.head(self.stages(self.stem(state)))


def area_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="area")`` of (N, C, H, W), by cheaper kernels for whole factors.

    Area resizing by a whole factor k is the mean over k x k windows (``avg_pool2d``), and enlarging by
    whole factors repeats each value (``nearest``); the general adaptive-average kernel is several times
    slower on large frames (0.16 ms for a 2048x1024 frame on an H200, most of the policy's time).
    """
    height, width = x.shape[-2:]
    if (height, width) == tuple(size):
        return x
    if height % size[0] == 0 and width % size[1] == 0:
        return F.avg_pool2d(x, (height // size[0], width // size[1]))
    if size[0] % height == 0 and size[1] % width == 0:
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="area")
