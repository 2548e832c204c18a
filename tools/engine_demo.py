#!/usr/bin/env python
"""Run a real detector block-sparse on a real video with a fixed execution pattern.

The COCO CenterNet-MobileNetV3 runs on the PETS 2009 S2L1 pedestrian video (768x576, 64-px blocks:
a 12x9 grid) twice: densely, and through the block-sparse engine where each frame after the first
executes one diagonal third of the blocks ((row + col + t) % 3 == 0), so every block is refreshed
every third frame. Prints, per run, how far the sparse outputs are from the dense ones and the
GMACs executed per frame.
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

import blockcopy_core as bc
from blockcopy_core.data import VideoReader, pets09_s2l1_paths
from blockcopy_core.evaluation import detection_agreement
from blockcopy_core.models import PERSON_CLASS, decode_detections, load_centernet


def rolling_pattern(t: int, grid_shape: tuple[int, int, int, int], period: int) -> torch.Tensor:
    """Frame t's grid: blocks with (row + col + t) % period == 0; all blocks at t = 0."""
    n, _, gh, gw = grid_shape
    if t == 0:
        return torch.ones(grid_shape, dtype=torch.bool)
    rows = torch.arange(gh)[:, None]
    cols = torch.arange(gw)[None, :]
    return ((rows + cols + t) % period == 0).expand(n, 1, gh, gw).clone()


def persons(detections: dict, threshold: float) -> dict:
    keep = (detections["labels"] == PERSON_CLASS) & (detections["scores"] >= threshold)
    return {"boxes": detections["boxes"][keep], "scores": detections["scores"][keep]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60, help="number of video frames to run (default 60)")
    parser.add_argument("--block-size", type=int, default=64, help="block size in pixels (default 64)")
    parser.add_argument("--period", type=int, default=3, help="each block executes every PERIOD frames")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    video_path, _ = pets09_s2l1_paths(require_ground_truth=False)
    model = load_centernet(device=args.device)
    sparse = bc.convert(model, args.block_size)
    dense_macs = None
    heatmap_error, sparse_gmacs, sparse_dets, dense_dets = [], [], [], []
    start = time.perf_counter()
    reader = VideoReader(video_path, stop=args.frames, as_tensor=True)
    with torch.no_grad():
        for t, frame in enumerate(tqdm(reader, desc="engine demo", unit="frame")):
            x = frame[None].float().to(args.device)
            dense = model(x)
            if dense_macs is None:
                dense_macs = bc.count_macs(model, x)
            out = sparse(x, rolling_pattern(t, (1, 1, x.shape[2] // args.block_size,
                                                x.shape[3] // args.block_size), args.period).to(args.device))
            heatmap_error.append((out["heatmap"] - dense["heatmap"]).abs().max().item())
            sparse_gmacs.append(sparse.last_stats.gmacs)
            size = tuple(x.shape[-2:])
            dense_dets.append(persons(decode_detections(dense, input_size=size)[0], 0.3))
            sparse_dets.append(persons(decode_detections(out, input_size=size)[0], 0.3))
    agreement = detection_agreement(sparse_dets[1:], dense_dets[1:], score_threshold=0.3)
    steady = sparse_gmacs[1:]
    print(f"\nCenterNet-MobileNetV3 on PETS09-S2L1, {len(sparse_gmacs)} frames of {size[1]}x{size[0]}, "
          f"{args.block_size}-px blocks, every block executed every {args.period} frames "
          f"({time.perf_counter() - start:.1f} s on {args.device})")
    print(f"  dense GMACs/frame:             {dense_macs / 1e9:.3f}")
    print(f"  block-sparse GMACs/frame:      {sum(steady) / len(steady):.3f} "
          f"({sum(steady) / len(steady) / (dense_macs / 1e9):.1%} of dense; first frame full)")
    print(f"  heatmap |sparse - dense| max:  {max(heatmap_error):.4f} (mean over frames "
          f"{sum(heatmap_error) / len(heatmap_error):.4f})")
    print(f"  person detections (score >= 0.3) agreeing with dense: F1 {agreement.f1:.3f} "
          f"(precision {agreement.precision:.3f}, recall {agreement.recall:.3f})")


if __name__ == "__main__":
    main()
