#!/usr/bin/env python
"""End-to-end speed of MMDetection pedestrian detectors (CSP, MGAN) with and without BlockCopy, one run.

Per model, dtype and number of streams N, on a synthetic 2048x1024 video (a fixed textured background with
moving boxes, preprocessed frames already on the GPU), the median wall time per time step (all N frames,
``torch.cuda.synchronize`` before and after) of:

- ``eager``: the plain detector as Pedestron users ran it: the network eagerly, then its decoding and NMS
  (two-stage: proposals and the ROI head);
- ``compiled``: the strongest dense baseline: the block-sparse part of the detector (backbone, neck and
  head, or RPN head) compiled with ``torch.compile`` (inductor, ``freezing``) and captured as one CUDA
  graph (:func:`blockcopy_core.protocol.compile_dense`), the same post-processing after it; per tau it is
  timed taking turns with BlockCopy on the same time steps
  (:func:`blockcopy_core.timing.interleaved_step_ms`), so that drifts of the machine fall on both sides;
- ``blockcopy tau``: ``BlockCopyDetector`` with the learned policy (``rl``) at target tau, learning online:
  policy, block-sparse network (compiled programs in CUDA graphs per bucket), post-processing, information
  gain and policy update (the loop captured in CUDA graphs and compiled: ``capture_loop``, ``compile_loop``),
  i.e. everything a frame costs, timed after the clip's dense first frame and a warm-up;
- ``ceiling tau``: the compiled network on only the blocks BlockCopy executed (as a batch of 128-px
  tiles with zero padding, no state) plus the dense post-processing: what a block-sparse run could reach
  with no overhead at all.

Weights are random (the speed of these networks does not depend on them; the number of boxes the
post-processing handles does, and is reported). All frames are the same dtype and channels_last.
Prints a table and writes a JSON file.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402

import blockcopy_mmdet  # noqa: E402,F401  (registers the models)
from blockcopy_core.protocol import compile_dense  # noqa: E402
from blockcopy_core.timing import (MeasuredRows, PhaseLog, benchmark_environment, interleaved_step_ms,  # noqa: E402
                                   median_step_ms, print_top_operators)
from blockcopy_mmdet.detector import predict_from_trunk, trunk_of  # noqa: E402

CONFIGS = {"csp": ROOT / "configs/_base_/models/csp_r50.py", "mgan": ROOT / "configs/_base_/models/mgan_vgg16.py"}
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def synthetic_video(frames: int, n: int, height: int, width: int, dtype, device) -> list[torch.Tensor]:
    """(N, 3, H, W) normalised channels_last frames: a smooth random background and 12 boxes per stream
    moving 8 px per frame (pedestrian-sized, 40x100)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    low = torch.rand(n, 3, height // 32, width // 32, generator=generator)
    background = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear") * 2 - 1
    xs = torch.randint(0, width - 40 - 8 * frames, (n, 12), generator=generator)
    ys = torch.randint(0, height - 100, (n, 12), generator=generator)
    video = []
    for t in range(frames):
        frame = background.clone()
        for s in range(n):
            for x, y in zip(xs[s].tolist(), ys[s].tolist()):
                frame[s, :, y:y + 100, x + 8 * t:x + 8 * t + 40] = 1.5
        video.append(frame.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last))
    return video


def samples(n: int, height: int, width: int, frame_id: int) -> list[DetDataSample]:
    shape = (height, width)
    return [DetDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape, batch_input_shape=shape,
                                        scale_factor=(1.0, 1.0), clip_id=stream, frame_id=frame_id))
            for stream in range(n)]




@torch.no_grad()
def measure(name: str, dtype_name: str, n: int, taus: list[float], height: int, width: int, frames: int,
            warmup: int, block: int, ceiling: bool, device: torch.device, compile_engine: bool,
            fast_loop: bool, profile: bool = False, log=lambda message: None,
            measured=lambda row: None) -> dict:
    """One row (model, dtype, N) with a result per tau; ``log(message)`` is told each phase, ``measured(row)``
    is called after each tau with the row so far (with ``ceiling``, also before the ceiling is measured)."""
    dtype = DTYPES[dtype_name]
    title = f"{name} {dtype_name} N={n}"
    log(f"{title}: eager")
    detector_cfg = Config.fromfile(str(CONFIGS[name])).model
    torch.manual_seed(0)
    plain = MODELS.build(detector_cfg).eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)
    video = synthetic_video(warmup + frames, n, height, width, dtype, device)
    metas = [samples(n, height, width, t) for t in range(len(video))]
    boxes = []

    def dense_step(network):
        def step(i):
            results = predict_from_trunk(plain, network(video[i]), metas[i])
            boxes.append(sum(len(r) for r in results) / n)
        return step

    trunk = trunk_of(plain)
    eager_ms = median_step_ms(dense_step(trunk), frames, warmup)
    log(f"{title}: compiling the dense network")
    started = time.perf_counter()
    fast = compile_dense(trunk, video[0])  # checked against the eager trunk
    dense_step(fast)(0)
    compile_s = time.perf_counter() - started
    if profile:
        print_top_operators(f"{name} {dtype_name} N={n} compiled dense", lambda: dense_step(fast)(0))
    outputs = fast(video[0])
    post_ms = median_step_ms(lambda i: predict_from_trunk(plain, outputs, metas[0]), frames, warmup)
    row = {"model": name, "dtype": dtype_name, "streams": n, "engine": "compiled" if compile_engine else "eager",
           "loop": "compiled" if fast_loop else "eager",
           "eager_ms": eager_ms, "compile_seconds": compile_s, "postprocess_ms": post_ms,
           "boxes_per_frame": statistics.mean(boxes), "blockcopy": {}}
    for tau in taus:
        log(f"{title} tau {tau}: BlockCopy warm-up ({warmup} steps; buckets compile on first use)")
        torch.manual_seed(0)
        wrapped = MODELS.build(dict(type="BlockCopyDetector", detector=detector_cfg,
                                    blockcopy=dict(block_size=block, policy="rl", target=tau,
                                                   compile=compile_engine, capture_loop=fast_loop,
                                                   compile_loop=fast_loop)))
        wrapped.load_state_dict(plain.state_dict())
        wrapped.to(device=device, dtype=dtype, memory_format=torch.channels_last)
        for i in range(warmup):  # the clip's dense first frame, then the warm-up (buckets compile on first use)
            wrapped.predict(video[i], metas[i])
        wrapped.reset_statistics()
        log(f"{title} tau {tau}: {frames} timed steps, dense and BlockCopy in turns")
        # the compiled dense detector and BlockCopy take turns on each time step (dense keeps no state)
        paired = interleaved_step_ms({"compiled": dense_step(fast),
                                      "blockcopy": lambda i: wrapped.predict(video[i], metas[i])}, frames, warmup)
        ms, compiled_ms = paired["blockcopy"], paired["compiled"]
        stats = wrapped.statistics
        row["blockcopy"][tau] = {
            "ms": ms, "compiled_ms": compiled_ms, "executed_fraction": stats.executed_fraction,
            "selected_fraction": stats.policy_selected_fraction,
            "ms_per_stage": stats.ms_per_frame(), "gmacs_per_frame": stats.gmacs_per_frame(),
            "speedup_vs_compiled": compiled_ms / ms, "speedup_vs_eager": eager_ms / ms,
        }
        if profile:  # after the statistics were read: the profiled step is not counted
            last = warmup + frames - 1
            print_top_operators(f"{name} {dtype_name} N={n} BlockCopy tau {tau}",
                                lambda: wrapped.predict(video[last], metas[last]))
        if ceiling:  # compiles the network once more, for the tile batch's shape
            measured(row)  # on disk before that compilation, which a time limit may cut short
            log(f"{title} tau {tau}: ceiling (compiling the network for the executed tiles)")
            executed = round(row["blockcopy"][tau]["executed_fraction"] * n * (height // block) * (width // block))
            tiles = torch.randn(max(executed, 1), 3, block, block, device=device, dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            # a second shape of the same code would otherwise be compiled with dynamic shapes
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                tiles_ms = median_step_ms(lambda i: fast(tiles), frames, warmup)
            row["blockcopy"][tau].update(ceiling_ms=tiles_ms + post_ms,
                                         ceiling_speedup=compiled_ms / (tiles_ms + post_ms))
        torch.cuda.empty_cache()
        measured(row)
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | dtype | N | eager ms | compiled ms | tau | executed | BlockCopy ms | vs compiled | vs eager | "
             "ceiling (vs compiled) | of ceiling | policy+IG+update ms |", "|" + " --- |" * 13]
    for r in rows:
        for tau, b in r["blockcopy"].items():
            stages = b["ms_per_stage"]
            loop = sum(stages.get(k, 0.0) for k in ("policy", "information_gain", "update"))
            ceiling = (f"{b['ceiling_speedup']:.2f}x | {b['speedup_vs_compiled'] / b['ceiling_speedup']:.0%}"
                       if "ceiling_speedup" in b else "- | -")
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['streams']} | {r['eager_ms']:.1f} | {b['compiled_ms']:.1f} | "
                f"{tau} | "
                f"{b['executed_fraction']:.3f} | {b['ms']:.1f} | {b['speedup_vs_compiled']:.2f}x | "
                f"{b['speedup_vs_eager']:.2f}x | {ceiling} | {loop:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="csp,mgan")
    parser.add_argument("--dtypes", default="fp16,fp32")
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--taus", default="0.3,0.5")
    parser.add_argument("--size", default="1024x2048", help="frame HxW")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--frames", type=int, default=30, help="timed time steps (median)")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps first (compilation, CUDA graphs)")
    parser.add_argument("--ceiling", action="store_true",
                        help="also time the compiled network on only the executed tiles (one more compilation per tau)")
    parser.add_argument("--device", default="cuda", help="cuda (speed); cpu only checks that the script runs")
    parser.add_argument("--eager-engine", action="store_true",
                        help="run BlockCopy with the eager engine instead of compile=True (buckets compile on "
                             "first use, during the warm-up steps or, for rare ones, in a timed step: the median "
                             "ignores those)")
    parser.add_argument("--eager-loop", action="store_true",
                        help="run BlockCopy's policy, information gain and update eagerly instead of captured in "
                             "CUDA graphs and compiled (capture_loop, compile_loop)")
    parser.add_argument("--profile", action="store_true",
                        help="print the operators taking the most device time in one dense and one BlockCopy step")
    parser.add_argument("--json", default="benchmark_detectors.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tools/benchmark_detectors.py measures GPU speed and needs a CUDA device")
    register_all_modules()
    torch.backends.cudnn.benchmark = True
    height, width = (int(v) for v in args.size.split("x"))
    environment = {**benchmark_environment(args.device == "cuda"), "size": f"{height}x{width}", "block": args.block,
                   "frames": args.frames, "warmup": args.warmup}
    rows, log = MeasuredRows(args.json, environment, markdown_table), PhaseLog()

    for name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            for n in (int(v) for v in args.streams.split(",")):
                rows.append(measure(name, dtype_name, n, [float(t) for t in args.taus.split(",")], height, width,
                                    args.frames, args.warmup, args.block, args.ceiling, torch.device(args.device),
                                    not args.eager_engine, args.device == "cuda" and not args.eager_loop,
                                    args.profile, log, rows.measured))
                torch._dynamo.reset()
    print(rows.summary())


if __name__ == "__main__":
    main()
