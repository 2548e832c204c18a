"""Evaluate BlockCopy models on video with Detectron2 (a thin script in the style of Detectron2's projects).

    python tools/train_net.py --config-file configs/PETS09/centernet_mnv3_blockcopy_tau0.3.yaml --eval-only
    python tools/train_net.py --config-file configs/PETS09/centernet_mnv3_dense.yaml --eval-only MODEL.DEVICE cpu

Builds the meta-architecture of the config (``blockcopy_d2.centernet``), loads its weights, warms the
block policy up on the clips of ``DATASETS.TRAIN``, evaluates on each of ``DATASETS.TEST`` with
Detectron2's ``inference_on_dataset`` and the dataset's evaluator, and writes ``results.json`` (metrics,
executed fraction, GMACs and ms per frame) and ``policy.pt`` to ``OUTPUT_DIR``. Only evaluation is
supported: BlockCopy accelerates pretrained models, and its policy trains itself online.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.evaluation import print_csv_format  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import blockcopy_d2.data  # noqa: E402,F401  (registers the video datasets)
from blockcopy_d2.centernet import TRAINING_NOT_SUPPORTED, add_centernet_config  # noqa: E402
from blockcopy_d2.config import add_blockcopy_config, merge_config_file  # noqa: E402
from blockcopy_d2.data import add_pets09_config, configure_video_datasets  # noqa: E402
from blockcopy_d2.engine import (evaluate_video_dataset, load_weights, save_policy, seed_for_policy,  # noqa: E402
                                 warm_up_policy, write_results)

logger = logging.getLogger("blockcopy_d2")


def build_config(config_file: str, opts: list[str]):
    """The frozen config of ``config_file`` and the ``KEY VALUE`` opts, with this repo's keys added
    (also used by ``tools/demo.py``)."""
    cfg = get_cfg()
    add_blockcopy_config(cfg)
    add_centernet_config(cfg)
    add_pets09_config(cfg)
    merge_config_file(cfg, config_file)  # _BASE_ may be a model-zoo config (detectron2://...)
    cfg.merge_from_list(opts)
    cfg.freeze()
    return cfg


def setup(args):
    """Create the config from the file and the command-line opts, and run Detectron2's default setup."""
    cfg = build_config(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="blockcopy_d2")
    configure_video_datasets(cfg)
    return cfg


def main(args):
    if not args.eval_only:
        raise SystemExit(f"tools/train_net.py: {TRAINING_NOT_SUPPORTED}")
    cfg = setup(args)
    seed_for_policy(cfg)  # the policy draws its initial weights in build_model
    model = build_model(cfg)
    load_weights(cfg, model)
    warmup = warm_up_policy(cfg, model)
    results = {"warmup": warmup, "datasets": {}}
    for dataset_name in cfg.DATASETS.TEST:
        results["datasets"][dataset_name] = evaluate_video_dataset(cfg, model, dataset_name)
    policy = save_policy(cfg, model)
    results["policy_weights"] = None if policy is None else policy.name  # beside results.json
    path = write_results(cfg, model, results)
    if path is not None:
        for result in results["datasets"].values():
            print_csv_format(result["metrics"])
        logger.info(f"Results written to {path}" + ("" if policy is None else f", the policy to {policy}"))
    return results


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
