"""The online-learned policy: Bernoulli actions from PolicyNet, trained with REINFORCE (method.md §4)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from .base import BlockPolicy
from .network import PolicyNet
from .observation import PolicyObservation


FRAME_STATISTICS = ("executed_fraction", "information_gain", "loss", "reward", "reward_information", "reward_cost",
                    "cost_average", "mean_prob")
"""The per-frame statistics of :meth:`ReinforcePolicy.observe` besides ``updated``."""


class Rewards(NamedTuple):
    """Per-block rewards, each (N, 1, Gh, Gw): ``total = information + gamma * cost``."""

    total: torch.Tensor
    information: torch.Tensor
    cost: torch.Tensor


def action_log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi_b(a_b) of Bernoulli(sigmoid(logit_b)) for (N, 1, Gh, Gw) logits and 0/1 float actions."""
    return actions * F.logsigmoid(logits) + (1.0 - actions) * F.logsigmoid(-logits)


def update_cost_average(actions: torch.Tensor, previous: torch.Tensor, mu: float) -> torch.Tensor:
    """(N,) M_t = (1 - mu) * C_t + mu * M_{t-1}, C_t the executed fraction of the (N, 1, Gh, Gw) actions."""
    return (1.0 - mu) * actions.mean(dim=(1, 2, 3)) + mu * previous


def block_rewards(
    actions: torch.Tensor,
    information_gain: torch.Tensor,
    cost_average: torch.Tensor,
    target: float,
    gamma: float,
) -> Rewards:
    """R_b = R_IG + gamma * R_cost with R_IG = +-IG_b and R_cost = +-(tau - M_t), + when a_b = 1.

    Args:
        actions: (N, 1, Gh, Gw) 0/1 float actions a_b.
        information_gain: (N, 1, Gh, Gw) IG_b.
        cost_average: (N,) M_t, the moving average of the executed fraction including frame t.
        target: tau.
        gamma: weight of the cost reward.
    """
    sign = 2.0 * actions - 1.0
    information = sign * information_gain
    cost = sign * (target - cost_average).view(-1, 1, 1, 1)
    return Rewards(information + gamma * cost, information, cost)


def reinforce_loss(log_probs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """L = -sum_b R_b log pi_b(a_b), summed over blocks and averaged over streams; (N, 1, Gh, Gw) inputs."""
    return -(rewards * log_probs).sum(dim=(1, 2, 3)).mean()


class ReinforcePolicy(BlockPolicy):
    """Samples a_b ~ Bernoulli(sigmoid(logit_b)) from a PolicyNet and learns online with REINFORCE.

    Training (``policy.train()``, the default, also during evaluation as in the paper): ``select``
    samples and keeps the graph of log pi(a); ``observe(IG)`` computes the rewards of that frame and
    back-propagates its loss term divided by ``update_every`` into the network's ``.grad``; every
    ``update_every`` observed frames one optimiser step is taken on the accumulated gradient (that of the
    mean of the frames' terms; the autograd graph of a frame is freed once observed). The loss is thus
    ``L = -1/(T N) sum_t sum_n sum_b R_b log pi_b(a_b)`` over the T = ``update_every`` frames and N
    streams: summed over blocks as in the paper, averaged over streams and frames so that the step
    does not depend on how many cameras share the policy. Frames keep accumulating across clips (their
    rewards are complete), so no data is lost at clip ends.
    Learning records autograd even when the caller runs under ``torch.no_grad()`` or
    ``torch.inference_mode()``, as a task network's inference usually does.
    ``policy.eval()`` freezes the policy: it still samples, records nothing and never updates.

    The cost average M is kept per stream. It starts at tau (no cost pressure until the policy's own
    executions move it) and is reinitialised to tau when the number of streams changes; ``reset()``
    keeps it, since it tracks the policy's recent cost, which carries over from clip to clip (the
    clips' first frames are the caller's decision and do not enter it).

    ``state_dict()`` holds the network (``net.*``) and, as extra state, the optimiser state and M, so
    a policy saved after an update (``stats["updated"]``) resumes exactly; gradients accumulated
    since the last update are not saved.

    Args:
        block_size: block side in pixels.
        target: tau in [0, 1], settable at run time.
        output_channels: C_out of the previous-output masks O_{t-1}.
        lr, weight_decay: RMSprop settings.
        gamma: weight of the cost reward.
        mu: momentum of the cost average, in [0, 1).
        update_every: observed frames per optimiser step.
        widths: PolicyNet channel widths.
    """

    def __init__(
        self,
        block_size: int,
        target: float,
        output_channels: int,
        *,
        lr: float = 1e-4,
        weight_decay: float = 1e-3,
        gamma: float = 5.0,
        mu: float = 0.9,
        update_every: int = 4,
        widths: tuple[int, int, int, int] = (32, 64, 128, 256),
    ) -> None:
        super().__init__(block_size, target)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"mu must be in [0, 1), got {mu}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.gamma = gamma
        self.mu = mu
        self.update_every = update_every
        self.net = PolicyNet(output_channels, block_size, widths, initial_target=target)
        self.optimizer = torch.optim.RMSprop(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        self._cost_average: torch.Tensor | None = None
        # set by a captured loop whose side stream may still write .grad, the weights and the optimiser state
        self.updates_in_flight: Callable[[], None] | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._observed = 0  # frames whose gradients are accumulated in .grad since the last step

    @classmethod
    def config_settings(cls, config, output_channels: int) -> dict:
        """C_out, and the learning settings of the config (lr, weight decay, gamma, mu, update interval)."""
        return {"output_channels": output_channels, "lr": config.lr, "weight_decay": config.weight_decay,
                "gamma": config.gamma, "mu": config.cost_momentum, "update_every": config.update_interval}

    @contextmanager
    def _autograd(self) -> Iterator[None]:
        """Autograd on while training, whatever the caller's grad or inference mode; off in eval mode."""
        if self.training:
            with torch.inference_mode(False), torch.enable_grad():
                yield
        else:
            with torch.no_grad():
                yield

    def _select(self, obs: PolicyObservation, grid_shape: tuple[int, int]) -> torch.Tensor:
        with self._autograd():
            actions, log_probs, probs = self.sample(obs)
        self._pending = (log_probs, probs)
        return actions.bool()

    def sample(self, obs: PolicyObservation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw a grid: (N, 1, Gh, Gw) 0/1 float actions, their log pi(a) (with autograd's graph when
        recording) and the detached execution probabilities. Runs without host synchronisation."""
        return self.draw(self.net(obs.frame, obs.frame_state, obs.prev_output, obs.prev_grid))

    @staticmethod
    def draw(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`sample` from the network's (N, 1, Gh, Gw) ``logits``."""
        probs = torch.sigmoid(logits).detach()
        actions = torch.bernoulli(probs)
        return actions, action_log_prob(logits, actions), probs

    def frame_loss(self, log_probs: torch.Tensor, actions: torch.Tensor, information_gain: torch.Tensor,
                   previous_cost: torch.Tensor, target: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    Rewards]:
        """One frame's REINFORCE loss, cost average M_t and rewards, without host synchronisation.

        Args:
            log_probs: (N, 1, Gh, Gw) log pi(a) of the frame's actions.
            actions: (N, 1, Gh, Gw) 0/1 float actions.
            information_gain: (N, 1, Gh, Gw) block IG.
            previous_cost: (N,) M_{t-1}.
            target: tau (a 0-dim tensor in CUDA graphs, so that a changed target reaches the replays).
        """
        cost_average = update_cost_average(actions, previous_cost, self.mu)
        rewards = block_rewards(actions, information_gain.to(actions.dtype), cost_average, target, self.gamma)
        return reinforce_loss(log_probs, rewards.total), cost_average, rewards

    def _observe(self, information_gain: torch.Tensor, grid: torch.Tensor) -> dict:
        log_probs, probs = self._pending
        self._pending = None
        with self._autograd():
            actions = grid.to(log_probs.dtype)
            loss, cost_average, rewards = self.frame_loss(log_probs, actions, information_gain,
                                                          self.previous_cost_average(actions), self.target)
            self._cost_average = cost_average
            updated = False
            if self.training and log_probs.requires_grad:
                self.start_accumulation()
                (loss / self.update_every).backward()
                updated = self.count_observed_frame()
        return {**self.frame_statistics(actions, information_gain, loss, rewards, cost_average, probs),
                "updated": updated}

    @staticmethod
    def frame_statistics(actions: torch.Tensor, information_gain: torch.Tensor, loss: torch.Tensor,
                         rewards: Rewards, cost_average: torch.Tensor, probs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frame's statistics as 0-dim detached tensors, in the order of :data:`FRAME_STATISTICS`."""
        values = (actions.mean(), information_gain.mean(), loss.detach(), rewards.total.mean(),
                  rewards.information.mean(), rewards.cost.mean(), cost_average.mean(), probs.mean())
        return dict(zip(FRAME_STATISTICS, values))

    def previous_cost_average(self, actions: torch.Tensor) -> torch.Tensor:
        """(N,) M_{t-1}: the running value, or tau for a first frame or a changed number of streams."""
        streams = actions.shape[0]
        if self._cost_average is None or self._cost_average.shape[0] != streams:
            return torch.full((streams,), self.target, dtype=actions.dtype, device=actions.device)
        return self._cost_average.to(actions.device, actions.dtype)

    @property
    def starts_interval(self) -> bool:
        """Whether the next observed frame is the first of an update interval."""
        return self._observed == 0

    @property
    def completes_interval(self) -> bool:
        """Whether the next observed frame completes an update interval (its observe steps the optimiser)."""
        return self._observed + 1 >= self.update_every

    def start_accumulation(self) -> None:
        """Before a frame's gradient is added to ``.grad``: zero it if the frame starts an update interval
        (zeroed in place, not dropped, since captured loops accumulate into these tensors; after an update
        ``.grad`` holds the gradient of that update until the next frame)."""
        if self.starts_interval:
            self.optimizer.zero_grad(set_to_none=False)

    def count_observed_frame(self, step: bool = True) -> bool:
        """Count a frame whose loss gradient was accumulated into the network's ``.grad``; take the optimiser
        step when ``update_every`` have been (returns whether it did; ``step=False``: the caller takes it)."""
        self._observed += 1
        if self._observed < self.update_every:
            return False
        if step:
            self.optimizer.step()
        self._observed = 0
        return True

    def _save_to_state_dict(self, *args, **kwargs) -> None:
        self.wait_for_updates()  # the network (saved after this) and the optimiser state must be final
        super()._save_to_state_dict(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.wait_for_updates()
        super()._load_from_state_dict(*args, **kwargs)

    def wait_for_updates(self) -> None:
        """Order the current CUDA stream after gradient and optimiser work still running on another stream
        (a captured loop's, :mod:`blockcopy_core.captured_loop`), before the weights are read or written."""
        if self.updates_in_flight is not None:
            self.updates_in_flight()

    def reset(self) -> None:
        """New clip: drop a selection awaiting feedback; keep weights, optimiser, M and accumulated gradients."""
        super().reset()
        self._pending = None

    def get_extra_state(self) -> dict[str, Any]:
        """Optimiser state and cost average, saved in ``state_dict()`` next to the network."""
        return {"optimizer": self.optimizer.state_dict(), "cost_average": self._cost_average}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``get_extra_state`` saved; drops gradients accumulated since the last update."""
        self.optimizer.load_state_dict(state["optimizer"])
        cost_average = state["cost_average"]
        device = self.net.head.weight.device
        self._cost_average = None if cost_average is None else cost_average.to(device)
        self._observed = 0
        self._pending = None
        self._last_grid = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, mu={self.mu}, update_every={self.update_every}"
