"""``cfg.MODEL.BLOCKCOPY``: BlockCopy's settings in a Detectron2 config."""
from __future__ import annotations

import os
from dataclasses import fields

import yaml
from detectron2 import model_zoo
from detectron2.config import CfgNode as CN

from blockcopy_core.config import BlockCopyConfig
from blockcopy_core.errors import ConfigError
from blockcopy_core.policy import POLICIES


def add_blockcopy_config(cfg: CN) -> None:
    """Add ``cfg.MODEL.BLOCKCOPY`` with the method's defaults; call it right after ``get_cfg()``.

    The first keys are the fields of :class:`blockcopy_core.BlockCopyConfig`, one to one (upper case);
    the last ones say what Detectron2 needs around them.
    """
    defaults = BlockCopyConfig()
    cfg.MODEL.BLOCKCOPY = CN()
    _C = cfg.MODEL.BLOCKCOPY
    # Block side in pixels; a multiple of the backbone's largest stride (128: an 8x16 grid at 2048x1024).
    _C.BLOCK_SIZE = defaults.block_size
    # Block policy: "rl" (online REINFORCE), "random", "residual", "lowfps", "all", "none".
    _C.POLICY = defaults.policy
    # tau, the target fraction of executed blocks, in (0, 1].
    _C.TARGET = defaults.target
    # Weight of the cost reward against the information-gain reward.
    _C.GAMMA = defaults.gamma
    # mu, momentum of the moving average of the executed fraction, in [0, 1).
    _C.COST_MOMENTUM = defaults.cost_momentum
    # Learning rate of the policy's RMSprop optimiser.
    _C.LR = defaults.lr
    # Weight decay of the policy's optimiser.
    _C.WEIGHT_DECAY = defaults.weight_decay
    # Frames per policy weight update.
    _C.UPDATE_INTERVAL = defaults.update_interval
    # On CUDA (or with COMPILE) the executed-block count is rounded up to a multiple of 1/BUCKETS of the grid.
    _C.BUCKETS = defaults.buckets
    # Capture each bucket's block-sparse forward as a CUDA graph (CUDA only).
    _C.CUDA_GRAPHS = defaults.cuda_graphs
    # Run frames that execute every block as the plain dense model.
    _C.DENSE_WHEN_FULL = defaults.dense_when_full
    # Run each bucket's frame as one program compiled by inductor (compiles on first use).
    _C.COMPILE = defaults.compile
    # Training clips the policy learns on before evaluation (the method's 400).
    _C.WARMUP_CLIPS = defaults.warmup_clips
    # Keep updating the policy while evaluating (as the method does).
    _C.ONLINE_LEARNING = defaults.online_learning
    # On CUDA, replay the policy, O_t, information gain and update as CUDA graphs ("rl" policy only).
    _C.CAPTURE_LOOP = defaults.capture_loop
    # With CAPTURE_LOOP, compile those stages with inductor first (seconds of compilation per clip shape).
    _C.COMPILE_LOOP = defaults.compile_loop
    # The backbone the BlockCopy backbone wraps (a BACKBONE_REGISTRY name).
    _C.BACKBONE = "build_resnet_fpn_backbone"
    # Policy weights to load after the model's checkpoint ("" = start from scratch); saved beside it.
    _C.POLICY_WEIGHTS = ""
    # Detections below this score are ignored by the information gain and the policy's input masks.
    _C.IG_SCORE_THRESHOLD = 0.3
    # Each evaluation clip starts from the warmed-up policy, its samples seeded by the clip id: results no
    # longer depend on the order or the process of the clips (several GPUs give one GPU's results), at the
    # price of the method's online learning across clips (it still learns within each clip).
    _C.INDEPENDENT_CLIPS = False
    # Video evaluation: this many clips run at once, as as many streams of one batch.
    cfg.TEST.CLIPS_PER_BATCH = 1


def blockcopy_config(cfg: CN) -> BlockCopyConfig:
    """The :class:`BlockCopyConfig` of ``cfg.MODEL.BLOCKCOPY`` (validated: a value out of range raises
    :class:`blockcopy_core.ConfigError` naming the key)."""
    node = cfg.MODEL.BLOCKCOPY
    try:
        config = BlockCopyConfig.from_dict({f.name: node[f.name.upper()] for f in fields(BlockCopyConfig)})
    except ConfigError as error:  # name the key as the user wrote it
        raise ConfigError(f"MODEL.BLOCKCOPY.{error.name.upper()}", error.value, error.expected) from None
    if config.policy not in POLICIES:
        raise ConfigError("MODEL.BLOCKCOPY.POLICY", config.policy, f"one of the registered policies {sorted(POLICIES)}")
    return config


MODEL_ZOO_PREFIX = "detectron2://"
"""``_BASE_: detectron2://Cityscapes/mask_rcnn_R_50_FPN.yaml`` names a config of Detectron2's model zoo
(shipped with Detectron2), as ``MODEL.WEIGHTS: detectron2://...`` names its checkpoints."""


def merge_config_file(cfg: CN, path: str) -> None:
    """``cfg.merge_from_file(path)`` where the ``_BASE_`` chain may end in Detectron2's model zoo.

    Each file overrides its ``_BASE_`` (a path relative to the file, or ``detectron2://<zoo config>``),
    so a BlockCopy config is a few lines over the model-zoo config it accelerates.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    chain = []
    while True:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
        base = values.pop("_BASE_", None)
        chain.append(CN(values))
        if base is None:
            break
        if base.startswith(MODEL_ZOO_PREFIX):
            cfg.merge_from_file(model_zoo.get_config_file(base[len(MODEL_ZOO_PREFIX):]))
            break
        parent, path = path, os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"_BASE_ {base!r} of config {parent}: no such file {path}")
    for values in reversed(chain):
        cfg.merge_from_other_cfg(values)
