"""Building a policy by name (kept apart from base.py, which the policies themselves import)."""
from __future__ import annotations

from typing import Any

from ..config import BlockCopyConfig
from ..errors import ConfigError
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
"""Policy names accepted by ``build_policy``; extend it with :func:`register_policy`."""


def register_policy(name: str, policy_class: type[BlockPolicy], *, replace: bool = False) -> None:
    """Make ``policy_class`` available by ``name`` (in ``build_policy`` and ``BlockCopyConfig.policy``).

    The class is built as ``policy_class(block_size, target, **policy_class.config_settings(config, C_out))``.

    Raises:
        TypeError: when ``policy_class`` is not a :class:`BlockPolicy` subclass.
        ValueError: when ``name`` is taken and ``replace`` is False.
    """
    if not (isinstance(policy_class, type) and issubclass(policy_class, BlockPolicy)):
        raise TypeError(f"policy {name!r} must be a BlockPolicy subclass, got {policy_class!r}")
    if name in POLICIES and not replace:
        raise ValueError(f"a policy named {name!r} is already registered ({POLICIES[name].__name__}); "
                         "pass replace=True to replace it")
    POLICIES[name] = policy_class


def build_policy(name: str, block_size: int, target: float, **kwargs) -> BlockPolicy:
    """The policy called ``name`` (see ``POLICIES``); ``kwargs`` go to its constructor.

    ``rl`` needs ``output_channels`` (C_out of O_{t-1}) and accepts ReinforcePolicy's settings.
    """
    if name not in POLICIES:
        raise ConfigError("policy", name, f"one of the registered policies {sorted(POLICIES)}")
    return POLICIES[name](block_size, target, **kwargs)


def policy_from_config(config: BlockCopyConfig, output_channels: int, **extra: Any) -> BlockPolicy:
    """The policy ``config.policy`` names, with the config's settings; ``extra`` constructor arguments
    (e.g. ``rl``'s ``widths``) on top. ``output_channels`` is C_out of the adapter's masks O_t."""
    if config.policy not in POLICIES:
        raise ConfigError("policy", config.policy, f"one of the registered policies {sorted(POLICIES)}")
    policy_class = POLICIES[config.policy]
    settings = {**policy_class.config_settings(config, output_channels), **extra}
    return policy_class(config.block_size, config.target, **settings)
