"""The pieces of dva_cartpole.py that can be checked exactly: TD(lambda), the decoupled gradient, SHAC's loss; and
two pieces every script shares: the critic's minibatches and the settings of a resumed run."""

import importlib
import math
from copy import deepcopy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from common.encoder import Encoder
from common.utils import FrameStack, RunningMeanStd, resumed_args
from dva_cartpole import Actor, Critic, rollout_window
import fp64_dva_window as fw


def lambda_return_by_definition(rewards, next_values, dones, gamma, lam, t):
    """G^lambda_t = (1 - lam) sum_{n>=1} lam^(n-1) G^(n)_t, where every n-step return past the first done step k
    equals the full return to k (bootstrapped on next_values[k]); the weights of those sum to lam^(m-1)."""
    k = next(j for j in range(t, len(rewards)) if dones[j])
    m = k - t + 1

    def n_step(n):
        return sum(gamma**j * rewards[t + j] for j in range(n)) + gamma**n * next_values[t + n - 1]

    return (1 - lam) * sum(lam ** (n - 1) * n_step(n) for n in range(1, m)) + lam ** (m - 1) * n_step(m)


@pytest.mark.parametrize("script", ["dva_cartpole", "dva_locomotion", "shac_diffrender"])
def test_td_lambda_targets_match_the_definition(script):
    td_lambda_targets = importlib.import_module(script).td_lambda_targets  # each script's own copy
    gen = torch.Generator().manual_seed(0)
    h, n, gamma, lam = 9, 3, 0.97, 0.9
    rewards = torch.randn(h, n, generator=gen, dtype=torch.float64)
    next_values = torch.randn(h, n, generator=gen, dtype=torch.float64)
    dones = torch.zeros(h, n, dtype=torch.bool)
    dones[-1] = True
    dones[2, 0] = dones[5, 1] = dones[6, 1] = True  # env 0 ends early, env 1 twice, env 2 only at the window's end
    next_values[2, 0] = 0.0  # an early termination bootstraps on 0
    targets = td_lambda_targets(rewards, next_values, dones, gamma, lam)
    for i in range(n):
        for t in range(h):
            expected = lambda_return_by_definition(rewards[:, i].tolist(), next_values[:, i].tolist(),
                                                   dones[:, i].tolist(), gamma, lam, t)
            assert targets[t, i].item() == pytest.approx(expected, rel=1e-10, abs=1e-10), (t, i)
    # lam -> 0 is the one-step TD target, lam -> 1 the Monte-Carlo return to the first done step.
    one_step = td_lambda_targets(rewards, next_values, dones, gamma, 1e-9)
    assert torch.allclose(one_step, rewards + gamma * next_values, atol=1e-6)


def test_running_mean_std_matches_numpy():
    rms = RunningMeanStd((3,), epsilon=0.0)
    batches = [np.random.default_rng(i).normal(i, 1 + i, size=(50 + 10 * i, 3)) for i in range(4)]
    for batch in batches:
        rms.update(torch.tensor(batch, dtype=torch.float32))
        rms.update(torch.zeros(0, 3))  # an empty batch (every env masked) changes nothing
    data = np.concatenate(batches)
    assert np.allclose(rms.mean.numpy(), data.mean(0), rtol=1e-4)
    assert np.allclose(rms.var.numpy(), data.var(0), rtol=1e-4)
    x = torch.tensor(data[:5], dtype=torch.float32)
    assert torch.allclose(rms.normalize(x), (x - rms.mean) / torch.sqrt(rms.var + 1e-5))


def test_frame_stack_order_and_reset():
    frame = lambda v: torch.full((2, 4, 5, 3), v, dtype=torch.uint8)  # noqa: E731
    stack = FrameStack(3)
    out = stack.reset(frame(1))
    assert out.shape == (2, 9, 4, 5) and (out == 1).all()
    stack.push(frame(2))
    out = stack.push(frame(3))
    assert [out[0, 3 * k].max().item() for k in range(3)] == [1, 2, 3]  # oldest first
    out = stack.reset(frame(7), torch.tensor([1]))
    assert (out[1] == 7).all() and [out[0, 3 * k].max().item() for k in range(3)] == [1, 2, 3]


def test_encoder_shapes():
    enc = Encoder((9, 84, 84))
    assert enc.repr_dim == 32 * 35 * 35
    assert enc(torch.zeros(2, 9, 84, 84, dtype=torch.uint8)).shape == (2, 32 * 35 * 35)
    with pytest.raises(ValueError):
        Encoder((9, 7, 7))


# ------------------------------------------------------------------------------------------- gradient paths
def make_nets(task, pixels, seed=0):
    torch.manual_seed(seed)
    obs_shape = (9, *task.image_size) if pixels else (task.critic_obs_dim,)
    actor = Actor(obs_shape, task.act_dim, (32, 32))
    critic = Critic(task.critic_obs_dim, (16, 16)).requires_grad_(False)
    obs_rms = RunningMeanStd((task.critic_obs_dim,))
    obs_rms.update(torch.randn(100, task.critic_obs_dim) * 2 + 0.5)
    return actor, critic, obs_rms


def start_window(task, pixels):
    """fp64_dva_window.py's start (env 1 leaves the track inside the window, env 2 reaches its time limit), with the
    frame stack of its first images."""
    episode = fw.start_window(task)
    frames = FrameStack(3)
    if pixels:
        frames.reset(task.render())
    return frames, episode


class ActionCut(nn.Module):
    """Runs the actor on a detached observation and hands the simulator a leaf copy of the action, so that the
    gradient can only reach the parameters through d(loss)/d(action) x d(action)/d(params)."""

    def __init__(self, actor):
        super().__init__()
        self.actor, self.pairs = actor, []

    def forward(self, obs, deterministic=False):
        action = self.actor(obs.detach(), deterministic)
        leaf = action.detach().requires_grad_(True)
        self.pairs.append((action, leaf))
        return leaf


def actor_grads(task, actor, critic, obs_rms, pixels, cut):
    frames, episode = start_window(task, pixels)
    actor.zero_grad()
    torch.manual_seed(123)  # the same exploration noise in both rollouts
    policy = ActionCut(actor) if cut else actor
    args = SimpleNamespace(**{**vars(fw.ARGS), "obs": "pixels" if pixels else "state"})
    loss, _, _ = rollout_window(task, policy, critic, obs_rms, frames, args, episode)
    task.backward(loss)
    for action, leaf in getattr(policy, "pairs", []):
        action.backward(leaf.grad)
    return torch.cat([p.grad.flatten() for p in actor.parameters()]), episode


def test_dva_gradient_reaches_the_actor_only_through_its_actions(task):
    """With pixels, the full gradient equals the one through the actions alone: no path through the images.
    With the state as input (SHAC), the observation path adds to it, so the same check tells them apart."""
    actor, critic, obs_rms = make_nets(task, pixels=True)
    full, episode = actor_grads(task, actor, critic, obs_rms, pixels=True, cut=False)
    through_actions, _ = actor_grads(task, actor, critic, obs_rms, pixels=True, cut=True)
    assert episode.ended.tolist() == [False, True, True, False]  # a termination and a time limit in the window
    assert full.norm() > 0
    assert torch.allclose(full, through_actions, rtol=1e-4, atol=1e-6 * full.abs().max())

    actor, critic, obs_rms = make_nets(task, pixels=False)
    full, _ = actor_grads(task, actor, critic, obs_rms, pixels=False, cut=False)
    through_actions, _ = actor_grads(task, actor, critic, obs_rms, pixels=False, cut=True)
    assert (full - through_actions).norm() > 1e-3 * full.norm()


def test_state_mode_gradient_equals_shac(task):
    actor, critic, obs_rms = make_nets(task, pixels=False)
    ours, _ = actor_grads(task, actor, critic, obs_rms, pixels=False, cut=False)
    start_window(task, pixels=False)
    actor.zero_grad()
    torch.manual_seed(123)  # the exploration noise of actor_grads' rollout
    loss, _ = fw.shac_loss_by_hand(task, lambda t: actor(obs_rms.normalize(task.critic_obs())), critic, obs_rms,
                                   fw.ARGS.horizon, fw.ARGS.gamma)
    task.backward(loss)
    reference = torch.cat([p.grad.flatten() for p in actor.parameters()])
    assert reference.norm() > 0
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-6 * reference.abs().max())


# ------------------------------------------------------------------------------------------------ critic minibatches
@pytest.mark.parametrize("script", ["dva_cartpole", "dva_locomotion", "shac_diffrender"])
@pytest.mark.parametrize("n, sizes", [(0, []), (2, [1, 1]), (3, [1, 1, 1]), (7, [2, 2, 2, 1])])
def test_update_critic_never_steps_on_an_empty_minibatch(script, n, sizes):
    """4 minibatches of n samples, 2 passes: every minibatch holds a sample and every sample is used once per pass.
    With fewer samples than minibatches an empty minibatch gave a NaN loss and an Adam step on momentum alone; with
    no sample at all nothing is updated and the loss is 0 (there is nothing to fit; the logged loss stays finite)."""
    module = importlib.import_module(script)
    torch.manual_seed(0)
    critic = module.Critic(5, (8, 8))
    seen = []
    critic.register_forward_pre_hook(lambda _, inputs: seen.append(len(inputs[0])))
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    args = SimpleNamespace(critic_iterations=2, critic_minibatches=4, max_grad_norm=1.0)
    loss = module.update_critic(critic, opt, RunningMeanStd((5,)), torch.randn(n, 5), torch.randn(n), args)
    assert seen == sizes * 2
    assert all(opt.state[p].get("step", 0) == len(sizes) * 2 for p in critic.parameters())  # one a minibatch
    assert all(torch.isfinite(p).all() for p in critic.parameters())
    assert math.isfinite(loss) and (n > 0 or loss == 0.0)


# ------------------------------------------------------------------------------------------------ resumed settings
def test_resumed_args_read_every_spelling_tyro_takes():
    """The saved settings are tyro's defaults, so a flag wins in any spelling tyro reads, a bool's --no- form too."""
    import dva_cartpole

    saved = vars(dva_cartpole.Args(num_envs=3, actor_lr=1e-3, capture_video=True, seed=2))
    argv = ["--num-envs", "4", "--actor_lr=3e-3", "--max-iters=0", "--no-capture-video", "--actor-hidden", "32", "32",
            "--min-lr", "-1e-5", "--resume", "runs/x/checkpoint.pt"]
    args = resumed_args(dva_cartpole.Args, saved, argv, ())
    assert (args.num_envs, args.actor_lr, args.max_iters, args.capture_video, args.actor_hidden, args.min_lr,
            args.resume, args.seed) == (4, 3e-3, 0, False, (32, 32), -1e-5, "runs/x/checkpoint.pt", 2)
    assert resumed_args(dva_cartpole.Args, saved, ["--capture_video"], ()).capture_video
    assert vars(resumed_args(dva_cartpole.Args, saved, [], ())) == saved


SAVED = {  # per script: a run's settings other than the defaults, among them ones that other defaults depend on
    "dva_cartpole": dict(obs="state", num_envs=3, horizon=5, actor_lr=3e-3, max_iters=7),
    "dva_locomotion": dict(task="hopper", obs="state", horizon=8, critic_lr=1e-3),
    "shac_diffrender": dict(task="ant", num_envs=3, max_iters=7, image_size=24, eval_steps=5),
    "drqv2": dict(task="hopper", num_envs=3, lr=3e-4, std_schedule_steps=1000),
    "curl": dict(num_envs=3, image_size=32, image_width=64, critic_lr=3e-4),
    "s2v_dagger": dict(task="hopper", num_envs=3, lr=3e-4, max_iters=7),
}


@pytest.mark.parametrize("script", SAVED)
def test_resumed_run_takes_the_saved_settings_unless_a_flag_is_given(script, tmp_path):
    """The scripts' order for --resume and --eval-only: parse the command line, apply the checkpoint's settings, then
    fill the defaults that depend on other settings (finalize_args)."""
    module = importlib.import_module(script)
    saved = vars(module.finalize_args(module.Args(**SAVED[script], seed=2)))
    ckpt = str(tmp_path / "checkpoint.pt")
    (tmp_path / "checkpoint.pt").touch()

    def resumed(argv):
        return vars(module.finalize_args(resumed_args(module.Args, saved, argv, module.SHAPE_ARGS)))

    assert resumed(["--resume", ckpt]) == {**saved, "resume": ckpt}
    assert resumed(["--eval-only", ckpt]) == {**saved, "eval_only": ckpt}
    # A flag given on purpose wins, even at its default value; a shape flag may repeat the checkpoint's value, and
    # another value is refused, naming both.
    frame_stack = saved.get("frame_stack", 3)
    assert resumed(["--resume", ckpt, "--max-iters", "9", "--seed", "1", "--frame-stack", str(frame_stack)]) == {
        **saved, "max_iters": 9, "seed": 1, "resume": ckpt}
    if "frame_stack" in module.SHAPE_ARGS:
        with pytest.raises(ValueError, match=f"--frame-stack 5: the checkpoint was saved with --frame-stack {frame_stack}"):
            resumed(["--resume", ckpt, "--frame-stack", "5"])
