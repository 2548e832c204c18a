"""The main job: BlockCopy on real video, against dense execution and the baseline policies.

Runs CenterNet-MobileNetV3 (COCO) over PETS 2009 S2L1 (795 frames of 768x576 fixed-camera pedestrian
video with MOTChallenge ground truth):

* dense: the unchanged model on every full frame (the reference);
* for each tau in ``--taus`` and each method in ``--methods``: BlockCopy with that block policy
  (``rl``: the online REINFORCE policy; ``random``, ``residual``, ``lowfps``: baselines at the same
  target fraction).

The video is one clip: frame 1 is executed completely, every later frame block-sparse. Frames
1..``--warmup`` warm up; the metrics cover the frames after the warm-up only. As in the paper, the RL
policy is first trained offline, then keeps learning online: it makes ``--pretrain-epochs`` passes
over the warm-up frames cut into clips of ``--pretrain-clip`` frames (each starting with a full
frame), then runs the video like every other method, learning all the way through. Baselines run the
warm-up frames too, so that their state is comparable. No frame after the warm-up is ever used
before it is evaluated online. Person detections are scored against the considered ground-truth boxes, the
not-considered ones acting as ignore regions: log-average miss rate (MR) and AP50; agreement is the F1
of confident boxes (score >= 0.5) matched to the dense run's.

Writes to ``--output-dir``: ``results.json``, ``accuracy_vs_cost.png``, the mosaic video
``blockcopy_rl_tau0.3.mp4`` of the ``--vis-frames`` (plus one frame of it as PNG) and the learned
policies ``policy_rl_tau*.pt``. See docs/main_job.md.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from blockcopy_core.adapters import CenterNetAdapter  # noqa: E402
from blockcopy_core.blockcopy import BlockCopy, RunStatistics, StepResult  # noqa: E402
from blockcopy_core.data import (VideoReader, VideoWriter, boxes_for_frames, load_mot_ground_truth,  # noqa: E402
                                 load_mot_ignore_boxes, pets09_s2l1_paths)
from blockcopy_core.evaluation import (average_precision_50, detection_agreement,  # noqa: E402
                                       log_average_miss_rate)
from blockcopy_core.models.centernet import PERSON_CLASS, load_centernet  # noqa: E402
from blockcopy_core.protocol import DenseRunner, run_clips, warm_up, without_nan  # noqa: E402
from blockcopy_core.visualize import blockcopy_mosaic  # noqa: E402

BLOCK_SIZE = 64
"""64-px blocks on the native 768x576 frames: a 12x9 grid. 128-px blocks do not divide 576, and
upscaling to 1536x1152 for a 12x9 grid of 128-px blocks would cost 4x the MACs of the native size."""

METHODS = ("rl", "random", "residual", "lowfps")
VIS_METHOD = "rl"
VIS_TAU = 0.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.3, 0.5], help="target fractions tau")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="block policies to compare (dense always runs: it is the reference)")
    parser.add_argument("--frames", type=int, default=None,
                        help="use only the first FRAMES frames of the video (quick runs)")
    parser.add_argument("--warmup", type=int, default=300,
                        help="frames 1..WARMUP warm up; metrics cover the frames after them")
    parser.add_argument("--pretrain-epochs", type=int, default=3,
                        help="before its run, train the rl policy for this many passes over the warm-up "
                             "frames, cut into clips of --pretrain-clip frames in random order")
    parser.add_argument("--pretrain-clip", type=int, default=20,
                        help="clip length of the pre-training passes (each clip starts with a full frame)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="run dense under torch.compile (inductor, freezing; CUDA graphs on a GPU) and "
                             "BlockCopy with the compiled engine (compile=True), every bucket compiled "
                             "before the run, and on a GPU rl's captured loop compiled (compile_loop)")
    parser.add_argument("--buckets", type=int, default=None,
                        help="the engine's number of executed-block buckets on a GPU (default: the config's 16); "
                             "with --compile each is one program to compile (a CenterNet bucket took over 30 s "
                             "on an H200 machine)")
    parser.add_argument("--channels-last", action="store_true",
                        help="run every method's model and frames in channels_last memory order (on the CPU the "
                             "faster layout for both dense and block-sparse)")
    parser.add_argument("--eager-loop", action="store_true",
                        help="on a GPU, run rl's policy, decoding, IG and update eagerly instead of as CUDA graphs "
                             "(capture_loop)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch's intra-op parallelism (default: torch's, one per core); "
                             "use 1 on a machine busy with other work (there, 2 threads on 2 cores ran 10x "
                             "slower than 1)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs")
    parser.add_argument("--no-video", action="store_true", help="skip the visualisation video")
    parser.add_argument("--vis-frames", default="301-500",
                        help="1-based inclusive frame range FIRST-LAST of the visualisation video "
                             f"(the {VIS_METHOD} run at tau={VIS_TAU}); when the run stops before FIRST, "
                             "the first 200 evaluated frames")
    args = parser.parse_args(argv)
    try:
        first, last = (int(part) for part in args.vis_frames.split("-"))
    except ValueError:
        parser.error(f"--vis-frames must be FIRST-LAST, e.g. 301-500, got {args.vis_frames!r}")
    args.vis_range = (first, last)
    if any(not 0.0 < tau <= 1.0 for tau in args.taus):
        parser.error(f"--taus must lie in (0, 1], got {args.taus}")
    return args


def person_detections(step: StepResult) -> dict[str, torch.Tensor]:
    """Stream 0's person detections on the CPU: boxes (K, 4) x1y1x2y2, scores (K,)."""
    dets = step.result[0]
    keep = dets["labels"] == PERSON_CLASS
    return {"boxes": dets["boxes"][keep].cpu(), "scores": dets["scores"][keep].cpu()}


def run_one(method: str, tau: float | None, model, adapter, video: Path, args, num_frames: int,
            ground_truth: dict, vis: bool) -> dict:
    """Run one method over frames 1..num_frames as one clip; return its statistics and post-warm-up
    detections."""
    torch.manual_seed(args.seed)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    prepare = lambda frame: frame[None].to(args.device, torch.float32).contiguous(memory_format=layout)  # noqa: E731
    compile_seconds = 0.0
    if method == "dense":
        runner = DenseRunner(model, adapter, BLOCK_SIZE, compile=args.compile)
    else:
        capture_loop = method == "rl" and args.device.startswith("cuda") and not args.eager_loop
        buckets = {} if args.buckets is None else {"buckets": args.buckets}
        runner = BlockCopy(model, adapter, block_size=BLOCK_SIZE, policy=method, target=tau, compile=args.compile,
                           capture_loop=capture_loop, compile_loop=capture_loop and args.compile, **buckets)
        if args.compile:  # compile every bucket now, so that no timed frame compiles
            first = prepare(next(iter(VideoReader(video, 0, 1, as_tensor=True))))
            runner.sparse(first, torch.ones(1, 1, first.shape[-2] // BLOCK_SIZE, first.shape[-1] // BLOCK_SIZE,
                                            dtype=torch.bool, device=first.device))
            compile_seconds = sum(runner.sparse.warmup().values())
            runner.reset()
    label = "dense" if tau is None else f"{method} tau={tau:g}"
    if method == "rl" and args.pretrain_epochs:
        frames = list(VideoReader(video, 0, args.warmup, as_tensor=True))
        clips = [frames[start:start + args.pretrain_clip] for start in range(0, len(frames), args.pretrain_clip)]
        warm_up(runner, clips, args.pretrain_epochs * len(clips), seed=args.seed, prepare=prepare,
                desc=f"{label} pre-training")
    detections, warmup_stats, writer, still = [], None, None, None
    if vis:
        writer = VideoWriter(args.output_dir / f"blockcopy_{method}_tau{tau:g}.mp4", fps=7.0)
    start = time.perf_counter()
    video_clip = VideoReader(video, 0, num_frames, as_tensor=True)
    for _, index, frame, step in run_clips(runner, [video_clip], prepare=prepare, desc=label, total=num_frames):
        number = index + 1
        if number > args.warmup:
            detections.append(person_detections(step))
        elif number == args.warmup:
            warmup_stats = runner.statistics
            runner.reset_statistics()
        if writer is not None and args.vis_range[0] <= number <= args.vis_range[1]:
            mosaic = visualise(step, frame, runner.sparse.frame_state[0], runner.sparse.executed_grid[0, 0],
                               ground_truth.get(number), number, label)
            writer.write(mosaic)
            if number == (args.vis_range[0] + args.vis_range[1]) // 2:
                still = mosaic
    if writer is not None:
        writer.close()
        if still is not None:
            cv2.imwrite(str(args.output_dir / f"blockcopy_{method}_tau{tau:g}_frame.png"),
                        cv2.cvtColor(still, cv2.COLOR_RGB2BGR))
    if method == "rl":
        torch.save(runner.policy.state_dict(), args.output_dir / f"policy_rl_tau{tau:g}.pt")
    return {"method": method, "tau": tau, "statistics": runner.statistics, "warmup_statistics": warmup_stats,
            "detections": detections, "wall_seconds": time.perf_counter() - start,
            "compile_seconds": compile_seconds}


def visualise(step: StepResult, frame: torch.Tensor, frame_state: torch.Tensor, executed: torch.Tensor,
              ground_truth, number: int, label: str):
    """The mosaic of one frame (see :func:`blockcopy_mosaic`); ``executed``: the (Gh, Gw) blocks that ran."""
    dets = person_detections(step)
    confident = dets["scores"] >= 0.5
    ig_map = None if step.ig_map is None else step.ig_map[0]
    return blockcopy_mosaic(frame, step.grid[0, 0], frame_state, ig_map, dets["boxes"][confident],
                            dets["scores"][confident], ground_truth, title=f"#{number} {label}",
                            executed=executed)


def evaluate(run: dict, ground_truth: list | None, ignore: list | None, dense_detections: list) -> dict:
    """The row of one run: cost (post-warm-up frames), MR, AP50 (None without ground truth), agreement
    with dense, timings."""
    stats: RunStatistics = run["statistics"]
    warmup: RunStatistics | None = run["warmup_statistics"]
    agreement = detection_agreement(run["detections"], dense_detections)
    frames = max(stats.frames, 1)
    return {
        "method": run["method"],
        "tau": run["tau"],
        "executed_fraction": stats.executed_fraction,
        "selected_fraction": stats.policy_selected_fraction if stats.policy_total_blocks else 1.0,
        "warmup_executed_fraction": None if warmup is None else warmup.policy_executed_fraction,
        "gmacs_per_frame": stats.gmacs_per_frame(),
        "network_gmacs_per_frame": stats.gmacs_per_frame(include_policy=False),
        "policy_gmacs_per_frame": stats.policy_macs / 1e9 / frames,
        "miss_rate": None if ground_truth is None else log_average_miss_rate(run["detections"], ground_truth,
                                                                             ignore=ignore),
        "ap50": None if ground_truth is None else average_precision_50(run["detections"], ground_truth,
                                                                       ignore=ignore),
        "agreement_f1": agreement.f1,
        "agreement_precision": agreement.precision,
        "agreement_recall": agreement.recall,
        "ms_per_frame": stats.ms_per_frame(),
        "eval_frames": stats.frames,
        "wall_seconds": run["wall_seconds"],
        "compile_seconds": run["compile_seconds"],
    }


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the runs. Executed: the fraction of blocks run (on CUDA rounded up to the
    engine's buckets); selected: the fraction the policy chose (tau's target)."""
    header = ("| method | tau | executed (selected) | GMACs/frame (net + policy) | MR % | AP50 % | agreement F1 | "
              "ms/frame |")
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        tau = "-" if row["tau"] is None else f"{row['tau']:g}"
        gmacs = f"{row['gmacs_per_frame']:.3f} ({row['network_gmacs_per_frame']:.3f} + " \
                f"{row['policy_gmacs_per_frame']:.3f})"
        executed = f"{row['executed_fraction']:.3f} ({row['selected_fraction']:.3f})"
        mr, ap = (("n/a" if row[key] is None else f"{100 * row[key]:.2f}") for key in ("miss_rate", "ap50"))
        lines.append(f"| {row['method']} | {tau} | {executed} | {gmacs} | {mr} | {ap} | {row['agreement_f1']:.3f} | "
                     f"{row['ms_per_frame']['total']:.1f} |")
    return "\n".join(lines)


def format_timing_table(rows: list[dict]) -> str:
    """A Markdown table of the wall time per frame of each stage (the paper's Table 3 split)."""
    stages = ("policy", "network", "sparse_overhead", "postprocess", "information_gain", "update", "total")
    lines = ["| method | tau | " + " | ".join(stage.replace("_", " ") for stage in stages) + " |",
             "| --- | --- |" + " --- |" * len(stages)]
    for row in rows:
        tau = "-" if row["tau"] is None else f"{row['tau']:g}"
        times = row["ms_per_frame"]
        cells = ["in network" if times[stage] is None else f"{times[stage]:.2f}" for stage in stages]
        lines.append(f"| {row['method']} | {tau} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PLOT_PANELS = (("miss_rate", "log-average miss rate % (lower is better)"),
               ("ap50", "AP50 % (higher is better)"),
               ("agreement_f1", "agreement with dense, F1 % (higher is better)"))


def plot(rows: list[dict], path: Path) -> None:
    """Miss rate, AP50 (when there is ground truth) and agreement with dense against GMACs per frame
    (policy included), one line per method."""
    panels = [(key, title) for key, title in PLOT_PANELS if rows[0][key] is not None]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    axes = axes[0]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for method in methods:
        points = sorted((row for row in rows if row["method"] == method), key=lambda row: row["gmacs_per_frame"])
        xs = [row["gmacs_per_frame"] for row in points]
        style = {"marker": "*", "markersize": 14, "linestyle": "none"} if method == "dense" else {"marker": "o"}
        for axis, (key, _) in zip(axes, panels):
            axis.plot(xs, [100 * row[key] for row in points], label=method, **style)
            for x, row in zip(xs, points):
                if row["tau"] is not None:
                    axis.annotate(f"{row['tau']:g}", (x, 100 * row[key]), textcoords="offset points",
                                  xytext=(4, 4), fontsize=7)
    for axis, (_, title) in zip(axes, panels):
        axis.set_xlabel("GMACs per frame (task network + policy)")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle("CenterNet-MobileNetV3 on PETS09-S2L1, frames after warm-up (labels: tau)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def machine_description(device: str) -> dict:
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            processor = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                             processor)
    except OSError:
        pass
    return {"device": device, "cpu": processor, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}


def frames_to_show(requested: tuple[int, int], warmup: int, num_frames: int) -> tuple[int, int]:
    """The requested FIRST-LAST frames of the video, or, when none of them is run (a short
    ``--frames``), the first 200 evaluated frames."""
    first, last = requested
    if first > num_frames or last < 1 or first > last:
        return warmup + 1, min(num_frames, warmup + 200)
    return first, min(last, num_frames)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    video, gt_path = pets09_s2l1_paths(require_ground_truth=False)
    total = len(VideoReader(video))
    num_frames = total if args.frames is None else min(args.frames, total)
    if not 0 <= args.warmup < num_frames:
        raise SystemExit(f"--warmup {args.warmup} leaves no frames to evaluate among {num_frames}")
    eval_numbers = range(args.warmup + 1, num_frames + 1)
    if gt_path is None:
        print("warning: no ground truth for PETS09-S2L1 (gt.txt of MOTChallenge 2D MOT 2015, see "
              "docs/main_job.md): MR and AP50 are not computed, only the agreement with dense", file=sys.stderr)
        considered, ground_truth, ignore = {}, None, None
    else:
        considered = load_mot_ground_truth(gt_path)
        ground_truth = boxes_for_frames(considered, eval_numbers)
        ignore = boxes_for_frames(load_mot_ignore_boxes(gt_path), eval_numbers)
    args.vis_range = frames_to_show(args.vis_range, args.warmup, num_frames)
    model = load_centernet(device=args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    adapter = CenterNetAdapter(classes=(PERSON_CLASS,), decode_classes=(PERSON_CLASS,))
    print(f"PETS09-S2L1: frames 1-{num_frames} ({num_frames} of {total}), warm-up 1-{args.warmup}, "
          f"evaluated {eval_numbers.start}-{eval_numbers.stop - 1}; {BLOCK_SIZE}-px blocks; device {args.device}")

    started = time.perf_counter()
    dense = run_one("dense", None, model, adapter, video, args, num_frames, considered, vis=False)
    runs = [dense]
    for tau in args.taus:
        for method in args.methods:
            vis = not args.no_video and method == VIS_METHOD and math.isclose(tau, VIS_TAU)
            runs.append(run_one(method, tau, model, adapter, video, args, num_frames, considered, vis))
    rows = [without_nan(evaluate(run, ground_truth, ignore, dense["detections"])) for run in runs]
    wall = time.perf_counter() - started

    table = format_table(rows)
    timing_table = format_timing_table(rows)
    print(table)
    print(f"\nmilliseconds per frame by stage ({args.device}):")
    print(timing_table)
    print(f"total wall time {wall / 60:.1f} min")
    plot(rows, args.output_dir / "accuracy_vs_cost.png")
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(args.device),
        "config": {"video": video.name, "ground_truth": None if gt_path is None else gt_path.name,
                   "frames": num_frames, "warmup": args.warmup,
                   "evaluated_frames": [eval_numbers.start, eval_numbers.stop - 1], "taus": args.taus,
                   "methods": args.methods, "seed": args.seed, "threads": torch.get_num_threads(),
                   "block_size": BLOCK_SIZE, "compile": args.compile, "buckets": args.buckets,
                   "pretrain_epochs": args.pretrain_epochs, "pretrain_clip": args.pretrain_clip,
                   "ig_classes": list(adapter.classes), "ig_score_threshold": adapter.score_threshold},
        "runs": rows,
        "table": table,
        "timing_table": timing_table,
        "wall_seconds": wall,
    }
    with open(args.output_dir / "results.json", "w") as handle:
        json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
