"""Detectron2's evaluation loop for BlockCopy on video: warm-up, evaluation over clips, results.

``tools/train_net.py`` is the thin script around these pieces:

* the datasets: :mod:`blockcopy_d2.data` registers the video datasets and, per ``evaluator_type``, their
  mappers and evaluators (:mod:`blockcopy_d2.data.catalog`); :func:`blockcopy_d2.data.sampler.build_clip_test_loader`
  gives each process whole clips, frames in order, ``TEST.CLIPS_PER_BATCH`` clips as as many streams;
* :func:`seed_for_policy`, :func:`load_weights`, :func:`warm_up_policy`: the policy starts from the
  seed, loads ``MODEL.BLOCKCOPY.POLICY_WEIGHTS`` if set, and trains on ``MODEL.BLOCKCOPY.WARMUP_CLIPS``
  clips of ``DATASETS.TRAIN`` (drawn in epochs of random order by
  :func:`blockcopy_core.protocol.warm_up`) before evaluation;
* a video meta-architecture (:class:`blockcopy_core.clips.VideoModel`: CenterNet's and the BlockCopy
  R-CNN, RetinaNet and semantic FPN) starts a new clip when the batch's clip ids change and keeps
  ``statistics``, ``annotated_statistics`` and ``unannotated_statistics`` (:class:`RunStatistics` of
  all time steps, of those with a scored frame, of the others) and, with a block policy, ``blockcopy``;
* :func:`evaluate_video_dataset`: ``inference_on_dataset`` with a progress bar, plus the model's
  statistics over the scored frames; :func:`write_results` and :func:`save_policy` write
  ``results.json`` and ``policy.pt`` to ``cfg.OUTPUT_DIR``.

Reproducibility: the block policy's initial weights and its samples come from torch's global RNG, as
in the main job (``tools/run_video.py``). The RNG is seeded with ``cfg.SEED`` right before
``build_model`` (the meta-architecture loads the detector without drawing from it), and the loaders
here draw their worker seeds from a private generator, so with the same seed and the same frames a
run repeats the main job's numbers exactly on the CPU.
"""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from blockcopy_core.blockcopy import RunStatistics
from blockcopy_core.clips import VideoModel
from blockcopy_core.protocol import format_statistics, warm_up, without_nan

from .data.catalog import video_dataset_type
from .data.sampler import build_clip_test_loader, clips_of

__all__ = ["build_video_evaluator", "evaluate_video_dataset", "load_weights", "save_policy", "seed_for_policy",
           "warm_up_policy", "write_results"]

logger = logging.getLogger(__name__)

def build_video_evaluator(cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluator:
    """The evaluator of ``dataset_name``'s type (default folder: ``cfg.OUTPUT_DIR/inference``)."""
    folder = output_folder if output_folder is not None else str(Path(cfg.OUTPUT_DIR) / "inference")
    return video_dataset_type(dataset_name).build_evaluator(cfg, dataset_name, folder)


def seed_for_policy(cfg: CfgNode) -> int:
    """Seed torch, numpy and random with ``cfg.SEED``; call right before ``build_model``, whose block policy
    draws its initial weights first. Every process gets the same seed (unlike ``default_setup``'s seed +
    rank), so all start from the same policy and warm up identically. Returns the seed used (with
    ``SEED < 0`` the one ``default_setup`` drew, left in place)."""
    if cfg.SEED < 0:
        return torch.initial_seed() % 2**31
    seed_all_rng(cfg.SEED)
    return cfg.SEED


def load_weights(cfg: CfgNode, model: torch.nn.Module) -> None:
    """Load ``MODEL.WEIGHTS`` into the task model and ``MODEL.BLOCKCOPY.POLICY_WEIGHTS`` into the policy.

    The meta-architecture already holds pretrained weights (for CenterNet, the COCO TFJS graph's), so an
    empty ``MODEL.WEIGHTS`` loads nothing; a path is a Detectron2 checkpoint of the task model alone
    (the keys of ``model.task_model`` where the meta-architecture has one, e.g. CenterNet's detector), read by
    ``DetectionCheckpointer``. ``POLICY_WEIGHTS`` is a file saved by
    :func:`save_policy` (``model.blockcopy.state_dict()``).
    """
    if cfg.MODEL.WEIGHTS:
        task_model = getattr(model, "task_model", model)  # the module the checkpoint's keys are relative to
        DetectionCheckpointer(task_model).load(cfg.MODEL.WEIGHTS)
    path = cfg.MODEL.BLOCKCOPY.POLICY_WEIGHTS
    if path:
        blockcopy = getattr(model, "blockcopy", None)
        if blockcopy is None:
            raise ValueError(f"MODEL.BLOCKCOPY.POLICY_WEIGHTS is set ({path}) but {type(model).__name__} has no "
                             "block policy (a dense meta-architecture)")
        if not Path(path).is_file():
            raise FileNotFoundError(f"MODEL.BLOCKCOPY.POLICY_WEIGHTS: no such file {path}")
        blockcopy.load_state_dict(torch.load(path, map_location=model.device, weights_only=False))
        logger.info(f"Loaded the block policy from {path}")


def _learns(model: torch.nn.Module) -> bool:
    blockcopy = getattr(model, "blockcopy", None)
    return blockcopy is not None and blockcopy.online_learning and any(True for _ in blockcopy.policy.parameters())


def warm_up_policy(cfg: CfgNode, model: torch.nn.Module, seed: int | None = None) -> dict[str, Any]:
    """Train the model's block policy on ``MODEL.BLOCKCOPY.WARMUP_CLIPS`` clips of ``DATASETS.TRAIN``.

    The clips are drawn in epochs of random order (seed ``seed``, default ``cfg.SEED``), each starting with
    a full frame, with a progress bar. Nothing happens for a dense model, a policy without weights
    (``random``, ``residual``, ...) or one with online learning off. Afterwards the model starts new clips
    and its statistics restart. Returns what ran (clips, frames, seconds).
    """
    num_clips = cfg.MODEL.BLOCKCOPY.WARMUP_CLIPS
    if not _learns(model) or num_clips == 0:
        return {"clips": 0, "frames": 0, "seconds": 0.0}
    if not cfg.DATASETS.TRAIN:
        raise ValueError(f"MODEL.BLOCKCOPY.WARMUP_CLIPS is {num_clips} but DATASETS.TRAIN names no warm-up clips")
    clips = []
    for name in cfg.DATASETS.TRAIN:
        mapper = video_dataset_type(name).build_mapper(cfg)
        clips += [[(mapper, record) for record in clip] for clip in clips_of(DatasetCatalog.get(name))]
    order_seed = (cfg.SEED if cfg.SEED >= 0 else torch.initial_seed() % 2**31) if seed is None else seed
    started = time.perf_counter()
    logger.info(f"Policy warm-up: {num_clips} clips drawn from the {len(clips)} of {list(cfg.DATASETS.TRAIN)}")
    runner = _ModelRunner(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():  # as in inference_on_dataset; the policy records its own autograd
        warm_up(runner, clips, num_clips, seed=order_seed, desc="policy warm-up",
                prepare=lambda item: [item[0](item[1])])
    model.train(was_training)
    return {"clips": num_clips, "frames": runner.frames, "seconds": time.perf_counter() - started}


class _ModelRunner:
    """:class:`blockcopy_core.protocol.Runner` over a video meta-architecture: a step is one forward of a
    batch of mapped inputs (the model's own pre- and post-processing included), ``reset`` its ``reset()``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.frames = 0

    @property
    def statistics(self) -> RunStatistics:
        return self.model.statistics

    def step(self, batched_inputs: list[dict]) -> list[dict]:
        self.frames += 1
        return self.model(batched_inputs)

    def reset(self) -> None:
        self.model.reset()

    def reset_statistics(self) -> None:
        self.model.reset_statistics()


class _Progress:
    """A loader with a tqdm bar (on the main process) that keeps ``len()`` for ``inference_on_dataset``."""

    def __init__(self, loader: DataLoader, desc: str) -> None:
        self.loader, self.desc = loader, desc

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        with tqdm(total=len(self.loader), desc=self.desc, unit="frame", dynamic_ncols=True,
                  disable=not comm.is_main_process()) as bar:
            for batch in self.loader:
                yield batch
                bar.update(len(batch))


def evaluate_video_dataset(cfg: CfgNode, model: torch.nn.Module, dataset_name: str) -> dict[str, Any]:
    """Run ``model`` over ``dataset_name`` with ``inference_on_dataset`` and its evaluator.

    Returns ``{"metrics": the evaluator's results, "statistics": the model's statistics over the annotated
    (scored) time steps, "unannotated_statistics": over the others (e.g. the warm-up frames that run again
    at the start of the evaluation clip), "frames", "wall_seconds"}``; statistics are summed over processes.
    """
    mapper = video_dataset_type(dataset_name).build_mapper(cfg)
    loader = build_clip_test_loader(cfg, dataset_name, cfg.TEST.CLIPS_PER_BATCH, mapper)
    evaluator = build_video_evaluator(cfg, dataset_name)
    video = isinstance(model, VideoModel)  # a plain Detectron2 model (a dense reference) has no statistics
    if video:
        model.reset()
        model.reset_statistics()
        if cfg.MODEL.BLOCKCOPY.INDEPENDENT_CLIPS:
            model.start_clips_from_current_policy()
    started = time.perf_counter()
    metrics = inference_on_dataset(model, _Progress(loader, dataset_name), evaluator)
    wall = time.perf_counter() - started
    annotated = comm.gather(model.annotated_statistics if video else RunStatistics())
    unannotated = comm.gather(model.unannotated_statistics if video else RunStatistics())
    if not comm.is_main_process():
        return {}
    result = {
        "metrics": metrics,  # as the evaluator returned them (NaN where a class has no ground truth)
        "statistics": without_nan(RunStatistics.total(annotated).as_dict()),
        "unannotated_statistics": without_nan(RunStatistics.total(unannotated).as_dict()),
        "wall_seconds": wall,
    }
    logger.info(f"{dataset_name}: {format_summary(result)}")
    return result


def format_summary(result: dict[str, Any]) -> str:
    """One line: the metrics, the executed fraction, GMACs and ms per frame of the scored frames."""
    stats = result["statistics"]
    metrics = "; ".join(f"{task}: " + ", ".join(f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}"
                                                  for key, value in values.items())
                        for task, values in result["metrics"].items())
    if not stats.get("frames"):
        return metrics
    return f"{metrics} | {stats['frames']} scored frames: {format_statistics(stats)}"


def save_policy(cfg: CfgNode, model: torch.nn.Module) -> Path | None:
    """Save the block policy (``model.blockcopy.state_dict()``) as ``cfg.OUTPUT_DIR/policy.pt``; None without one."""
    blockcopy = getattr(model, "blockcopy", None)
    if blockcopy is None or not comm.is_main_process():
        return None
    path = Path(cfg.OUTPUT_DIR) / "policy.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blockcopy.state_dict(), path)
    return path


def write_results(cfg: CfgNode, model: torch.nn.Module, results: dict[str, Any]) -> Path | None:
    """Write ``results`` with the run's setting to ``cfg.OUTPUT_DIR/results.json`` (main process only)."""
    if not comm.is_main_process():
        return None
    path = Path(cfg.OUTPUT_DIR) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "device": cfg.MODEL.DEVICE,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "seed": cfg.SEED,
        "blockcopy": _plain(cfg.MODEL.BLOCKCOPY) if hasattr(model, "blockcopy") else None,
        **without_nan(_plain(results)),
    }
    with open(path, "w") as handle:
        json.dump(document, handle, indent=2)
    return path


def _plain(value: Any) -> Any:
    """Config nodes, ordered dicts, tuples, paths -> JSON-friendly values."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value
