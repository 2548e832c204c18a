"""Per-frame cost of BlockCopy's online loop (policy, decoding, information gain, update) on real video.

Runs the COCO CenterNet-MobileNetV3 under BlockCopy's ``rl`` policy on PETS09-S2L1 frames resized to
``--size`` (default 2048x1024, 128-px blocks), N streams (stream i starts ``--stream-offset * i``
frames later), with the eager loop, the loop captured in CUDA graphs (``capture_loop=True``) and the
captured loop with its stages compiled first (``compile_loop=True``; the compile time is reported), and
prints the per-stage milliseconds per frame (all N streams) measured with ``sync_timing`` (a device
synchronisation around each stage). The task network runs in the engine's CUDA graphs every time.

    python tools/benchmark_loop.py --streams 1,4 --loops eager,captured,compiled --frames 120 --warmup 30
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockcopy_core.adapters import CenterNetAdapter  # noqa: E402
from blockcopy_core.blockcopy import BlockCopy  # noqa: E402
from blockcopy_core.data import VideoReader, pets09_s2l1_paths  # noqa: E402
from blockcopy_core.models.centernet import PERSON_CLASS, load_centernet  # noqa: E402

LOOP_STAGES = ("policy", "postprocess", "information_gain", "update")
LOOPS = {"eager": {}, "captured": {"capture_loop": True}, "compiled": {"capture_loop": True, "compile_loop": True}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2048x1024", help="frame size WxH (default 2048x1024)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--streams", default="1,4", help="comma-separated numbers of streams N")
    parser.add_argument("--loops", default="eager,captured,compiled", help=f"comma-separated, of {', '.join(LOOPS)}")
    parser.add_argument("--tau", type=float, default=0.3)
    parser.add_argument("--frames", type=int, default=120, help="timed frames per run")
    parser.add_argument("--warmup", type=int, default=30, help="untimed frames before them")
    parser.add_argument("--stream-offset", type=int, default=150, help="frames between the streams' starts")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def load_frames(size: tuple[int, int], count: int, device: str) -> torch.Tensor:
    """(count, 3, H, W) uint8 frames of PETS09-S2L1 resized to ``size`` (W, H), on ``device``."""
    video, _ = pets09_s2l1_paths(require_ground_truth=False)
    reader = VideoReader(video, 0, count, size=size, as_tensor=True)
    return torch.stack(list(tqdm(reader, total=count, desc="reading frames"))).to(device)


def run(model, frames: torch.Tensor, streams: int, args, loop: str) -> dict:
    """Per-stage ms per frame over the timed frames of one run."""
    torch.manual_seed(0)
    adapter = CenterNetAdapter(classes=(PERSON_CLASS,), decode_classes=(PERSON_CLASS,))
    bc = BlockCopy(model, adapter, block_size=args.block_size, policy="rl", target=args.tau, **LOOPS[loop])
    starts = [i * args.stream_offset for i in range(streams)]
    label = f"N={streams} {loop} loop"
    for t in tqdm(range(args.warmup + args.frames), desc=label):
        if t == args.warmup:
            bc.reset_statistics()
        batch = torch.stack([frames[start + t] for start in starts]).float()
        bc.step(batch)
    summary = bc.statistics.as_dict()
    ms = summary["ms_per_frame"]
    return {"streams": streams, "loop": loop, "ms_per_frame": ms,
            "loop_compile_seconds": bc._loop.compile_seconds if bc._loop is not None else 0.0,
            "loop_ms": sum(ms[stage] for stage in LOOP_STAGES),
            "policy_executed_fraction": summary["policy_executed_fraction"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    streams = [int(n) for n in args.streams.split(",")]
    model = load_centernet(device=args.device)
    needed = args.warmup + args.frames + args.stream_offset * (max(streams) - 1)
    frames = load_frames((width, height), needed, args.device)
    loops = args.loops.split(",")
    if unknown := set(loops) - set(LOOPS):
        raise SystemExit(f"--loops: unknown {sorted(unknown)}; choose from {', '.join(LOOPS)}")
    rows = [run(model, frames, n, args, loop) for n in streams for loop in loops]
    print(f"\nms per frame (all N streams), {width}x{height}, {args.block_size}-px blocks, tau {args.tau}:")
    print("| N | loop | " + " | ".join(LOOP_STAGES) + " | loop total | network | executed | loop compile s |")
    print("| --- " * (len(LOOP_STAGES) + 6) + "|")
    for row in rows:
        ms = row["ms_per_frame"]
        print(f"| {row['streams']} | {row['loop']} | " + " | ".join(f"{ms[s]:.2f}" for s in LOOP_STAGES)
              + f" | {row['loop_ms']:.2f} | {ms['network']:.2f} | {row['policy_executed_fraction']:.3f} | "
              f"{row['loop_compile_seconds']:.1f} |")
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
              "torch": torch.__version__, "size": [width, height], "block_size": args.block_size, "tau": args.tau,
              "frames": args.frames, "warmup": args.warmup, "rows": rows}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
