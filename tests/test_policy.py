"""Tests for blockcopy_core.policy: shapes, the REINFORCE arithmetic by hand, update cadence, resuming,
online learning on a synthetic task, and the baselines.

Tolerance: rewards and losses are a handful of fp32 operations on O(1) values, so 1e-5 absolute is
tight; results without arithmetic (grids, counts, restored states) are compared exactly.
"""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockcopy_core.policy.network import area_resize
from blockcopy_core.policy import (
    POLICIES,
    AllPolicy,
    LowFpsPolicy,
    NonePolicy,
    PolicyNet,
    PolicyObservation,
    RandomPolicy,
    ReinforcePolicy,
    ResidualPolicy,
    action_log_prob,
    block_rewards,
    blocks_for_target,
    build_policy,
    reinforce_loss,
    update_cost_average,
)

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def observation(streams, grid_h, grid_w, block_size, classes=1, seed=0):
    """A random observation of ``streams`` streams on a grid_h x grid_w grid of block_size-px blocks."""
    gen = torch.Generator().manual_seed(seed)
    height, width = grid_h * block_size, grid_w * block_size
    return PolicyObservation(
        frame=torch.rand(streams, 3, height, width, generator=gen),
        frame_state=torch.rand(streams, 3, height, width, generator=gen),
        prev_output=torch.rand(streams, classes, height // 4, width // 4, generator=gen),
        prev_grid=torch.rand(streams, 1, grid_h, grid_w, generator=gen) < 0.5,
    )


def rl_policy(target=0.3, block_size=32, **kwargs):
    """A small ReinforcePolicy for one-class outputs (narrow widths keep the CPU tests fast)."""
    return ReinforcePolicy(block_size, target, output_channels=1, widths=(8, 16, 16, 32), **kwargs)


def parameters(policy):
    return [p.detach().clone() for p in policy.parameters()]


def same(first, second):
    return all(torch.equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------- observation and network


def test_observation_rejects_bad_inputs():
    obs = observation(2, 2, 3, 32)
    with pytest.raises(ValueError, match="frame must be"):
        PolicyObservation(obs.frame[:, :1], obs.frame_state, obs.prev_output, obs.prev_grid)
    with pytest.raises(ValueError, match="frame_state"):
        PolicyObservation(obs.frame, obs.frame_state[..., :32], obs.prev_output, obs.prev_grid)
    with pytest.raises(ValueError, match="prev_output"):
        PolicyObservation(obs.frame, obs.frame_state, obs.prev_output[:1], obs.prev_grid)
    with pytest.raises(ValueError, match="bool"):
        PolicyObservation(obs.frame, obs.frame_state, obs.prev_output, obs.prev_grid.float())
    wrong_grid = PolicyObservation(obs.frame, obs.frame_state, obs.prev_output, obs.prev_grid[..., :2])
    with pytest.raises(ValueError, match="prev_grid"):
        RandomPolicy(32, 0.5).select(wrong_grid)
    with pytest.raises(ValueError, match="not divisible"):
        RandomPolicy(48, 0.5).select(obs)


@pytest.mark.parametrize(
    "height, width, block_size, grid",
    [(256, 512, 64, (4, 8)), (576, 768, 64, (9, 12)), (1152, 1536, 128, (9, 12)), (96, 160, 32, (3, 5))],
)
def test_policy_net_gives_one_logit_per_block(height, width, block_size, grid):
    target = 0.3
    net = PolicyNet(output_channels=2, block_size=block_size, initial_target=target)
    obs = observation(2, height // block_size, width // block_size, block_size, classes=2)
    with torch.no_grad():
        logits = net(obs.frame, obs.frame_state, obs.prev_output, obs.prev_grid)
    assert logits.shape == (2, 1, *grid)
    assert logits.dtype == torch.float32
    # The zero-initialised head makes every block start at probability tau.
    torch.testing.assert_close(torch.sigmoid(logits), torch.full_like(logits, target), rtol=0, atol=ATOL)


def test_policy_net_rejects_sizes_not_divisible_by_block():
    net = PolicyNet(output_channels=1, block_size=64)
    frame = torch.rand(1, 3, 100, 128)
    with pytest.raises(ValueError, match="not divisible by the block size 64"):
        net(frame, frame, torch.rand(1, 1, 25, 32), torch.zeros(1, 1, 1, 2, dtype=torch.bool))
    frame = torch.rand(1, 3, 128, 128)
    with pytest.raises(ValueError, match="channels"):
        net(frame, frame, torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="prev_grid"):
        net(frame, frame, torch.rand(1, 1, 32, 32), torch.zeros(1, 1, 2, 1, dtype=torch.bool))


def conv_macs(module, *inputs):
    """Multiply-accumulates of all Conv2d layers in one forward of ``module`` on batch-1 inputs."""
    total = 0

    def count(conv, _, out):
        nonlocal total
        total += out.numel() * (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        module(*inputs)
    for hook in hooks:
        hook.remove()
    return total


@pytest.mark.parametrize(
    "height, width, block_size, classes, gmacs",
    [(1024, 2048, 128, 19, 0.598), (1024, 2048, 128, 1, 0.428), (576, 768, 64, 19, 0.504)],
)
def test_policy_net_cost(height, width, block_size, classes, gmacs):
    """The figures in PolicyNet's docstring (the paper's policy: about 6.5 GMACs at 2048x1024)."""
    net = PolicyNet(classes, block_size)
    obs = observation(1, height // block_size, width // block_size, block_size, classes=classes)
    macs = conv_macs(net, obs.frame, obs.frame_state, obs.prev_output, obs.prev_grid)
    assert macs / 1e9 == pytest.approx(gmacs, abs=5e-4)


# ---------------------------------------------------------------- interface shared by all policies


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_selects_a_bool_grid_per_stream(name):
    kwargs = {"output_channels": 1, "widths": (8, 16, 16, 32)} if name == "rl" else {}
    policy = build_policy(name, 32, 0.5, **kwargs)
    obs = observation(3, 2, 5, 32)
    for _ in range(3):
        grid = policy.select(obs)
        assert grid.shape == (3, 1, 2, 5)
        assert grid.dtype == torch.bool
        stats = policy.observe(torch.rand(3, 1, 2, 5))
        assert stats["executed_fraction"] == grid.float().mean()
    policy.reset()


def test_build_policy_and_target_validation():
    with pytest.raises(ValueError, match="registered policies"):
        build_policy("oracle", 32, 0.5)
    with pytest.raises(TypeError):
        build_policy("rl", 32, 0.5)
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            RandomPolicy(32, bad)
    policy = RandomPolicy(32, 0.5)
    policy.target = 0.25
    assert policy.target == 0.25
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        policy.target = 2.0
    with pytest.raises(ValueError, match="mu"):
        rl_policy(mu=1.0)


def test_observe_checks_its_input():
    policy = rl_policy()
    with pytest.raises(RuntimeError, match="select"):
        policy.observe(torch.zeros(2, 1, 2, 3))
    policy.select(observation(2, 2, 3, 32))
    with pytest.raises(ValueError, match="information_gain"):
        policy.observe(torch.zeros(2, 1, 3, 2))
    policy.reset()
    with pytest.raises(RuntimeError, match="select"):
        policy.observe(torch.zeros(2, 1, 2, 3))


# ---------------------------------------------------------------- REINFORCE arithmetic by hand


def test_rewards_and_loss_functions_by_hand():
    logits = torch.tensor([[[[-1.0, 0.5, 2.0]]], [[[0.0, 1.0, -2.0]]]])
    actions = torch.tensor([[[[1.0, 0.0, 1.0]]], [[[0.0, 0.0, 1.0]]]])
    ig = torch.tensor([[[[0.2, 0.7, 0.0]]], [[[1.0, 0.1, 0.4]]]])
    tau, gamma, mu = 0.4, 5.0, 0.9
    previous = torch.tensor([0.5, 0.2])

    m = [0.1 * (2 / 3) + 0.9 * 0.5, 0.1 * (1 / 3) + 0.9 * 0.2]
    loss = 0.0
    expected_rewards = []
    for n in range(2):
        row = []
        for b in range(3):
            executed = actions[n, 0, 0, b].item() == 1.0
            sign = 1.0 if executed else -1.0
            reward = sign * ig[n, 0, 0, b].item() + gamma * sign * (tau - m[n])
            p = 1.0 / (1.0 + math.exp(-logits[n, 0, 0, b].item()))
            loss -= reward * math.log(p if executed else 1.0 - p) / 2
            row.append(reward)
        expected_rewards.append([[row]])

    cost_average = update_cost_average(actions, previous, mu)
    torch.testing.assert_close(cost_average, torch.tensor(m), rtol=0, atol=ATOL)
    rewards = block_rewards(actions, ig, cost_average, tau, gamma)
    torch.testing.assert_close(rewards.total, torch.tensor(expected_rewards), rtol=0, atol=ATOL)
    torch.testing.assert_close(rewards.total, rewards.information + gamma * rewards.cost, rtol=0, atol=ATOL)
    computed = reinforce_loss(action_log_prob(logits, actions), rewards.total)
    assert computed.item() == pytest.approx(loss, abs=ATOL)


def test_policy_loss_and_gradient_by_hand():
    """Constant logit b (zero head weight): loss, cost average and d loss / d b of two frames by hand."""
    tau, gamma, mu, bias = 0.3, 5.0, 0.9, 0.4
    policy = rl_policy(target=tau, gamma=gamma, mu=mu, update_every=1)
    with torch.no_grad():
        policy.net.head.bias.fill_(bias)
    p = 1.0 / (1.0 + math.exp(-bias))
    ig = torch.tensor([[[[0.9, 0.0, 0.3]]], [[[0.1, 0.5, 0.0]]]])
    torch.manual_seed(3)
    previous_m = [tau, tau]
    for _ in range(2):
        grid = policy.select(observation(2, 1, 3, 32))
        stats = policy.observe(ig)
        loss = grad = 0.0
        m = []
        for n in range(2):
            executed = grid[n, 0, 0].tolist()
            m.append((1 - mu) * sum(executed) / 3 + mu * previous_m[n])
            for b, a in enumerate(executed):
                sign = 1.0 if a else -1.0
                reward = sign * ig[n, 0, 0, b].item() + gamma * sign * (tau - m[n])
                loss -= reward * math.log(p if a else 1.0 - p) / 2
                grad -= reward * ((1.0 if a else 0.0) - p) / 2
        assert stats["loss"].item() == pytest.approx(loss, abs=ATOL)
        assert stats["cost_average"].item() == pytest.approx(sum(m) / 2, abs=ATOL)
        assert stats["updated"]
        # RMSprop applies weight decay to a copy, so .grad is the plain gradient of the loss.
        assert policy.net.head.bias.grad.item() == pytest.approx(grad, abs=ATOL)
        with torch.no_grad():
            policy.net.head.bias.fill_(bias)
            policy.net.head.weight.zero_()
        previous_m = m


def test_cost_average_survives_clips_and_restarts_for_new_stream_count():
    policy = rl_policy(target=0.5)
    policy.select(observation(2, 2, 2, 32))
    first = policy.observe(torch.zeros(2, 1, 2, 2))["cost_average"]
    policy.reset()
    grid = policy.select(observation(2, 2, 2, 32, seed=1))
    second = policy.observe(torch.zeros(2, 1, 2, 2))["cost_average"]
    executed = grid.float().mean().item()
    assert second.item() == pytest.approx(0.1 * executed + 0.9 * first.item(), abs=ATOL)
    grid = policy.select(observation(3, 2, 2, 32))
    third = policy.observe(torch.zeros(3, 1, 2, 2))["cost_average"]
    assert third.item() == pytest.approx(0.1 * grid.float().mean().item() + 0.9 * 0.5, abs=ATOL)


# ---------------------------------------------------------------- update cadence, eval mode, resuming


def test_weights_change_exactly_every_fourth_frame():
    policy = rl_policy()
    ig = torch.rand(2, 1, 2, 3)
    for cycle in range(2):
        before = parameters(policy)
        for frame in range(4):
            policy.select(observation(2, 2, 3, 32, seed=4 * cycle + frame))
            stats = policy.observe(ig)
            assert stats["updated"] == (frame == 3)
            assert same(before, parameters(policy)) == (frame < 3)


@pytest.mark.parametrize("caller_mode", [torch.no_grad, torch.inference_mode])
def test_policy_learns_inside_a_callers_no_grad_or_inference_mode(caller_mode):
    policy = rl_policy(update_every=2)
    before = parameters(policy)
    with caller_mode():
        obs = observation(2, 2, 3, 32)
        information_gain = torch.rand(2, 1, 2, 3)
        for _ in range(2):
            policy.select(obs)
            stats = policy.observe(information_gain)
    assert stats["updated"]
    assert not same(before, parameters(policy))


def test_eval_mode_freezes_the_policy():
    policy = rl_policy().eval()
    before = parameters(policy)
    for frame in range(8):
        grid = policy.select(observation(2, 2, 3, 32, seed=frame))
        assert not policy.observe(torch.rand(2, 1, 2, 3))["updated"]
        assert grid.dtype == torch.bool
    assert same(before, parameters(policy))


def run_frames(policy, frames, seed):
    """Select/observe ``frames`` frames with IG = change since the frame state; returns the stats."""
    torch.manual_seed(seed)
    stats = []
    for frame in range(frames):
        obs = observation(2, 2, 3, 32, seed=100 + frame)
        grid = policy.select(obs)
        information_gain = (obs.frame - obs.frame_state).abs().amax(dim=1, keepdim=True)
        stats.append(policy.observe(torch.nn.functional.max_pool2d(information_gain, 32)))
        assert grid.shape == (2, 1, 2, 3)
    return stats


def test_state_dict_round_trip_resumes_identically():
    trained = rl_policy(lr=1e-3)
    run_frames(trained, 8, seed=0)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)

    resumed = rl_policy(lr=1e-3)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    weights_only = rl_policy(lr=1e-3)
    weights_only.net.load_state_dict(trained.net.state_dict())

    expected = run_frames(trained, 4, seed=1)
    got = run_frames(resumed, 4, seed=1)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    assert same(parameters(trained), parameters(resumed))
    # Without the optimiser state and cost average the same frames give a different update.
    run_frames(weights_only, 4, seed=1)
    assert not same(parameters(trained), parameters(weights_only))


# ---------------------------------------------------------------- learning


def test_policy_learns_to_execute_high_information_blocks():
    """IG = 1 on the left half (where the content changes every frame), 0 on the static right half.

    The policy starts at p = 0.1 and tau is then raised to 0.5 at run time. REINFORCE raises p for
    a high-IG block while 1 + gamma (tau - M) > 0, i.e. M < 0.7, and lowers it for a zero-IG block
    while M > tau: the policy should end executing almost all left blocks and few right ones, at an
    executed fraction between tau = 0.5 and 0.7, far from the initial 0.1. 300 updates at lr 1e-3
    get there within about 100 (it is there by frame 100 for every seed tried); the margins below
    leave room for the sampling noise of the last 100 frames (400 blocks each side).
    """
    torch.manual_seed(0)
    streams, grid_h, grid_w, block_size = 2, 2, 4, 32
    height, width = grid_h * block_size, grid_w * block_size
    policy = rl_policy(target=0.1, lr=1e-3, update_every=1)
    policy.target = 0.5
    information_gain = torch.zeros(streams, 1, grid_h, grid_w)
    information_gain[..., : grid_w // 2] = 1.0
    grid = torch.zeros(streams, 1, grid_h, grid_w, dtype=torch.bool)
    left, right = [], []
    for _ in range(300):
        frame = torch.full((streams, 3, height, width), 0.5)
        frame_state = frame.clone()
        frame[..., : width // 2] = torch.rand(streams, 3, height, width // 2)
        frame_state[..., : width // 2] = torch.rand(streams, 3, height, width // 2)
        prev_output = torch.zeros(streams, 1, height // 4, width // 4)
        grid = policy.select(PolicyObservation(frame, frame_state, prev_output, grid))
        assert policy.observe(information_gain)["updated"]
        left.append(grid[..., : grid_w // 2].float().mean().item())
        right.append(grid[..., grid_w // 2 :].float().mean().item())
    left_rate, right_rate = sum(left[-100:]) / 100, sum(right[-100:]) / 100
    assert left_rate > 0.85
    assert right_rate < 0.3
    assert 0.4 < (left_rate + right_rate) / 2 < 0.75


# ---------------------------------------------------------------- baselines


def test_blocks_for_target_rounds_halves_up():
    assert [blocks_for_target(t, 10) for t in (0.0, 0.04, 0.05, 0.25, 0.3, 1.0)] == [0, 0, 1, 3, 3, 10]


@pytest.mark.parametrize("policy_class", [RandomPolicy, ResidualPolicy])
@pytest.mark.parametrize("target", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_fixed_cost_policies_execute_round_tau_b_blocks_per_stream(policy_class, target):
    policy = policy_class(32, target)
    for seed in range(3):
        grid = policy.select(observation(4, 3, 5, 32, seed=seed))
        counts = grid.flatten(1).sum(dim=1)
        assert counts.tolist() == [blocks_for_target(target, 15)] * 4
        policy.observe(torch.zeros(4, 1, 3, 5))


def test_residual_policy_picks_the_most_changed_blocks():
    frame_state = torch.zeros(2, 3, 64, 96)
    frame = frame_state.clone()
    frame[0, :, :32, 64:] = 0.9  # stream 0: block (0, 2) changed strongly everywhere
    frame[0, :, 40:48, 0:32] = 1.0  # stream 0: block (1, 0) changed on 1/4 of its rows
    frame[0, 0, 32:, 32:64] = 0.3  # stream 0: block (1, 1) changed a little, one channel
    frame[1, :, 32:, 64:] = 0.5  # stream 1: block (1, 2)
    frame[1, :, :, :4] = 1.0  # stream 1: blocks (0, 0) and (1, 0), a thin strip
    prev_grid = torch.zeros(2, 1, 2, 3, dtype=torch.bool)
    obs = PolicyObservation(frame, frame_state, torch.zeros(2, 1, 16, 24), prev_grid)
    grid = ResidualPolicy(32, 0.5).select(obs)  # 3 of 6 blocks
    expected = torch.zeros(2, 1, 2, 3, dtype=torch.bool)
    expected[0, 0, 0, 2] = expected[0, 0, 1, 0] = expected[0, 0, 1, 1] = True
    expected[1, 0, 1, 2] = expected[1, 0, 0, 0] = expected[1, 0, 1, 0] = True
    assert torch.equal(grid, expected)
    grid = ResidualPolicy(32, 1 / 6).select(obs)
    assert grid[0, 0, 0, 2] and grid[1, 0, 1, 2] and grid.sum() == 2


@pytest.mark.parametrize("target, period", [(1.0, 1), (0.5, 2), (0.3, 3), (0.25, 4), (0.1, 10)])
def test_lowfps_policy_executes_every_kth_frame(target, period):
    policy = LowFpsPolicy(32, target)
    assert policy.period == period
    obs = observation(2, 2, 2, 32)
    for _ in range(2):
        executed = []
        for _ in range(12):
            grid = policy.select(obs)
            assert grid.all() or not grid.any()
            executed.append(bool(grid.all()))
            policy.observe(torch.zeros(2, 1, 2, 2))
        assert executed == [(frame % period == 0) for frame in range(1, 13)]
        policy.reset()


def test_lowfps_with_zero_target_never_executes():
    policy = LowFpsPolicy(32, 0.0)
    assert policy.period is None
    assert not any(policy.select(observation(1, 1, 1, 32)).any() for _ in range(5))


def test_all_and_none_policies():
    obs = observation(2, 3, 4, 32)
    assert AllPolicy(32, 0.3).select(obs).all()
    assert not NonePolicy(32, 0.3).select(obs).any()


@pytest.mark.parametrize("shape, size", [((2, 3, 64, 96), (16, 24)), ((1, 1, 4, 6), (16, 24)),
                                         ((2, 3, 48, 48), (48, 48)), ((1, 2, 30, 20), (16, 24)),
                                         ((1, 3, 64, 96), (32, 24))])
def test_area_resize_equals_area_interpolation(shape, size):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(area_resize(x, size), F.interpolate(x, size=size, mode="area"), rtol=1e-6, atol=1e-6)
