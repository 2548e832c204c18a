#!/usr/bin/env python
"""Dense vs block-sparse speed of the same model, in one run, on a CUDA GPU (or, ``--device cpu``, on the
CPU with ``--threads`` threads: no CUDA graphs there, each model runs as it is or compiled).

For each model, dtype, batch N (streams) and executed fraction f, these per-frame times are measured
with CUDA events (on the CPU: wall time) as the median over ``--frames`` frames after ``--warmup`` frames,
the four sides of a row (compiled dense, dense, block-sparse, compiled block-sparse) taking turns on
every frame, so that a slow drift of the host cannot fall on one side of a ratio:

- compiled dense: the strongest dense baseline a user would pick, the same model compiled with
  ``torch.compile`` (inductor, ``freezing``: BatchNorm folded into the convolutions) in a CUDA graph
  (:func:`blockcopy_core.protocol.compile_dense`), same dtype and channels_last; speed-ups are quoted
  against it;
- dense (eager + graph): the model run eagerly inside one CUDA graph (channels_last, the given dtype),
  frames copied into its static input and the output copied out, as a video loop would;
- block-sparse: ``blockcopy_core.convert(model, block)`` on random grids executing round(f * B) blocks
  per stream (rounded up to the 1/16 bucket), the whole ``forward`` call including its host read;
- compiled block-sparse: the same with ``compile=True`` (each bucket one inductor-compiled program in
  its CUDA graph), compiled ahead of the timed frames with ``warmup()``; its compile time and its
  largest relative difference from the eager engine on one frame (same executed blocks) are recorded;
- memory: what the block-sparse model keeps allocated per stream (layer states, outputs, static inputs
  and the CUDA graphs' memory pool), after one frame on each of the 16 grids the timed frames use;
- tiles only: the same model (CUDA graph) on the batch of executed tiles alone, with plain zero padding
  and no state: the convolution time the sparse run cannot avoid. ``sparse - tiles`` is the engine's
  overhead (state scatter, halo gathers, output scatter, bucket bookkeeping), as in the paper's Table 3;
- compiled tiles only (with the compiled block-sparse engine): the tile batch through ``compile_dense``,
  the ceiling of the compiled engine; ``compiled sparse - compiled tiles`` is its overhead;
- moves (CPU only): the eager engine's own work per frame by its timer (``time_overhead``: tile gathers,
  state writes, output scatters, tile indexing; median over the timed frames, after them), against the
  rest of its frame (``sparse - moves``: the tile convolutions and elementwise ops).

With ``--profile``, one eager sparse frame per configuration is also run under the PyTorch profiler
and its GPU kernel time is split into convolutions, the engine's tile kernels (gather / scatter /
state) and everything else (norms, activations, pooling, bookkeeping); the GPU kernel time per frame
of compiled dense and of the compiled engine is recorded too (``gpu_kernel_ms_*``: against the wall
time, how long the GPU waited for the host). On the CPU, one frame each of
the compiled dense model, the eager engine and the compiled engine is split into convolution operators
and the rest (``cpu_ms_*`` in the JSON): a block-sparse frame's rest holds its tile moves together with
its elementwise work (norms, activations, adds), which the dense frame's rest shows on the whole frame.

Prints a table and writes a JSON file.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import platform
import statistics
import time
from typing import Callable

import torch
import torchvision
from tqdm import tqdm

import blockcopy_core as bc
from blockcopy_core.graphs import graphed
from blockcopy_core.protocol import compile_dense, relative_error
from blockcopy_core.timing import MeasuredRows, interleaved_step_ms, median_step_ms, synchronize

def torchvision_trunk(name: str) -> torch.nn.Module:
    """A torchvision ResNet up to stride 32, random weights. The last BatchNorm of each residual branch
    is scaled to 0.5: with torchvision's initialisation ResNet-101's activations pass fp16's range
    (3.8e5 at stride 32), and the infinities would hide differences between the engines."""
    model = getattr(torchvision.models, name)()
    for block in model.modules():
        if isinstance(block, torchvision.models.resnet.Bottleneck):
            torch.nn.init.constant_(block.bn3.weight, 0.5)
    return torch.nn.Sequential(*list(model.children())[:-2])


def detectron2_r50_fpn() -> torch.nn.Module:
    """Detectron2's Mask R-CNN backbone (model zoo ``mask_rcnn_R_50_FPN_3x``: ResNet-50 with
    FrozenBatchNorm2d, FPN with nearest upsampling and a max-pooled p6), random weights; returns the
    dict of levels p2-p6."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return build_backbone(cfg)


def deeplabv3_resnet50() -> torch.nn.Module:
    """torchvision's DeepLabV3-ResNet50 (output stride 8, ASPP with dilations 12 / 24 / 36, the logits
    resized to the frame), random weights, no auxiliary head: the large-halo case of the engine."""
    return torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=False)


def centernet_mobilenetv3() -> torch.nn.Module:
    """The main job's CenterNet-MobileNetV3 (``blockcopy_core.models.centernet``), random weights: a small,
    latency-bound network whose depthwise convolutions and squeeze-excitation make the tile moves weigh
    more than in a ResNet."""
    from blockcopy_core.models.centernet import CenterNetMobileNetV3

    return CenterNetMobileNetV3()


TRUNKS = {
    "resnet50": lambda: torchvision_trunk("resnet50"),
    "resnet101": lambda: torchvision_trunk("resnet101"),
    "d2_r50_fpn": detectron2_r50_fpn,
    "deeplabv3_resnet50": deeplabv3_resnet50,
    "centernet_mobilenetv3": centernet_mobilenetv3,
}


def trunk(name: str) -> torch.nn.Module:
    """The benchmarked network ``name`` (a key of TRUNKS) in eval mode."""
    return TRUNKS[name]().eval()


def interleaved_ms(steps: dict[str, Callable[[int], object]], frames: int, warmup: int,
                   cuda: bool = True) -> dict[str, float]:
    """Median ms of each of ``steps`` (name: ``step(i)``) over i = warmup .. warmup + frames - 1, after
    ``step(0 .. warmup - 1)``, the steps taking turns within each i
    (:func:`blockcopy_core.timing.interleaved_step_ms`): CUDA events for work on a GPU, wall time on the
    CPU. The host's part of a frame ran 10-40 % slower for minutes at a time on the GPU machine; taking
    turns keeps such drifts off one side of a ratio."""
    for i in range(warmup):
        for step in steps.values():
            step(i)
    return interleaved_step_ms(steps, frames, warmup, events=cuda)


def gpu_kernel_ms(step: Callable[[], object], frames: int = 5) -> float:
    """GPU kernel time per ``step()`` (ms, summed over kernels, under the PyTorch profiler, ``frames``
    steps after one untimed): against a step's wall time it shows how long the GPU idled, waiting for the
    host."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(frames):
            step()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages()) / 1e3 / frames


def kernel_breakdown(sparse, frames: torch.Tensor, grid: torch.Tensor) -> dict[str, float]:
    """GPU kernel time (ms) of one eager sparse frame, by kind of kernel."""
    from torch.profiler import ProfilerActivity, profile

    graphs, sparse.cuda_graphs = sparse.cuda_graphs, False
    sparse(frames, grid)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sparse(frames, grid)
        torch.cuda.synchronize()
    sparse.cuda_graphs = graphs
    totals = {"convolution": 0.0, "tile_kernels": 0.0, "other": 0.0}
    for event in prof.key_averages():
        name = event.key.lower()
        if any(k in name for k in ("copy_rows_kernel", "gather_kernel")):  # kernels/tiles.cu
            kind = "tile_kernels"
        elif any(k in name for k in ("conv", "xmma", "implicit", "gemm", "cudnn", "sm90", "wgrad", "dgrad")):
            kind = "convolution"
        else:
            kind = "other"
        totals[kind] += event.device_time_total / 1e3
    return totals


def cpu_time_split(step) -> dict[str, float]:
    """One ``step()`` on the CPU under the profiler: ms in convolution operators (oneDNN, THNN, dilated) and
    in everything else (inductor's generated code, tile moves, elementwise ops, bookkeeping)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        step()
        total = 1e3 * (time.perf_counter() - started)
    convolution = sum(e.self_cpu_time_total for e in prof.key_averages() if "conv" in e.key.lower()) / 1e3
    return {"convolution": convolution, "other": total - convolution}


def random_grids(count: int, n: int, gh: int, gw: int, fraction: float, device) -> list[torch.Tensor]:
    """Grids executing exactly round(fraction * B) random blocks per stream."""
    per_stream = round(fraction * gh * gw)
    grids = []
    for _ in range(count):
        scores = torch.rand(n, gh * gw, device=device)
        chosen = scores.topk(per_stream, dim=1).indices
        grid = torch.zeros(n, gh * gw, dtype=torch.bool, device=device).scatter_(1, chosen, True)
        grids.append(grid.view(n, 1, gh, gw))
    return grids


@torch.no_grad()
def compiled_engine(model, video, block: int, fraction: float):
    """``convert(model, block, compile=True)`` with its clip started and its programs for ``fraction``
    compiled ahead (``warmup``); returns (engine, compile seconds)."""
    n, _, height, width = video[0].shape
    fast = bc.convert(model, block, compile=True)
    fast(video[0], torch.ones(n, 1, height // block, width // block, dtype=torch.bool, device=video[0].device))
    return fast, sum(fast.warmup([fraction]).values())


@torch.no_grad()
def compiled_checks(model, fast, eager, video, block, frames: int, warmup: int, grid: torch.Tensor,
                    tiles: torch.Tensor) -> dict:
    """The compiled engine ``fast`` against the eager one (largest relative difference on one frame, same
    executed blocks, both after a full frame), and the compiled model on the executed ``tiles`` alone:
    the compiled engine's ceiling."""
    n, _, height, width = video[0].shape
    full = torch.ones(n, 1, height // block, width // block, dtype=torch.bool, device=video[0].device)
    for engine in (fast, eager):
        engine.reset()
        engine(video[0], full)
    out = fast(video[1], grid)
    error = relative_error(out, eager(video[1], fast.executed_grid))
    # a second shape of the same model would otherwise be compiled with dynamic shapes
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        tiles_only = compile_dense(model, tiles)
        tiles_ms = median_step_ms(lambda i: tiles_only(tiles), frames, warmup, video[0].is_cuda)
    return {"compiled_rel_error": error, "compiled_tiles_only_ms": tiles_ms}


@torch.no_grad()
def measure(model_name, dtype, n, fractions, height, width, block, frames, warmup, profile,
            compile_dense_model, compile_sparse, device: torch.device) -> list[dict]:
    """The rows of one model, dtype and N: for each fraction, every side of the comparison is timed in
    turns (:func:`interleaved_ms`)."""
    cuda = device.type == "cuda"
    model = trunk(model_name).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    video = [torch.randn(n, 3, height, width, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last) for _ in range(4)]
    dense = graphed(model, video[0]) if cuda else model
    dense_macs = bc.count_macs(model, video[0])
    best, compile_seconds, dense_split = None, 0.0, {}
    if compile_dense_model:
        started = time.perf_counter()
        best = compile_dense(model, video[0])  # checked against the eager model
        best(video[1])
        synchronize()
        compile_seconds = time.perf_counter() - started
        if profile and not cuda:
            dense_split = cpu_time_split(lambda: best(video[1]))

    gh, gw = height // block, width // block
    rows = []
    for fraction in fractions:
        gc.collect()  # free the previous fraction's engines (states, CUDA graphs) before measuring memory
        synchronize()
        before = torch.cuda.memory_allocated() if cuda else 0
        sparse = bc.convert(model, block)
        sparse(video[0], torch.ones(n, 1, gh, gw, dtype=torch.bool, device=device))
        grids = random_grids(16, n, gh, gw, fraction, device)
        for i, grid in enumerate(grids):  # every bucket the timed frames meet is captured
            sparse(video[i % 4], grid)
        executed = sparse.last_stats.executed_blocks
        synchronize()
        # states, outputs, graph pools (not measured on the CPU)
        memory = (torch.cuda.memory_allocated() - before) / n if cuda else float("nan")
        steps = {"dense_ms": lambda i: dense(video[i % 4]), "sparse_ms": lambda i: sparse(video[i % 4], grids[i % 16])}
        if best is not None:
            steps["compiled_dense_ms"] = lambda i: best(video[i % 4])
        fast, sparse_compile_seconds = compiled_engine(model, video, block, fraction) if compile_sparse else (None, 0)
        if fast is not None:
            steps["compiled_sparse_ms"] = lambda i: fast(video[i % 4], grids[i % 16])
        timed = interleaved_ms(steps, frames, warmup, cuda)
        timed.setdefault("compiled_dense_ms", timed["dense_ms"])
        best_ms = timed["compiled_dense_ms"]

        if not cuda:  # on CUDA the engine's frames are graph replays, which its timer cannot split
            sparse.time_overhead = True
            moves = []
            for i in range(frames):
                sparse(video[i % 4], grids[i % 16])
                moves.append(1e3 * sparse.last_stats.overhead_seconds)
            sparse.time_overhead = False
            extra_moves = {"moves_ms": statistics.median(moves)}
            extra_moves["moves_vs_rest"] = extra_moves["moves_ms"] / (timed["sparse_ms"] - extra_moves["moves_ms"])
        else:
            extra_moves = {}
        tiles = torch.randn(executed, 3, block, block, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        tiles_only = graphed(model, tiles) if cuda else model
        tiles_ms = median_step_ms(lambda i: tiles_only(tiles), frames, warmup, cuda)
        extra = dict(extra_moves)
        if profile and cuda:
            extra = {f"kernel_ms_{k}": v for k, v in kernel_breakdown(sparse, video[1], grids[0]).items()}
            if best is not None:
                extra["gpu_kernel_ms_compiled_dense"] = gpu_kernel_ms(lambda: best(video[1]))
            if fast is not None:
                extra["gpu_kernel_ms_compiled_sparse"] = gpu_kernel_ms(lambda: fast(video[1], grids[1]))
        elif profile:
            extra = {**{f"cpu_ms_compiled_dense_{k}": v for k, v in dense_split.items()},
                     **{f"cpu_ms_sparse_{k}": v for k, v in cpu_time_split(lambda: sparse(video[1], grids[0])).items()}}
            if fast is not None:
                extra.update({f"cpu_ms_compiled_sparse_{k}": v
                              for k, v in cpu_time_split(lambda: fast(video[2], grids[1])).items()})
        if fast is not None:
            extra.update(compiled_checks(model, fast, sparse, video, block, frames, warmup, grids[0], tiles))
            extra.update(sparse_compile_seconds=sparse_compile_seconds,
                         compiled_speedup_vs_compiled=best_ms / timed["compiled_sparse_ms"],
                         compiled_overhead_ms=timed["compiled_sparse_ms"] - extra["compiled_tiles_only_ms"])
        rows.append({
            "model": model_name, "dtype": str(dtype).replace("torch.", ""), "batch": n, "fraction": fraction,
            "executed_fraction": executed / (n * gh * gw), **timed,
            "tiles_only_ms": tiles_ms, "overhead_ms": timed["sparse_ms"] - tiles_ms,
            "speedup": timed["dense_ms"] / timed["sparse_ms"], "compile_seconds": compile_seconds,
            "speedup_vs_compiled": best_ms / timed["sparse_ms"],
            "ideal_speedup": 1 / fraction, "dense_gmacs_per_stream": dense_macs / n / 1e9,
            "sparse_gmacs_per_stream": sparse.last_stats.macs / n / 1e9,
            "sparse_memory_mib_per_stream": memory / 2**20, "cuda_graphs": len(sparse._graphs) if cuda else 0,
            **extra,
        })
        sparse = fast = tiles_only = None  # free the engines (states, CUDA graphs) before the next fraction
        # each tile batch's shape is one more dynamo cache entry of the model's code: past the recompile
        # limit dynamo would run new shapes eagerly. On CUDA the compiled dense model keeps its captured
        # graph; on the CPU it compiles again in the next fraction's warm-up.
        torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,resnet101",
                        help=f"comma-separated, of {sorted(TRUNKS)} (d2_r50_fpn needs Detectron2)")
    parser.add_argument("--dtypes", default="fp16,fp32")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--fractions", default="0.1,0.3,0.5,1.0")
    parser.add_argument("--size", default="1024x2048", help="frame HxW (default 1024x2048)")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--frames", type=int, default=50, help="timed frames per measurement (median)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", default="benchmark.json")
    parser.add_argument("--profile", action="store_true",
                        help="add a per-kind GPU kernel time breakdown (on the CPU: convolutions against the rest)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the compiled dense baseline (its speed-up column then repeats eager + graph)")
    parser.add_argument("--no-compile-sparse", action="store_true",
                        help="skip the compiled block-sparse engine (compile=True)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads with --device cpu")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("tools/benchmark.py measures GPU speed and needs a CUDA device (or --device cpu)")
    if cuda:
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.split("x"))
    dtypes = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
    configs = [(m, d, int(n)) for m in args.models.split(",") for d in args.dtypes.split(",")
               for n in args.batches.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    environment = {
        "gpu": torch.cuda.get_device_name() if cuda else f"cpu, {args.threads} thread(s)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(), "size": f"{height}x{width}", "block": args.block,
        "frames": args.frames, "warmup": args.warmup,
    }
    rows = MeasuredRows(args.json, environment, markdown_table)  # the JSON rewritten after every configuration
    for model_name, dtype_name, n in tqdm(configs, desc="benchmark", unit="config"):
        measured = measure(model_name, dtypes[dtype_name], n, fractions, height, width, args.block,
                           args.frames, args.warmup, args.profile, not args.no_compile, not args.no_compile_sparse,
                           torch.device(args.device))
        tqdm.write(markdown_table(measured))
        for row in measured:
            rows.append(row)
    print(rows.summary())


def markdown_table(rows: list[dict]) -> str:
    """The results as a Markdown table (times are per frame, all N streams together)."""
    lines = ["| model | dtype | N | f | executed | compiled dense ms | dense (eager + graph) ms | "
             "compiled sparse ms | vs compiled dense | sparse (eager engine) ms | vs compiled dense | "
             "vs eager + graph | ideal | tiles-only ms | overhead ms | compiled tiles-only ms | compiled overhead ms | "
             "MiB/stream | kernels conv / tile / other ms | moves ms (CPU) |", "|" + " --- |" * 20]
    for r in rows:
        kernels = (f"{r['kernel_ms_convolution']:.2f} / {r['kernel_ms_tile_kernels']:.2f} / "
                   f"{r['kernel_ms_other']:.2f}" if "kernel_ms_convolution" in r else "-")
        moves = f"{r['moves_ms']:.2f} ({r['moves_vs_rest']:.0%} of the rest)" if "moves_ms" in r else "-"
        fast = (f"{r['compiled_sparse_ms']:.2f} | {r['compiled_speedup_vs_compiled']:.2f}x"
                if "compiled_sparse_ms" in r else "- | -")
        fast_tiles = (f"{r['compiled_tiles_only_ms']:.2f} | {r['compiled_overhead_ms']:.2f}"
                      if "compiled_tiles_only_ms" in r else "- | -")
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['fraction']:.4g} | {r['executed_fraction']:.3f} | "
            f"{r['compiled_dense_ms']:.2f} | {r['dense_ms']:.2f} | {fast} | {r['sparse_ms']:.2f} | "
            f"{r['speedup_vs_compiled']:.2f}x | {r['speedup']:.2f}x | {r['ideal_speedup']:.1f}x | "
            f"{r['tiles_only_ms']:.2f} | {r['overhead_ms']:.2f} | {fast_tiles} | "
            f"{r['sparse_memory_mib_per_stream']:.0f} | "
            f"{kernels} | {moves} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
