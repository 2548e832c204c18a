"""Block policies: which blocks of a frame the task network executes (method.md §2 and §4)."""
from .base import BlockPolicy
from .baselines import AllPolicy, LowFpsPolicy, NonePolicy, RandomPolicy, ResidualPolicy, blocks_for_target
from .factory import POLICIES, build_policy, policy_from_config, register_policy
from .network import PolicyNet
from .observation import PolicyObservation, block_grid_shape
from .reinforce import (
    ReinforcePolicy,
    Rewards,
    action_log_prob,
    block_rewards,
    reinforce_loss,
    update_cost_average,
)

__all__ = [
    "AllPolicy",
    "BlockPolicy",
    "LowFpsPolicy",
    "NonePolicy",
    "POLICIES",
    "PolicyNet",
    "PolicyObservation",
    "RandomPolicy",
    "ReinforcePolicy",
    "ResidualPolicy",
    "Rewards",
    "action_log_prob",
    "block_grid_shape",
    "block_rewards",
    "blocks_for_target",
    "build_policy",
    "policy_from_config",
    "register_policy",
    "reinforce_loss",
    "update_cost_average",
]
