"""Building a policy by name (kept apart from base.py, which the policies themselves import)."""
from __future__ import annotations

from .base import BlockPolicy
from .baselines import AllPolicy, LowFpsPolicy, NonePolicy, RandomPolicy, ResidualPolicy
from .reinforce import ReinforcePolicy

POLICIES: dict[str, type[BlockPolicy]] = {
    "rl": ReinforcePolicy,
    "all": AllPolicy,
    "none": NonePolicy,
    "random": RandomPolicy,
    "residual": ResidualPolicy,
    "lowfps": LowFpsPolicy,
}
"""Policy names accepted by ``build_policy``."""


def build_policy(name: str, block_size: int, target: float, **kwargs) -> BlockPolicy:
    """The policy called ``name`` (see ``POLICIES``); ``kwargs`` go to its constructor.

    ``rl`` needs ``output_channels`` (C_out of O_{t-1}) and accepts ReinforcePolicy's settings.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](block_size, target, **kwargs)
