"""Achieved memory bandwidth of the CUDA tile kernels and of the PyTorch reference, on one GPU.

Bandwidth = the fewest bytes an op must move (each input byte read once, each output byte written
once; constant fill outside the image is not read) over its median time (CUDA events around each of
``--iters`` calls after a warm-up). Printed as GB/s, as a fraction of the GPU's datasheet peak
(H100 SXM 3.35 TB/s, H100 PCIe 2.0 TB/s, H200 4.8 TB/s) and of a measured device-to-device copy.

    python tools/bench_kernels.py            # default configurations, first the target one
"""
from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass
from unittest import mock

import torch

from blockcopy_core import cuda_kernels, tiles
from blockcopy_core.grid import TileIndex

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Config:
    n: int
    c: int
    h: int
    w: int
    t: int
    fraction: float
    halo: int
    dtype: str
    layout: str

    def __str__(self) -> str:
        return (f"N={self.n} C={self.c} {self.h}x{self.w} T={self.t} f={self.fraction} halo={self.halo} "
                f"{self.dtype} {self.layout}")


CONFIGS = [
    Config(4, 256, 512, 256, 16, 0.3, 1, "fp16", "channels_last"),  # the target: large tiles, fp16 NHWC
    Config(4, 64, 1024, 512, 64, 0.3, 1, "fp16", "channels_last"),  # an early layer: few channels, big tiles
    Config(4, 2048, 64, 32, 2, 0.3, 1, "fp16", "channels_last"),  # a late layer: 2-px tiles, many channels
    Config(4, 256, 512, 256, 16, 0.3, 1, "fp32", "nchw"),
    Config(4, 3, 2048, 1024, 128, 0.3, 0, "fp32", "nchw"),  # extract_tiles on input frames
]


def peak_bandwidth(name: str) -> float | None:
    """Datasheet memory bandwidth in bytes/s, None for an unknown GPU."""
    if "H200" in name:
        return 4.8e12
    if "H100" in name:
        return 2.0e12 if "PCIe" in name else 3.35e12
    return None


def median_seconds(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs) / 1e3


def copy_bandwidth(iters: int) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_seconds(lambda: dst.copy_(src), iters)


def in_image_pixels(index: TileIndex, cfg: Config) -> int:
    """Pixels of the grown tiles that lie inside the image (read from memory, not filled)."""
    steps = torch.arange(cfg.t + 2 * cfg.halo, device="cuda") - cfg.halo
    rows = ((index.row * cfg.t)[:, None] + steps).clamp(min=-1)
    cols = ((index.col * cfg.t)[:, None] + steps).clamp(min=-1)
    inside_rows = ((rows >= 0) & (rows < cfg.h)).sum(1)
    inside_cols = ((cols >= 0) & (cols < cfg.w)).sum(1)
    return int((inside_rows * inside_cols).sum())


def bench(cfg: Config, iters: int, peak: float | None, copy_bw: float) -> list[tuple]:
    dtype, fmt = DTYPES[cfg.dtype], torch.channels_last if cfg.layout == "channels_last" else torch.contiguous_format
    gh, gw = cfg.h // cfg.t, cfg.w // cfg.t
    grid = torch.rand(cfg.n, 1, gh, gw, device="cuda") < cfg.fraction
    index = TileIndex.from_grid(grid)
    k, e, halo = len(index), torch.finfo(dtype).bits // 8, (cfg.halo,) * 4
    state = torch.randn(cfg.n, cfg.c, cfg.h, cfg.w, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    new = torch.randn(k, cfg.c, cfg.t, cfg.t, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    tile_map = tiles.block_tile_map(index, (cfg.n, gh, gw))
    tile_bytes = k * cfg.c * cfg.t ** 2 * e
    grown_bytes = k * cfg.c * (cfg.t + 2 * cfg.halo) ** 2 * e
    read_bytes = in_image_pixels(index, cfg) * cfg.c * e
    halo_read = read_bytes - tile_bytes
    ops = {
        "gather": (read_bytes + grown_bytes, lambda: tiles.gather_tiles(state, index, cfg.t, halo)),
        "scatter": (2 * tile_bytes, lambda: tiles.scatter_tiles(state, new, index)),
        "scatter+gather": (2 * tile_bytes + read_bytes + grown_bytes, lambda: (
            tiles.scatter_tiles(state, new, index), tiles.gather_tiles(state, index, cfg.t, halo))),
        "update_and_gather": (tile_bytes + halo_read + tile_bytes + grown_bytes, lambda: tiles.update_and_gather(
            state, new, index, halo, tile_map=tile_map)),
    }
    rows = []
    for name, (nbytes, fn) in ops.items():
        if name == "update_and_gather" and cfg.halo == 0:
            continue
        for impl, disabled in (("cuda", "0"), ("torch", "1")):
            with mock.patch.dict(os.environ, {"BLOCKCOPY_DISABLE_CUDA_KERNELS": disabled}):
                seconds = median_seconds(fn, iters)
            bw = nbytes / seconds
            rows.append((name, impl, k, seconds * 1e6, nbytes / 1e6, bw / 1e9,
                         bw / peak if peak else float("nan"), bw / copy_bw))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    peak = peak_bandwidth(name)
    cuda_kernels.load()
    copy_bw = copy_bandwidth(args.iters)
    print(f"device: {name}; datasheet peak {peak / 1e12 if peak else float('nan'):.2f} TB/s; "
          f"measured 1 GiB copy {copy_bw / 1e12:.2f} TB/s (read + write)")
    for cfg in CONFIGS:
        print(f"\n{cfg}")
        print(f"{'op':<18} {'impl':<6} {'K':>5} {'us':>9} {'MB':>8} {'GB/s':>8} {'of peak':>8} {'of copy':>8}")
        for op, impl, k, us, mb, gbs, frac_peak, frac_copy in bench(cfg, args.iters, peak, copy_bw):
            print(f"{op:<18} {impl:<6} {k:>5} {us:>9.1f} {mb:>8.1f} {gbs:>8.0f} {frac_peak:>8.1%} {frac_copy:>8.1%}")


if __name__ == "__main__":
    main()
