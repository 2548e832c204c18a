"""Evaluate an MMDetection detector, plain or accelerated by BlockCopy, in MMDetection's style.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options KEY=VALUE ...]
    python -m torch.distributed.run --nproc_per_node 2 tools/test.py CONFIG CHECKPOINT --launcher pytorch

The config is an MMDetection 3 config (``configs/CityPersons/`` holds CSP and MGAN, dense and BlockCopy);
CHECKPOINT an MMDetection 3 checkpoint of the plain detector (``tools/convert_pedestron.py`` converts
Pedestron's). mmengine's Runner does the rest: the test loop, the metric, the BlockCopy hook's warm-up,
statistics, ``blockcopy_results.json`` and ``policy.pt`` in the work directory.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from mmengine.config import Config, DictAction
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import blockcopy_mmdet  # noqa: E402,F401  (registers the models, datasets, metric, samplers and hook)
from blockcopy_mmdet.checkpoint import check_checkpoint  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Test an MMDetection detector (plain or BlockCopy) on video")
    parser.add_argument("config", help="config file")
    parser.add_argument("checkpoint", help="checkpoint of the plain detector (MMDetection 3 format)")
    parser.add_argument("--work-dir", help="where logs, results and the learned policy go "
                                           "(default: ./work_dirs/<config name>)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override config settings, e.g. model.blockcopy.target=0.5 "
                             "test_dataloader.dataset.max_clips=10")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                        help="job launcher: 'pytorch' for torch.distributed.run with several processes")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def build_config(args: argparse.Namespace) -> Config:
    """The config file with the command line's overrides, work directory, checkpoint and launcher."""
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist (convert a Pedestron checkpoint with "
                                "tools/convert_pedestron.py)")
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = str(Path("work_dirs") / Path(args.config).stem)
    cfg.load_from = args.checkpoint
    if args.launcher != "none" and not torch.cuda.is_available() and cfg.get("model_wrapper_cfg") is None:
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None)  # CPU processes
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Run the test; returns the metrics (on every process)."""
    args = parse_args(argv)
    if args.launcher == "pytorch" and not torch.cuda.is_available() and not dist.is_initialized():
        # mmengine's launcher binds each process to a GPU; without one, processes join over gloo on the CPU
        dist.init_process_group("gloo")
    runner = Runner.from_cfg(build_config(args))
    # mmengine loads checkpoints non-strictly: refuse one that does not fit instead of running half-random weights
    check_checkpoint(runner.model.module if is_model_wrapper(runner.model) else runner.model, args.checkpoint)
    return runner.test()


if __name__ == "__main__":
    main()
