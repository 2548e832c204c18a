#!/usr/bin/env python
"""End-to-end speed of Detectron2 detectors (Mask R-CNN and RetinaNet R50-FPN) with and without BlockCopy.

Per model, dtype and number of streams N, on a synthetic 2048x1024 video (a fixed textured background with
moving boxes; float BGR frames in 0..255 already on the GPU), the median wall time per time step (one
``model(batched_inputs)`` call on all N frames, ``torch.cuda.synchronize`` before and after) of:

- ``eager_fp32_ms``: the plain Detectron2 model (``GeneralizedRCNN``, ``RetinaNet``) in fp32, eager, as
  Detectron2 runs it: normalisation and batching, network, proposals and ROI heads or decoding, NMS,
  ``detector_postprocess`` (with Mask R-CNN: masks pasted at full resolution); for orientation only;
- ``dense_eager_ms``: the same model in the benchmark dtype and channels_last, all eager;
- ``dense_ms`` (per tau): the baseline BlockCopy is compared with: the same model in the benchmark dtype
  and channels_last, the part BlockCopy runs block-sparse (the *trunk*: backbone with FPN and the dense
  head on its features: Mask R-CNN's RPN head, RetinaNet's classification and box subnets) compiled with
  :func:`blockcopy_core.protocol.compile_dense` (inductor, freezing, one CUDA graph; its outputs checked
  against the eager trunk's on the first frame), everything else as Detectron2 runs it. It is timed
  taking turns with BlockCopy on the same time steps (:func:`blockcopy_core.timing.interleaved_step_ms`),
  so that the machine's drifts (the host-bound post-processing runs 10-40 % slower for minutes at a
  time on a shared host) fall on both sides;
- ``dense_backbone_ms``: the compiled trunk alone on the normalised (N, 3, H, W) image batch, and
  ``dense_rest_ms = dense_ms - dense_backbone_ms``: normalisation and batching, anchors, proposals, ROI
  heads (box and mask heads, which BlockCopy runs dense too), decoding, NMS and post-processing;
- ``blockcopy[tau]``: the BlockCopy meta-architecture of the ``*_blockcopy_tau0.3`` config at target tau,
  ``rl`` policy learning online: policy, block-sparse trunk (``MODEL.BLOCKCOPY.COMPILE``: compiled programs
  in CUDA graphs per bucket), the dense rest, information gain and policy update, the loop captured in
  CUDA graphs and compiled (``CAPTURE_LOOP``, ``COMPILE_LOOP``; Detectron2's results padded to
  ``TEST.DETECTIONS_PER_IMAGE``: RetinaNet's box, Mask R-CNN's mask information gain) unless
  ``--eager-loop``. The frames form one clip per stream (``clip_id``); timed after the clip's dense first frame and
  the warm-up. ``ms_per_stage`` is BlockCopy's own split (``network`` there is all of Detectron2's work
  between the policy and the information gain; a mean, so a bucket compiled in a timed step shows there);
- ``ceiling`` (``--ceiling``): the compiled trunk on only the blocks BlockCopy executed (a batch of
  block-sized tiles, no state, compiled once more for that shape) plus ``dense_rest_ms``: what a
  block-sparse run could reach with no overhead at all.

``--stages`` adds ``dense_stages_ms``: the median time of each of Detectron2's inference stages in the dense
model (:func:`stage_medians`; ``other`` is the step minus its top-level stages: ``detector_postprocess``
and the host work between stages), with CUDA synchronised around each stage.

Before any timing, Mask R-CNN's mask head runs once for every batch size up to N x
``TEST.DETECTIONS_PER_IMAGE`` (:func:`warm_mask_head`): with ``cudnn.benchmark`` each new number of
detections is autotuned on first sight, which made most early frames 75-130 ms instead of 20 ms.

Weights are random (``torch.manual_seed(0)``; the BlockCopy model loads the plain model's state_dict):
the networks' speed does not depend on them, but the post-processing's (ROI heads, NMS, mask pasting) and
the information gain's do through the number of detections, which is reported per frame and stream (dense
/ BlockCopy) and is not a trained model's. fp16 is the whole model cast with ``.to(torch.float16)``;
Detectron2 decodes boxes in fp32 itself. ``--device cpu`` only checks that the script runs: nothing is
compiled there (the dense trunk runs eagerly, ``MODEL.BLOCKCOPY.COMPILE False``, no captured loop).
Prints a table per configuration and one of all at the end, and writes a JSON file.

    python tools/benchmark_d2.py --models maskrcnn,retinanet --dtypes fp16,fp32 --taus 0.3,0.5 --ceiling
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import blockcopy_d2  # noqa: E402,F401  (registers the meta-architectures)
from blockcopy_core.protocol import compile_dense  # noqa: E402
from blockcopy_core.timing import (MeasuredRows, PhaseLog, benchmark_environment, interleaved_step_ms,  # noqa: E402
                                   median_step_ms, print_top_operators, synchronize)
from blockcopy_d2.config import add_blockcopy_config, merge_config_file  # noqa: E402

CONFIGS = {"maskrcnn": ROOT / "configs/Cityscapes/mask_rcnn_R_50_FPN_blockcopy_tau0.3.yaml",
           "retinanet": ROOT / "configs/Cityscapes/retinanet_R_50_FPN_blockcopy_tau0.3.yaml"}
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}  # no bf16: torchvision's ROIAlign kernels lack it
LOOP_STAGES = ("policy", "information_gain", "update")


def blockcopy_config(name: str, tau: float, block: int, device: torch.device, compile_engine: bool,
                     fast_loop: bool):
    """The Detectron2 config of ``name``'s BlockCopy model at target ``tau``; ``fast_loop``: capture and
    compile the online loop."""
    cfg = get_cfg()
    add_blockcopy_config(cfg)
    merge_config_file(cfg, str(CONFIGS[name]))
    cfg.MODEL.DEVICE = str(device)
    cfg.MODEL.BLOCKCOPY.TARGET = tau
    cfg.MODEL.BLOCKCOPY.BLOCK_SIZE = block
    cfg.MODEL.BLOCKCOPY.COMPILE = compile_engine
    cfg.MODEL.BLOCKCOPY.CAPTURE_LOOP = fast_loop
    cfg.MODEL.BLOCKCOPY.COMPILE_LOOP = fast_loop
    return cfg


def plain_config(cfg):
    """The plain Detectron2 model of a BlockCopy config: the meta-architecture, backbone and proposal
    generator it wraps (for Mask R-CNN this is ``mask_rcnn_R_50_FPN_dense.yaml``)."""
    cfg = cfg.clone()
    cfg.MODEL.META_ARCHITECTURE = cfg.MODEL.META_ARCHITECTURE.removeprefix("BlockCopy")
    cfg.MODEL.BACKBONE.NAME = cfg.MODEL.BLOCKCOPY.BACKBONE
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = cfg.MODEL.PROPOSAL_GENERATOR.NAME.removeprefix("BlockCopy")
    return cfg


def synthetic_video(frames: int, n: int, height: int, width: int) -> list[torch.Tensor]:
    """(N, 3, H, W) uint8 BGR frames on the CPU: a smooth random background with fine texture, and 12
    pedestrian-sized (40x100) boxes of random colours per stream moving 8 px per frame (wrapping around)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    low = torch.rand(n, 3, height // 32, width // 32, generator=generator)
    smooth = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear")
    texture = torch.rand(n, 3, height, width, generator=generator)
    background = (200 * smooth + 55 * texture).to(torch.uint8)
    xs = torch.randint(0, width - 40, (n, 12), generator=generator)
    ys = torch.randint(0, height - 100, (n, 12), generator=generator)
    colours = torch.randint(0, 256, (n, 12, 3), dtype=torch.uint8, generator=generator)
    video = []
    for t in range(frames):
        frame = background.clone()
        for s in range(n):
            for x, y, colour in zip(xs[s].tolist(), ys[s].tolist(), colours[s]):
                x = (x + 8 * t) % (width - 40)
                frame[s, :, y:y + 100, x:x + 40] = colour[:, None, None]
        video.append(frame)
    return video


def batched_inputs(frame: torch.Tensor, clip: bool) -> list[dict]:
    """Detectron2's inputs of one time step: a dict per stream with the (3, H, W) image and the output
    size (that of the frame: nothing is resized); with ``clip`` also the stream's clip id, constant over
    the video, so that a BlockCopy model runs it as one clip per stream."""
    height, width = frame.shape[-2:]
    inputs = [{"image": image, "height": height, "width": width} for image in frame]
    if clip:
        for stream, item in enumerate(inputs):
            item["clip_id"] = f"stream{stream}"
    return inputs




def head_site(model: nn.Module) -> tuple[nn.Module, str, list[str]]:
    """Where the dense head BlockCopy runs block-sparse sits: its owner, attribute name and input
    feature names (R-CNN: the RPN's head; RetinaNet: its own head)."""
    if hasattr(model, "proposal_generator"):
        return model.proposal_generator, "rpn_head", list(model.proposal_generator.in_features)
    return model, "head", list(model.head_in_features)


class Trunk(nn.Module):
    """The part of a detector BlockCopy runs block-sparse, as one module of the normalised image batch.

    Takes (N, 3, H, W) images and returns ``(features, head_outputs)``: the backbone's dict of
    (N, C, H / s, W / s) feature maps and the head's outputs on them (two lists with one map per level:
    objectness or class logits, and box deltas).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        owner, name, self.head_in_features = head_site(model)
        self.backbone, self.head = model.backbone, getattr(owner, name)

    def forward(self, images: torch.Tensor):
        features = self.backbone(images)
        return features, self.head([features[f] for f in self.head_in_features])


class TrunkBackbone(nn.Module):
    """Stands in for ``model.backbone``: runs the whole trunk function, returns its features and leaves the
    head outputs for :class:`TrunkHead`. Detectron2 reads ``output_shape()``, ``size_divisibility`` and
    ``padding_constraints`` of its backbone: those are the original backbone's."""

    def __init__(self, backbone: nn.Module, trunk, pending: list):
        super().__init__()
        self.original, self.trunk, self.pending = backbone, trunk, pending

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features, head_outputs = self.trunk(images)
        self.pending.append(head_outputs)
        return features

    def output_shape(self):
        return self.original.output_shape()

    @property
    def size_divisibility(self) -> int:
        return self.original.size_divisibility

    @property
    def padding_constraints(self) -> dict:
        return self.original.padding_constraints


class TrunkHead(nn.Module):
    """Stands in for the dense head: returns what the trunk computed for the features it is given."""

    def __init__(self, pending: list):
        super().__init__()
        self.pending = pending

    def forward(self, features: list[torch.Tensor]):
        if len(self.pending) != 1:
            raise RuntimeError(f"the head expected the outputs of one trunk call, found {len(self.pending)}")
        return self.pending.pop()


@contextmanager
def trunk_substituted(model: nn.Module, trunk):
    """``model`` with its backbone and dense head replaced by ``trunk`` (a function of the normalised
    images returning ``(features, head_outputs)`` as :class:`Trunk`), restored afterwards; Detectron2's
    forward runs unchanged around it."""
    owner, name, _ = head_site(model)
    backbone, head, pending = model.backbone, getattr(owner, name), []
    model.backbone = TrunkBackbone(backbone, trunk, pending)
    setattr(owner, name, TrunkHead(pending))
    try:
        yield model
    finally:
        model.backbone = backbone
        setattr(owner, name, head)


# Detectron2's inference stages: (owner path, attribute); a module is timed by hooks, a method by wrapping it.
# The top-level ones partition a step (with the remainder as "other"); the nested ones split the ROI heads.
TOP_STAGES = (("", "preprocess_image"), ("", "backbone"), ("", "head"), ("", "forward_inference"),
              ("", "proposal_generator"), ("", "roi_heads"))
ROI_STAGES = (("roi_heads", "box_pooler"), ("roi_heads", "box_head"), ("roi_heads", "box_predictor"),
              ("roi_heads", "_forward_box"), ("roi_heads", "mask_pooler"), ("roi_heads", "mask_head"),
              ("roi_heads", "_forward_mask"))


@contextmanager
def stage_timer(model: nn.Module):
    """Times each of Detectron2's inference stages that ``model`` has (:data:`TOP_STAGES`, :data:`ROI_STAGES`),
    synchronising CUDA before and after each, while the context is open. Yields {stage: [ms per call]}."""
    times: dict[str, list[float]] = {}
    undo = []

    def clocked(name, fn):
        def call(*args, **kwargs):
            synchronize()
            began = time.perf_counter()
            result = fn(*args, **kwargs)
            synchronize()
            times.setdefault(name, []).append(1e3 * (time.perf_counter() - began))
            return result
        return call

    for path, name in TOP_STAGES + ROI_STAGES:
        owner = getattr(model, path, None) if path else model
        target = getattr(owner, name, None) if owner is not None else None
        if target is None:
            continue
        if isinstance(target, nn.Module):
            original = target.forward
            target.forward = clocked(name, original)
            undo.append(lambda target=target: delattr(target, "forward"))
        else:
            setattr(owner, name, clocked(name, target))
            undo.append(lambda owner=owner, name=name: delattr(owner, name))
    try:
        yield times
    finally:
        for restore in undo:
            restore()


def stage_medians(step, count: int, start: int, model: nn.Module) -> dict[str, float]:
    """Median ms of each inference stage of ``model`` over ``step(start .. start + count - 1)``, and of the
    whole step, with ``other`` = step - the top-level stages (host work between them, ``detector_postprocess``)."""
    with stage_timer(model) as times:
        total = median_step_ms(lambda i: step(start + i), count, 0)
    medians = {name: statistics.median(values) for name, values in times.items()}
    top = sum(medians.get(name, 0.0) for _, name in TOP_STAGES)
    return {**medians, "other": total - top, "step": total}


def detections(outputs: list[dict]) -> float:
    """Mean number of detections per stream of one time step's outputs."""
    return statistics.mean(len(output["instances"]) for output in outputs)


def warm_mask_head(model: nn.Module, max_batch: int) -> None:
    """Run Mask R-CNN's mask head (if any) once for every batch size 1 .. ``max_batch`` in the model's dtype,
    so that cuDNN's autotuning (``cudnn.benchmark``) of each new number of detections (tens of ms each,
    measured: 75-130 ms frames against 20 ms) is done before any timing, as it would be early in a long video."""
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is None or not getattr(roi_heads, "mask_on", False):
        return
    parameter = next(roi_heads.mask_head.parameters())
    channels = model.backbone.output_shape()[roi_heads.mask_in_features[0]].channels
    size = roi_heads.mask_pooler.output_size  # (S, S)
    for k in range(1, max_batch + 1):  # contiguous (k, C, S, S), as ROIPooler returns it
        roi_heads.mask_head.layers(torch.zeros(k, channels, *size, device=parameter.device, dtype=parameter.dtype))


@torch.no_grad()
def measure(name: str, dtype_name: str, n: int, taus: list[float], height: int, width: int, frames: int,
            warmup: int, block: int, ceiling: bool, device: torch.device, compile_engine: bool,
            fast_loop: bool, profile: bool = False, stages: bool = False, log=lambda message: None,
            measured=lambda row: None) -> dict:
    """One row (model, dtype, N) with a result per tau; ``log(message)`` is told each phase, ``measured(row)``
    is called after each tau with the row so far (with ``ceiling``, also before the ceiling is measured)."""
    dtype = DTYPES[dtype_name]
    title = f"{name} {dtype_name} N={n}"
    log(f"{title}: eager fp32")
    cuda = device.type == "cuda"
    configs = {tau: blockcopy_config(name, tau, block, device, compile_engine, fast_loop) for tau in taus}
    torch.manual_seed(0)
    plain = build_model(plain_config(configs[taus[0]])).eval()
    max_batch = n * configs[taus[0]].TEST.DETECTIONS_PER_IMAGE
    video = synthetic_video(warmup + frames, n, height, width)

    def steps(model, inputs, counts):
        def step(i):
            outputs = model(inputs[i])
            counts.append(detections(outputs))
        return step

    inputs = [batched_inputs(frame.to(device=device, dtype=torch.float32), clip=False) for frame in video]
    warm_mask_head(plain, max_batch)
    eager_ms = median_step_ms(steps(plain, inputs, []), frames, warmup)

    log(f"{title}: eager")
    plain.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    warm_mask_head(plain, max_batch)  # cuDNN's choices are per dtype and layout; BlockCopy's model shares them
    inputs = [batched_inputs(frame.to(device=device, dtype=dtype), clip=True) for frame in video]
    dense_eager_ms = median_step_ms(steps(plain, inputs, []), frames, warmup)
    # The trunk's input as Detectron2 makes it (normalised, padded, batched: a new NCHW tensor whatever the
    # layout of the frames), so that the compiled trunk sees the strides it is compiled for.
    images = plain.preprocess_image(inputs[0]).tensor
    weights = plain.state_dict()  # as the BlockCopy models load them (the substituted trunk renames them)
    eager_trunk = Trunk(plain)  # made before the substitution below, which it must not see
    log(f"{title}: compiling the dense trunk")
    started = time.perf_counter()
    trunk = compile_dense(eager_trunk, images) if cuda else eager_trunk  # checked against the eager trunk
    dense_counts = []
    with trunk_substituted(plain, trunk):
        dense_step = steps(plain, inputs, dense_counts)
        for i in range(warmup):
            dense_step(i)
        compile_s = time.perf_counter() - started
        backbone_ms = median_step_ms(lambda i: trunk(images), frames, warmup)
        if profile:
            print_top_operators(f"{name} {dtype_name} dense", lambda: steps(plain, inputs, [])(warmup))
        split = stage_medians(steps(plain, inputs, []), frames, warmup, plain) if stages else None
        row = {"model": name, "dtype": dtype_name, "streams": n, "engine": "compiled" if compile_engine else "eager",
               "loop": "compiled" if configs[taus[0]].MODEL.BLOCKCOPY.CAPTURE_LOOP else "eager",
               "eager_fp32_ms": eager_ms, "dense_eager_ms": dense_eager_ms, "dense_backbone_ms": backbone_ms,
               "compile_seconds": compile_s, "blockcopy": {}}
        if split is not None:
            row["dense_stages_ms"] = split
            print(f"{name} {dtype_name} N={n} dense stages (ms, synchronised around each): "
                  + ", ".join(f"{stage} {ms:.2f}" for stage, ms in split.items()), flush=True)
        for tau in taus:
            log(f"{title} tau {tau}: BlockCopy warm-up ({warmup} steps; buckets and the loop compile on first use)")
            torch.manual_seed(0)  # the policy's initial weights
            model = build_model(configs[tau])
            model.load_state_dict(weights, strict=True)
            model.to(device=device, dtype=dtype, memory_format=torch.channels_last)
            counts = []
            for i in range(warmup):  # the clip's dense first frame, then the warm-up (buckets compile on first use)
                model(inputs[i])
            model.reset_statistics()
            dense_counts.clear()
            log(f"{title} tau {tau}: {frames} timed steps, dense and BlockCopy in turns")
            # dense and BlockCopy take turns on each time step (the dense model keeps no state between frames)
            ms = interleaved_step_ms({"dense": dense_step, "blockcopy": steps(model, inputs, counts)}, frames, warmup)
            stats = model.statistics
            row["blockcopy"][tau] = {
                "ms": ms["blockcopy"], "dense_ms": ms["dense"], "dense_rest_ms": ms["dense"] - backbone_ms,
                "executed_fraction": stats.executed_fraction, "selected_fraction": stats.policy_selected_fraction,
                "ms_per_stage": stats.ms_per_frame(), "gmacs_per_frame": stats.gmacs_per_frame(),
                "detections_per_frame": statistics.mean(counts),
                "dense_detections_per_frame": statistics.mean(dense_counts),
                "speedup_vs_dense": ms["dense"] / ms["blockcopy"], "speedup_vs_eager_fp32": eager_ms / ms["blockcopy"],
            }
            if profile:  # after the statistics were read: the profiled step is not counted
                print_top_operators(f"{name} {dtype_name} BlockCopy tau {tau}",
                                    lambda: steps(model, inputs, [])(warmup + frames - 1))
            if ceiling:
                measured(row)  # on disk before the ceiling's compilation, which a time limit may cut short
                log(f"{title} tau {tau}: ceiling (compiling the trunk for the executed tiles)")
                executed = round(row["blockcopy"][tau]["executed_fraction"] * n * (height // block) * (width // block))
                tiles = torch.randn(max(executed, 1), 3, block, block, device=device, dtype=dtype)
                # a second shape of the same code would otherwise be compiled with dynamic shapes
                with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                    tiles_trunk = compile_dense(eager_trunk, tiles) if cuda else eager_trunk
                    tiles_ms = median_step_ms(lambda i: tiles_trunk(tiles), frames, warmup)
                ceiling_ms = tiles_ms + row["blockcopy"][tau]["dense_rest_ms"]
                row["blockcopy"][tau].update(ceiling_ms=ceiling_ms, ceiling_speedup=ms["dense"] / ceiling_ms)
            model = None  # its buffers and graphs go before the next tau's model is built
            if cuda:
                torch.cuda.empty_cache()
            measured(row)
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | dtype | N | engine / loop | eager fp32 ms | dense eager ms | dense backbone ms | tau | "
             "dense ms | dense rest ms | executed | BlockCopy ms | vs dense | vs eager fp32 | ceiling (vs dense) | "
             "of ceiling | policy+IG+update ms | detections (dense / BlockCopy) |", "|" + " --- |" * 18]
    for r in rows:
        for tau, b in r["blockcopy"].items():
            loop = sum(b["ms_per_stage"].get(stage, 0.0) for stage in LOOP_STAGES)
            ceiling = (f"{b['ceiling_speedup']:.2f}x | {b['speedup_vs_dense'] / b['ceiling_speedup']:.0%}"
                       if "ceiling_speedup" in b else "- | -")
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['streams']} | {r['engine']} / {r['loop']} | "
                f"{r['eager_fp32_ms']:.1f} | {r['dense_eager_ms']:.1f} | {r['dense_backbone_ms']:.1f} | {tau} | "
                f"{b['dense_ms']:.1f} | {b['dense_rest_ms']:.1f} | {b['executed_fraction']:.3f} | {b['ms']:.1f} | "
                f"{b['speedup_vs_dense']:.2f}x | {b['speedup_vs_eager_fp32']:.2f}x | {ceiling} | {loop:.1f} | "
                f"{b['dense_detections_per_frame']:.0f} / {b['detections_per_frame']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="maskrcnn,retinanet", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--dtypes", default="fp16,fp32", help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--streams", default="1", help="comma-separated numbers of streams N")
    parser.add_argument("--taus", default="0.3,0.5")
    parser.add_argument("--size", default="1024x2048", help="frame HxW")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--frames", type=int, default=30, help="timed time steps (median)")
    parser.add_argument("--warmup", type=int, default=15,
                        help="untimed steps first (compilation, CUDA graphs; BlockCopy: the clip's dense first frame)")
    parser.add_argument("--ceiling", action="store_true",
                        help="also time the compiled trunk on only the executed tiles (one more compilation per tau)")
    parser.add_argument("--device", default="cuda", help="cuda (speed); cpu only checks that the script runs")
    parser.add_argument("--eager-engine", action="store_true",
                        help="run BlockCopy's block-sparse engine eagerly instead of MODEL.BLOCKCOPY.COMPILE True "
                             "(whose buckets compile on first use: during the warm-up or, for rare ones, in a timed "
                             "step, which the median ignores)")
    parser.add_argument("--eager-loop", action="store_true",
                        help="run BlockCopy's policy, information gain and update eagerly instead of captured in CUDA "
                             "graphs and compiled (CAPTURE_LOOP, COMPILE_LOOP)")
    parser.add_argument("--profile", action="store_true",
                        help="print the operators taking the most device time in one dense and one BlockCopy step")
    parser.add_argument("--stages", action="store_true",
                        help="also time the dense side's inference stages (preprocessing, trunk, proposals, ROI heads "
                             "and their parts, decoding, the rest), CUDA synchronised around each")
    parser.add_argument("--json", default="benchmark_d2.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tools/benchmark_d2.py measures GPU speed and needs a CUDA device")
    height, width = (int(v) for v in args.size.split("x"))
    if height % args.block or width % args.block:
        raise SystemExit(f"--block {args.block} must divide the frame size {height}x{width}")
    if args.warmup < 1:
        raise SystemExit("--warmup must be at least 1 (BlockCopy's first frame of a clip runs dense, untimed)")
    cuda = args.device == "cuda"
    torch.backends.cudnn.benchmark = True
    environment = {**benchmark_environment(cuda), "size": f"{height}x{width}", "block": args.block,
                   "frames": args.frames, "warmup": args.warmup}
    rows, log = MeasuredRows(args.json, environment, markdown_table), PhaseLog()

    for name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            for n in (int(v) for v in args.streams.split(",")):
                rows.append(measure(name, dtype_name, n, [float(t) for t in args.taus.split(",")], height, width,
                                    args.frames, args.warmup, args.block, args.ceiling, torch.device(args.device),
                                    cuda and not args.eager_engine, cuda and not args.eager_loop, args.profile,
                                    args.stages, log, rows.measured))
                torch._dynamo.reset()
    print(rows.summary())


if __name__ == "__main__":
    main()
