"""The cart-pole task: rewards, terminations, the camera and the simulator's gradient."""

import math

import pytest
import torch

from common.cartpole import cartpole_reward, wrap_angle
from gradient_checks import gradient_error


def test_wrap_angle_at_plus_minus_pi():
    theta = torch.tensor([0.0, math.pi - 1e-3, math.pi + 1e-3, -math.pi - 1e-3, 3 * math.pi + 0.5, -0.2])
    expected = torch.tensor([0.0, math.pi - 1e-3, -math.pi + 1e-3, math.pi - 1e-3, -math.pi + 0.5, -0.2])
    assert torch.allclose(wrap_angle(theta), expected, atol=1e-5)


def test_reward_hand_computed():
    # theta = 3.5 wraps to 3.5 - 2 pi = -2.78319.
    x, xdot, theta, thetadot = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]), torch.tensor([3.5, 0.0]), \
        torch.tensor([1.0, 0.0])
    expected = torch.tensor([10 - (3.5 - 2 * math.pi) ** 2 - 0.1 * 1.0 - 0.05 * 1.0 - 0.1 * 4.0, 10.0])
    assert torch.allclose(cartpole_reward(x, xdot, theta, thetadot), expected, atol=1e-5)


def test_step_reward_termination_and_time_limit(task):
    qpos = torch.tensor([[0.0, 0.0], [2.6, 0.0], [-2.49, math.pi], [1.0, 3.5]])
    qvel = torch.zeros(4, 2)
    task.set_state(qpos, qvel)
    with torch.no_grad():
        reward, terminated, truncated = task.step(torch.zeros(4, 1))
    # One step of 1/60 s from rest moves nothing measurably but the hanging/tilted poles; recompute by hand.
    x, th = task.qpos[:, 0], task.qpos[:, 1]
    xd, thd = task.qvel[:, 0], task.qvel[:, 1]
    by_hand = [10 - ((th[i].item() + math.pi) % (2 * math.pi) - math.pi) ** 2 - 0.1 * thd[i].item() ** 2
               - 0.05 * x[i].item() ** 2 - 0.1 * xd[i].item() ** 2 for i in range(4)]
    assert torch.allclose(reward, torch.tensor(by_hand), atol=1e-4)
    assert reward[0].item() == pytest.approx(10.0, abs=1e-3)  # upright, centred, at rest
    assert terminated.tolist() == [False, True, False, False]  # |x| > 2.5 ends the episode
    assert not truncated.any()
    task.progress[:] = task.max_episode_length - 1
    with torch.no_grad():
        _, terminated, truncated = task.step(torch.zeros(4, 1))
    assert truncated.tolist() == [True, False, True, True]  # the terminated env is not also truncated
    task.reset()
    assert (task.progress == 0).all()
    assert (wrap_angle(task.qpos[:, 1]).abs() > math.pi - math.pi / 12 - 1e-4).all()  # starts hanging down


def test_evaluation_score_is_success_over_the_last_60_steps(task):
    """task.score_step / task.score, the success every script's evaluation reports: 1 for an env whose pole stays
    within 0.3 rad of upright over the last 60 of 240 steps and that is still alive at the end."""
    steps = task.max_episode_length
    # env 0 upright, env 1 at 0.35 rad, env 2 at -0.25 rad, env 3 upright but ended earlier (not alive)
    task.set_state(torch.tensor([[0.0, 0.0], [0.0, 0.35], [0.0, -0.25], [0.0, 0.0]]), torch.zeros(4, 2))
    alive = torch.tensor([True, True, True, False])
    assert task.score_step(steps - 61, steps, alive).tolist() == [0, 0, 0, 0]  # before the last 60: not counted
    per_step = task.score_step(steps - 60, steps, alive)
    assert per_step.tolist() == [0, 1, 0, 0]  # the 0.35 rad pole misses one of the last 60 steps
    assert task.score(60 * per_step, alive, steps).tolist() == [1, 0, 1, 0]
    assert task.score_name == "success"


def test_repeat_step_counts_each_env_until_it_ends(task):
    """Task.repeat_step (the pixel baselines' action repeat): rewards summed while alive, an env that ends at a sub-step
    stops counting there. Env 1 leaves the track at the first sub-step, env 2 reaches its time limit there."""
    qpos, qvel = torch.tensor([[0.0, 0.3], [2.6, 0.0], [0.0, -math.pi], [1.0, 0.0]]), torch.zeros(4, 2)
    actions = torch.tensor([[0.2], [0.0], [-0.5], [1.0]])
    with torch.no_grad():  # the same two steps by hand
        task.set_state(qpos, qvel)
        task.progress[2] = task.max_episode_length - 1
        (r1, term1, trunc1), (r2, _, _) = task.step(actions), task.step(actions)
        task.set_state(qpos, qvel)
        task.progress[2] = task.max_episode_length - 1
        reward, terminated, ended, steps = task.repeat_step(actions, 2)
    assert terminated.tolist() == [False, True, False, False] and ended.tolist() == [False, True, True, False]
    assert steps.tolist() == [2, 1, 1, 2]
    assert torch.allclose(reward, r1 + torch.where(term1 | trunc1, 0.0, r2))
    task.reset()


def test_run_episodes_holds_each_action_and_stops_when_every_env_has_ended(task):
    """Task.run_episodes, every script's evaluation: the policy decides every action_repeat steps (t = 0, 3, 6, ...),
    each env's return is its rewards summed until it ends, and the episodes stop once all have ended. Full force
    towards +x drives every cart off the track (2.5 m) within the 240 steps; the returns are checked against the same
    starts and actions stepped by hand."""
    decisions, push = [], torch.ones(4, 1)

    def policy(t):
        decisions.append(t)
        return push

    start = task.rng_state()
    returns, success = task.run_episodes(policy, task.max_episode_length, action_repeat=3)
    task.set_rng_state(start)  # the same starts, stepped by hand
    expected, alive, steps = torch.zeros(4), torch.ones(4, dtype=torch.bool), 0
    with torch.no_grad():
        task.reset()
        while alive.any():
            reward, terminated, _ = task.step(push)
            expected += torch.where(alive, reward, 0.0)
            alive &= ~terminated
            steps += 1
    assert steps < task.max_episode_length and decisions == list(range(0, steps, 3))
    assert torch.allclose(returns, expected) and success.tolist() == [0, 0, 0, 0]
    task.reset()


def test_camera_sees_the_cart_move(task):
    """The blue cart's pixel centroid moves right with x, and the images carry no gradient."""
    task.set_state(torch.tensor([[-1.5, 0.0], [0.0, 0.0], [1.5, 0.0], [0.0, -math.pi]]), torch.zeros(4, 2))
    images = task.render()
    assert images.shape == (4, 32, 64, 3) and images.dtype == torch.uint8
    assert not images.requires_grad and images.grad_fn is None
    img = images.float()
    blue = (img[..., 2] > 150) & (img[..., 0] < 120)
    cols = torch.arange(64).float()
    centroid = [(blue[i].float().sum(0) * cols).sum() / blue[i].sum() for i in range(3)]
    assert blue[:3].flatten(1).sum(1).min() > 4
    # |x| = 2.8 m fills half the width (32 px): 1.5 m is about 17 px.
    assert centroid[0] < 31.5 - 12 and abs(centroid[1] - 31.5) < 3 and centroid[2] > 31.5 + 12
    with torch.no_grad():  # a reset under no_grad (as in evaluation) must not give back a cached frame
        task.set_state(torch.tensor([[1.5, 0.0], [0.0, 0.0], [-1.5, 0.0], [0.0, -math.pi]]), torch.zeros(4, 2))
        moved = task.render().float()
    moved_blue = (moved[..., 2] > 150) & (moved[..., 0] < 120)
    assert ((moved_blue[0].float().sum(0) * cols).sum() / moved_blue[0].sum()) > 31.5 + 12
    orange = (img[..., 0] > 150) & (img[..., 2] < 100)
    rows = torch.arange(32).float()
    up_row = (orange[1].float().sum(1) * rows).sum() / orange[1].sum()
    down_row = (orange[3].float().sum(1) * rows).sum() / orange[3].sum()
    assert up_row < 14 and down_row > 18  # the upright pole is drawn above the rail, the hanging one below


def test_gradient_matches_finite_differences_with_a_termination(task):
    """d(sum of rewards over 10 steps)/d(actions), autograd through Genesis vs central differences (fp32) entry by
    entry (along random directions they are 2-5x noisier here, across the termination)."""
    steps = 10
    # Env 1 starts near the track's end moving outwards: it terminates at step 5 (|x| > 2.5).
    qpos = torch.tensor([[0.3, -2.8], [2.3, 0.2], [-0.5, 0.1], [0.0, 3.0]])
    qvel = torch.tensor([[0.5, 1.0], [3.0, 0.0], [-0.2, -0.5], [0.0, 0.3]])
    actions = 0.05 * torch.randn(steps, 4, 1, generator=torch.Generator().manual_seed(0))
    rel_err, grad = gradient_error(task, qpos, qvel, actions, eps=1e-2, directions=None)

    with torch.no_grad():  # where env 1 ended, by replaying the window
        task.set_state(qpos, qvel)
        ended_at = next(t for t in range(steps) if task.step(actions[t])[1][1])
    assert 2 <= ended_at <= steps - 3, "the test window must contain env 1's termination"
    assert (grad[ended_at + 1 :, 1] == 0).all(), "post-termination steps must contribute exactly zero"
    assert grad[: ended_at + 1, 1].abs().min() > 0
    assert rel_err <= 1e-3, f"relative error {rel_err:.2e}"
    task.reset()
