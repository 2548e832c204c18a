"""One configuration schema for BlockCopy: what ``cfg.MODEL.BLOCKCOPY`` and ``blockcopy=dict(...)`` map onto.

:class:`BlockCopyConfig` holds every setting of the method with the published defaults (method.md
sections 1, 4). The engine (:func:`blockcopy_core.convert`), the policy
(:func:`blockcopy_core.policy.build_policy`) and :class:`blockcopy_core.BlockCopy` are all built from it,
so the Detectron2 and MMDetection plugins map their config keys onto its fields one to one
(``BLOCK_SIZE`` <-> ``block_size``, ...): :meth:`BlockCopyConfig.from_dict` takes either spelling.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Mapping

from .errors import ConfigError


@dataclass(frozen=True)
class BlockCopyConfig:
    """The settings of BlockCopy, with the method's defaults.

    Attributes:
        block_size: block side in pixels (128 at 2048x1024, an 8x16 grid); must be a multiple of the
            model's largest stride and divide the (padded) frame size.
        policy: block policy by name: ``rl`` (online REINFORCE), ``random``, ``residual``, ``lowfps``,
            ``all``, ``none``, or one added with :func:`blockcopy_core.policy.register_policy`.
        target: tau, the target fraction of executed blocks, in (0, 1].
        gamma: weight of the cost reward (R = R_IG + gamma * R_cost).
        cost_momentum: mu, momentum of the moving average of the executed fraction, in [0, 1).
        lr: learning rate of the policy's RMSprop optimiser.
        weight_decay: weight decay of the policy's optimiser.
        update_interval: frames per policy weight update (the REINFORCE terms of these frames are
            averaged into one step).
        buckets: on CUDA the executed-block count is rounded up to a multiple of 1/buckets of the grid,
            so that only ``buckets`` shapes occur (one CUDA graph each).
        cuda_graphs: capture each bucket's sparse forward as a CUDA graph (CUDA only).
        dense_when_full: run a frame that executes every block as the plain dense model.
        compile: run each bucket's frame as one program compiled by inductor (elementwise ops fused
            with the tile moves; see :mod:`blockcopy_core.compiled`). Buckets compile on first use.
        warmup_clips: training clips the policy learns on before evaluation (the method's 400).
        online_learning: keep updating the policy while evaluating (the method does).
        capture_loop: on CUDA, replay the online loop (policy, O_t, information gain, rewards, update)
            as CUDA graphs (:mod:`blockcopy_core.captured_loop`); needs the ``rl`` policy and an adapter
            whose results have fixed shapes (``capturable``, or padded by ``fixed_result``).
        compile_loop: with ``capture_loop``, compile the loop's stages with inductor before capturing
            them (fewer, fused kernels; some seconds of compilation per clip shape).
    """

    block_size: int = 128
    policy: str = "rl"
    target: float = 0.3
    gamma: float = 5.0
    cost_momentum: float = 0.9
    lr: float = 1e-4
    weight_decay: float = 1e-3
    update_interval: int = 4
    buckets: int = 16
    cuda_graphs: bool = True
    dense_when_full: bool = True
    compile: bool = False
    warmup_clips: int = 400
    online_learning: bool = True
    capture_loop: bool = False
    compile_loop: bool = False

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, minimum=1)
        if not isinstance(self.policy, str) or not self.policy:
            raise ConfigError("policy", self.policy, "a policy name such as 'rl' or 'random'")
        _check_number("target", self.target, lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]")
        _check_number("gamma", self.gamma, lambda v: v >= 0.0, "a number >= 0")
        _check_number("cost_momentum", self.cost_momentum, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
        _check_number("lr", self.lr, lambda v: v > 0.0, "a number > 0")
        _check_number("weight_decay", self.weight_decay, lambda v: v >= 0.0, "a number >= 0")
        _check_int("update_interval", self.update_interval, minimum=1)
        _check_int("buckets", self.buckets, minimum=1)
        _check_int("warmup_clips", self.warmup_clips, minimum=0)
        for name in ("cuda_graphs", "dense_when_full", "compile", "online_learning", "capture_loop", "compile_loop"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "True or False")
        if self.compile_loop and not self.capture_loop:
            raise ConfigError("compile_loop", True, "False without capture_loop=True (it compiles the captured stages)")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "BlockCopyConfig":
        """A config from a mapping whose keys are the field names in any case (``BLOCK_SIZE`` or
        ``block_size``); missing keys keep their defaults, unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        settings = {}
        for key, value in values.items():
            name = str(key).lower()
            if name not in known:
                raise ConfigError(str(key), value, f"one of the BlockCopy settings {sorted(known)}")
            settings[name] = value
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict, field names as keys."""
        return asdict(self)

    def replace(self, **changes: Any) -> "BlockCopyConfig":
        """A copy with some settings changed (validated again)."""
        return replace(self, **changes)

    def engine_options(self) -> dict[str, Any]:
        """Keyword settings of :func:`blockcopy_core.convert`."""
        return {"cuda_graphs": self.cuda_graphs, "dense_when_full": self.dense_when_full, "buckets": self.buckets,
                "compile": self.compile}


def input_divisibility(block_size: int, size_divisibility: int = 0) -> int:
    """The multiple frames must be padded to: lcm of the block size and the model's size divisibility.

    Frameworks pad their batches to ``size_divisibility`` (Detectron2's ``ImageList.from_tensors``,
    MMDetection's ``pad_size_divisor``); block-sparse execution also needs whole blocks.
    """
    return math.lcm(block_size, max(int(size_divisibility), 1))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, value, f"an integer >= {minimum}")


def _check_number(name: str, value: Any, valid: Callable[[float], bool], expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not valid(value):
        raise ConfigError(name, value, expected)
