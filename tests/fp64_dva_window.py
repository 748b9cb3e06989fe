"""dva_cartpole.py's window in fp64, for test_dva_gradients.py (Genesis runs one precision per process and the pytest
process runs fp32, where finite differences at the 1000 N scale are a few per cent off).

`window_check()` (run by fp64_gradients.py, in the suite's one fp64 process; or this file run as a script, which
prints its result as one JSON line) builds a 3-env fp64 cart-pole and returns: the actor loss of one window of
`rollout_window` (state mode), SHAC's loss written out by hand from a plain re-simulation of the same actions, the
step at which each env's return closed, and the gradient of the loss w.r.t. a few actor parameters by autograd
(`task.backward`, as the script) and by central finite differences. As a module, it is the set-up that the fp32
tests share.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dva_cartpole as dc  # noqa: E402
from common.utils import Episodes, FrameStack, RunningMeanStd  # noqa: E402

H = 12
ARGS = SimpleNamespace(horizon=H, gamma=0.99, obs="state", detach_state=False, frame_stack=3)
# One start per env ([x, theta], [xdot, thetadot]). Env 1 runs at 10 m/s towards the track's end (2.5 m), which it
# crosses a few steps into the window whatever the actor does (+-1000 N cannot stop it in time); env 2 starts
# TRUNCATE_AFTER steps before its time limit, so its return closes (bootstrapped) at step TRUNCATE_AFTER - 1.
START_QPOS = torch.tensor([[0.3, -2.8], [2.0, 0.2], [-0.5, 3.0], [0.0, 0.1]])
START_QVEL = torch.tensor([[0.5, 1.0], [10.0, 0.0], [-0.2, -0.5], [0.0, 0.3]])
TERMINATE_ENV, TRUNCATE_ENV, TRUNCATE_AFTER = 1, 2, 6
# (parameter, index): entries of the last layer, of the first and second hidden layers, and the exploration scale
CHECKED = [("mu.weight", (0, 0)), ("mu.weight", (0, 7)), ("mu.weight", (0, 19)), ("mu.bias", (0,)),
           ("mlp.0.weight", (3, 1)), ("mlp.0.weight", (10, 4)), ("mlp.3.weight", (5, 9)), ("logstd", (0,))]


def make_agent(task, seed: int = 0):
    """The script's actor (32, 32), a random target critic whose values are of the size of the returns, and a
    non-trivial normaliser."""
    torch.manual_seed(seed)
    actor = dc.Actor((task.critic_obs_dim,), task.act_dim, (32, 32))
    critic = dc.Critic(task.critic_obs_dim, (32, 32)).requires_grad_(False)
    with torch.no_grad():
        critic.net[-1].weight.mul_(30.0)
        critic.net[-1].bias.fill_(5.0)
    obs_rms = RunningMeanStd((task.critic_obs_dim,))
    obs_rms.update(torch.randn(200, task.critic_obs_dim) * torch.tensor([1.0, 2.0, 0.7, 0.7, 3.0]) + 0.3)
    return actor, critic, obs_rms


def start_window(task) -> Episodes:
    """Put every env at its start (START_*), env TRUNCATE_ENV near its time limit; returns fresh episodes."""
    n = task.num_envs
    task.set_state(START_QPOS[:n], START_QVEL[:n])
    task.progress[TRUNCATE_ENV] = task.max_episode_length - TRUNCATE_AFTER
    return Episodes.zeros(n)


class Recorder:
    """The actor, unchanged, keeping every action it returns (with retain_grad: d loss / d action after backward)."""

    def __init__(self, actor):
        self.actor, self.actions = actor, []

    def __call__(self, obs, deterministic: bool = False):
        action = self.actor(obs, deterministic)
        if action.requires_grad:
            action.retain_grad()
        self.actions.append(action)
        return action


def window(task, actor, critic, obs_rms, noise_seed: int = 1):
    """One window of the script's rollout_window from the fixed start, with the same exploration noise every time.
    Returns (loss, the window's buffers, the actions taken, the episodes)."""
    episode = start_window(task)
    recorder = Recorder(actor)
    torch.manual_seed(noise_seed)  # the actor's randn_like: the same eps in every evaluation
    loss, buffers, _ = dc.rollout_window(task, recorder, critic, obs_rms, FrameStack(3), ARGS, episode)
    return loss, buffers, recorder.actions, episode


def first_done(dones: torch.Tensor) -> list[int]:
    """The first step (H, N) at which each env's return closed."""
    return [int(dones[:, i].nonzero()[0]) for i in range(dones.shape[1])]


def shac_loss_by_hand(task, act, critic, obs_rms, horizon: int, gamma: float):
    """SHAC's actor loss written out env by env with plain task.step calls from the task's current state, `act(t)`
    giving step t's action (the actor on the current state, or a replay of recorded actions):
    -(sum_t gamma^t r_t + gamma^(k+1) V'(s_(k+1))) / (H N) over each env's steps up to the one, k, at which its
    return closes: its termination (no bootstrap), its time limit, or the window's last step.
    Returns (loss, differentiable where the actions are; the closing step per env)."""
    n = task.num_envs
    total, acc, closed_at = 0.0, [0.0] * n, [None] * n
    for t in range(horizon):
        reward, terminated, truncated = task.step(act(t))
        value = critic(obs_rms.normalize(task.critic_obs()))
        for i in range(n):
            if closed_at[i] is not None:
                continue
            acc[i] = acc[i] + gamma**t * reward[i]
            if terminated[i]:
                total, closed_at[i] = total + acc[i], t
            elif truncated[i] or t == horizon - 1:
                total, closed_at[i] = total + acc[i] + gamma ** (t + 1) * value[i], t
    return -total / (horizon * n), closed_at


def window_check() -> dict:
    from common.cartpole import CartpoleTask

    task = CartpoleTask(3, torch.device("cpu"), image_size=None, precision="64", seed=0)
    torch.set_default_dtype(torch.float64)  # the networks and the window's buffers too
    actor, critic, obs_rms = make_agent(task)
    params = dict(actor.named_parameters())

    loss, (_, _, _, dones, _), actions, _ = window(task, actor, critic, obs_rms)
    actor.zero_grad()
    task.backward(loss)  # as the script back-propagates
    autograd = [params[name].grad[idx].item() for name, idx in CHECKED]
    start_window(task)  # the same start, replayed with the same actions
    hand_loss, hand_closed_at = shac_loss_by_hand(task, lambda t: actions[t].detach(), critic, obs_rms, H, ARGS.gamma)

    eps, fd = 1e-5, []
    for name, idx in CHECKED:
        p = params[name]
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                original = p[idx].item()
                p[idx] = original + sign * eps
            values.append(window(task, actor, critic, obs_rms)[0].item())
            with torch.no_grad():
                p[idx] = original
        fd.append((values[0] - values[1]) / (2 * eps))
    task.cut_graph()
    return {"loss": loss.item(), "hand_loss": float(hand_loss), "closed_at": first_done(dones),
            "hand_closed_at": hand_closed_at, "autograd": autograd, "fd": fd,
            "params": [f"{name}{list(idx)}" for name, idx in CHECKED]}


if __name__ == "__main__":
    print(json.dumps(window_check()))
