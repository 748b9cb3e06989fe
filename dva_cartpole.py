"""D.Va on visual cart-pole swing-up (Genesis): the decoupled visual-based analytical policy gradient.

You et al. "Accelerating Visual-Policy Learning through Parallel Differentiable Simulation" (arXiv 2505.10646).
SHAC's short-horizon actor-critic loop with an actor that sees stacked RGB frames. The frames are rendered without
gradient, so the policy gradient reaches the actor only through its actions -> differentiable dynamics -> rewards
and the terminal value. The critic sees the simulator state (privileged, training only).

    python dva_cartpole.py                      # the paper's settings: 64 envs, H = 32, 84 x 84 px, 3 frames
    python dva_cartpole.py --obs state          # the same loop on the state: plain SHAC (reference and expert)
    python dva_cartpole.py --num-envs 16 --image-size 32 --image-width 64 --horizon 16   # a 2-core CPU (README)
    torchrun --nproc-per-node 4 dva_cartpole.py --num-envs 64   # 4 GPUs x 16 envs, gradients averaged (docs/method.md)
"""

import math
import os
import signal
import sys
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import tyro

from common import distributed
from common.encoder import Encoder
from common.task import SimulationBlowUp
from common.utils import Episodes, FrameStack, load_checkpoint, range_problems


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of torch, numpy, python and the task's start states"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where torch and Genesis run (auto: cuda if torch sees a GPU)"""
    renderer: Literal["auto", "batch", "rasterizer", "torch"] = "auto"
    """Genesis's BatchRenderer or Rasterizer (auto: BatchRenderer on CUDA, Rasterizer on CPU), or the torch ray
    caster of common/diff_render.py"""
    obs: Literal["pixels", "state"] = "pixels"
    """what the actor sees: stacked RGB frames (D.Va) or the normalised state (state-based SHAC)"""
    detach_state: bool = False
    """with --obs state: detach the actor's input, so the gradient is D.Va's decoupled one on the state (the paper's
    Fig. 13, SHAC with actor(obs.detach())); the default keeps SHAC's full gradient"""
    num_envs: int = 64
    """number of parallel envs (under torchrun: of all ranks together, split evenly)"""
    horizon: int = 32
    """short horizon H: simulation steps per actor update"""
    max_iters: int = 0
    """training iterations (one = num_envs x horizon steps); 0 = the paper's: 4000 for pixels, 500 for state"""
    max_minutes: float = 0.0
    """stop after this many minutes of wall clock (0 = no limit); learning rates still decay over max_iters; with
    --resume: this many more (charts/wall_minutes goes on from the checkpoint's)"""
    image_size: int = 84
    """image height in pixels (and width, unless --image-width is given)"""
    image_width: int = 0
    """image width in pixels (0 = square images)"""
    frame_stack: int = 3
    """number of stacked frames the actor sees"""
    actor_hidden: tuple[int, ...] = (64, 64)
    """actor MLP widths (with pixels, a trunk of the first width comes before them)"""
    critic_hidden: tuple[int, ...] = (64, 64)
    """critic MLP widths"""
    actor_lr: float = 0.0
    """actor (and encoder) learning rate; 0 = the paper's: 2e-3 for pixels, 1e-2 for state"""
    critic_lr: float = 0.0
    """critic learning rate; 0 = the paper's: 2e-4 for pixels, 1e-3 for state"""
    min_lr: float = 1e-5
    """both learning rates decay linearly to this over max_iters"""
    betas: tuple[float, float] = (0.7, 0.95)
    """Adam betas of both optimisers"""
    gamma: float = 0.99
    """discount"""
    lam: float = 0.95
    """TD(lambda) parameter of the critic targets"""
    critic_iterations: int = 16
    """passes over the window's data per critic update"""
    critic_minibatches: int = 4
    """minibatches per pass"""
    target_alpha: float = 0.2
    """target critic smoothing: target = alpha * target + (1 - alpha) * critic"""
    max_grad_norm: float = 1.0
    """gradient-norm clip of actor and critic"""
    eval_every: int = 25
    """evaluate the deterministic policy every this many iterations (0 = only at the end)"""
    log_every: int = 10
    """print a console line every this many iterations"""
    save_every: int = 100
    """write runs/<run>/checkpoint.pt every this many iterations (and at the end, on Ctrl-C and on kill); best.pt
    holds the policy of the best evaluation so far"""
    resume: str | None = None
    """continue training from this checkpoint (iteration count, optimisers, schedules) with the settings it was
    saved with; a flag given with --resume changes that setting"""
    eval_only: str | None = None
    """load this checkpoint, run one evaluation episode per env with its saved settings (as --resume), print the
    mean return and write a video
    (--resume and --eval-only always take the networks' shapes: --obs, image size, frame stack, widths, from the
    checkpoint)"""
    capture_video: bool = False
    """record env 0 of every evaluation as mp4 in the run folder and in TensorBoard"""
    torch_threads: int = 0
    """torch CPU threads (0 = torch's default)"""


SHAPE_ARGS = ("obs", "image_size", "image_width", "frame_stack", "actor_hidden", "critic_hidden")
"""Arguments that fix the networks' shapes: --resume and --eval-only take them from the checkpoint."""


# The visual run that docs/results.md measured on a 2-core CPU (balances from pixels in 15-18 minutes).
CPU_COMMAND = ("python dva_cartpole.py --num-envs 16 --image-size 32 --image-width 64 --horizon 16 --eval-every 200 "
               "--max-minutes 30")


def finalize_args(args: Args, world_size: int = 1) -> Args:
    """Fill the paper's defaults that depend on --obs and reject bad input before anything is built."""
    pixels = args.obs == "pixels"
    args.max_iters = args.max_iters or (4000 if pixels else 500)
    args.actor_lr = args.actor_lr or (2e-3 if pixels else 1e-2)
    args.critic_lr = args.critic_lr or (2e-4 if pixels else 1e-3)
    args.image_width = args.image_width or args.image_size
    problems = range_problems(
        args, at_least_one=("num_envs", "horizon", "max_iters", "frame_stack", "actor_hidden", "critic_hidden",
                            "critic_minibatches", "log_every", "save_every"),
        non_negative=("max_minutes", "min_lr", "critic_iterations", "eval_every", "torch_threads"),
        positive=("actor_lr", "critic_lr", "max_grad_norm"), unit=("betas", "gamma", "lam", "target_alpha"))
    if args.num_envs % world_size:
        problems.append(f"--num-envs {args.num_envs} must be divisible by the number of ranks, {world_size}: "
                        f"every rank simulates num_envs / world_size envs")
    if pixels and args.detach_state:
        problems.append("--detach-state is for --obs state (the pixels are detached already)")
    if pixels and min(args.image_size, args.image_width) < 15:
        problems.append(f"--image-size/--image-width must be >= 15 px for the encoder "
                        f"(got {args.image_size}x{args.image_width})")
    for flag, path in (("--resume", args.resume), ("--eval-only", args.eval_only)):
        if path is not None and not Path(path).is_file():
            problems.append(f"{flag}: no checkpoint file at {path}")
    if problems:
        raise ValueError("; ".join(problems))
    return args


# ---------------------------------------------------------------------------------------------------------- networks
def mlp(in_dim: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """Linear -> ELU -> LayerNorm per hidden layer (SHAC's and D.Va's MLPs)."""
    layers = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ELU(), nn.LayerNorm(width)]
        in_dim = width
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Gaussian policy with tanh squashing. With pixels: encoder -> trunk (Linear, LayerNorm, Tanh) -> MLP."""

    def __init__(self, obs_shape: tuple[int, ...], act_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        if len(obs_shape) == 3:
            self.encoder = Encoder(obs_shape)
            self.trunk = nn.Sequential(nn.Linear(self.encoder.repr_dim, hidden[0]), nn.LayerNorm(hidden[0]), nn.Tanh())
            in_dim = hidden[0]
        else:
            self.encoder, self.trunk, in_dim = nn.Identity(), nn.Identity(), obs_shape[0]
        self.mlp = mlp(in_dim, hidden)
        self.mu = nn.Linear(hidden[-1], act_dim)
        self.logstd = nn.Parameter(torch.full((act_dim,), -1.0))

    def forward(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        mu = self.mu(self.mlp(self.trunk(self.encoder(obs))))
        if deterministic:
            return torch.tanh(mu)
        return torch.tanh(mu + self.logstd.exp() * torch.randn_like(mu))


class Critic(nn.Module):
    def __init__(self, obs_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.net = nn.Sequential(mlp(obs_dim, hidden), nn.Linear(hidden[-1], 1))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------- algorithm
def actor_input(task, frames, obs_rms, pixels: bool, detach_state: bool = False) -> torch.Tensor:
    """Stacked frames (uint8, no gradient: the decoupling) or the normalised state (SHAC: with gradient, unless
    detach_state asks for the decoupled gradient)."""
    if pixels:
        return frames.push(task.render())
    state = obs_rms.normalize(task.critic_obs())
    return state.detach() if detach_state else state


class Window(NamedTuple):
    """A window's detached data for the critic, each (H, N): the critic's inputs before each step, the rewards,
    V'(s_(t+1)) from the target critic (0 after a termination), where each env's return closes, and the steps at
    which each env was alive."""
    states: torch.Tensor
    rewards: torch.Tensor
    next_values: torch.Tensor
    dones: torch.Tensor
    valid: torch.Tensor


def rollout_window(task, actor, target_critic, obs_rms, frames, args, episode):
    """Simulate H steps of every env and build SHAC's actor loss.

    Returns the loss (to be back-propagated through the simulator) and the window's detached data for the critic.
    An env that ends inside the window (termination or time limit) closes its return there and is masked for the rest
    of the window; it is reset at the boundary, because a mid-window reset is not gradient-safe in Genesis.
    """
    n, h, pixels = task.num_envs, args.horizon, args.obs == "pixels"
    obs_buf = torch.zeros(h, n, task.critic_obs_dim, device=task.device)
    rew_buf, next_value_buf = torch.zeros(h, n, device=task.device), torch.zeros(h, n, device=task.device)
    done_buf = torch.zeros(h, n, dtype=torch.bool, device=task.device)
    valid_buf = torch.zeros_like(done_buf)
    alive = torch.ones(n, dtype=torch.bool, device=task.device)
    discount, rew_acc = torch.ones(n, device=task.device), torch.zeros(n, device=task.device)
    actor_loss = torch.zeros((), device=task.device)
    render_s = 0.0
    for t in range(h):
        obs_buf[t] = task.critic_obs().detach()
        valid_buf[t] = alive
        start = time.perf_counter()
        obs = actor_input(task, frames, obs_rms, pixels, args.detach_state)
        render_s += time.perf_counter() - start
        reward, terminated, truncated = task.step(actor(obs))
        # V'(s_{t+1}) from the target critic: zero after an early termination, the state's value after a time limit.
        next_value = torch.where(terminated, 0.0, target_critic(obs_rms.normalize(task.critic_obs())))
        ends = alive & (terminated | truncated)
        closes = alive if t == h - 1 else ends  # whose discounted return is complete at this step
        rew_acc = rew_acc + discount * torch.where(alive, reward, 0.0)
        actor_loss = actor_loss - torch.where(closes, rew_acc + args.gamma * discount * next_value, 0.0).sum()
        discount = discount * args.gamma

        rew_buf[t], next_value_buf[t] = reward.detach(), next_value.detach()
        done_buf[t] = ends | (t == h - 1)
        episode.returns += torch.where(alive, reward.detach(), 0.0)
        episode.lengths += alive.long()
        episode.ended |= ends
        alive = alive & ~ends
    return actor_loss / (h * n), Window(obs_buf, rew_buf, next_value_buf, done_buf, valid_buf), render_s


def actor_update(task, actor, actor_opt, actor_loss, max_grad_norm: float):
    """Back-propagate the window's loss through the simulator and step the actor, or skip a bad window.

    A non-finite loss, a non-finite gradient, or Genesis's NaN stop in its backward pass (`SimulationBlowUp`; humanoid,
    now and then) skips the update: the simulator is put back to the window's end state (saved before the backward
    pass), the tape is cut, and the caller resets the envs that blew up. Returns (pre-clip gradient norm, skipped).
    Under torchrun the ranks' gradients are averaged before the clip, so every rank takes the same step; a skip on
    any rank is a skip on all.
    """
    actor_opt.zero_grad()
    if not distributed.all_ranks(torch.isfinite(actor_loss)):  # [distributed] a bad loss on any rank: all skip
        task.cut_graph()
        return float("nan"), True
    snapshot = task.snapshot()
    try:
        task.backward(actor_loss)
        blew_up = False
    except SimulationBlowUp:
        task.restore(snapshot)
        task.cut_graph()
        blew_up = True
    if not distributed.all_ranks(not blew_up):  # [distributed] Genesis's NaN stop on any rank: all skip
        actor_opt.zero_grad()
        return float("nan"), True
    distributed.average_gradients(actor)  # [distributed] the global batch's gradient; a NaN anywhere spreads
    grad_norm = nn.utils.clip_grad_norm_(actor.parameters(), max_grad_norm).item()
    if not np.isfinite(grad_norm):
        actor_opt.zero_grad()
        return grad_norm, True
    actor_opt.step()
    return grad_norm, False


def window_boundary(task, episode, frames=None, broken=None):
    """The window boundary, the same after an update, a skipped update or an aborted window: every env that ended
    inside the window (`episode.ended`) or is in the mask `broken` starts a new episode, and its frame stack is
    refilled with its first frame. The reset cuts the tape, even when no env restarts.

    Returns the restarted envs' ids and the finished episodes to log, as (return, length) pairs; the episodes of
    broken envs are dropped, not logged.
    """
    broken = torch.zeros_like(episode.ended) if broken is None else broken
    env_ids = (episode.ended | broken).nonzero().flatten()
    finished = episode.finish((episode.ended & ~broken).nonzero().flatten())
    episode.restart(broken.nonzero().flatten())  # a broken env's episode is dropped, not logged
    task.reset(env_ids)
    if frames is not None and len(env_ids) > 0:
        frames.reset(task.render(), env_ids)
    return env_ids, finished


def reset_broken_envs(task, episode, frames=None):
    """After a window that Genesis aborted: cut the tape and go to the window boundary, where the broken envs (all,
    if none is flagged) restart along with the envs that ended earlier in the window. Returns window_boundary's."""
    broken = task.broken_envs()  # before the tape is cut: that clears Genesis's error flags
    broken = broken if broken.any() else torch.ones_like(broken)
    task.cut_graph()
    return window_boundary(task, episode, frames, broken)


def td_lambda_targets(rewards, next_values, dones, gamma: float, lam: float) -> torch.Tensor:
    """TD(lambda) returns over a window (H, N), vectorised over envs, as in SHAC; dones[H-1] must be 1.

    At a done step the return bootstraps on next_values (0 after an early termination) and nothing later leaks in.
    """
    h, n = rewards.shape
    targets = torch.zeros_like(rewards)
    weight, a, b = (torch.zeros(n, dtype=rewards.dtype, device=rewards.device) for _ in range(3))
    for t in reversed(range(h)):
        d = dones[t].to(rewards.dtype)
        weight = weight * lam * (1 - d) + d
        a = (1 - d) * (lam * gamma * a + gamma * next_values[t] + (1 - weight) / (1 - lam) * rewards[t])
        b = gamma * (next_values[t] * d + b * (1 - d)) + rewards[t]
        targets[t] = (1 - lam) * a + weight * b
    return targets


def update_critic(critic, critic_opt, obs_rms, states, targets, args) -> float:
    """Regress V(s) on the TD(lambda) targets: critic_iterations passes of critic_minibatches minibatches.

    Every minibatch holds at least one sample: with fewer samples than minibatches each sample is its own minibatch
    (an empty one would give a NaN loss, and Adam would still step on its momentum). Returns the last minibatch's
    loss; with no sample at all, no update and a loss of 0 (so the logged loss stays finite)."""
    most = distributed.max_over_ranks(len(states))  # [distributed] every rank takes as many minibatch steps
    if most == 0:  # no finite data in this window: nothing to learn from
        return 0.0
    states = obs_rms.normalize(states)
    loss = torch.zeros(())
    for _ in range(args.critic_iterations):
        perm = torch.randperm(len(states), device=states.device)
        for idx in torch.tensor_split(perm, min(args.critic_minibatches, most)):
            critic_opt.zero_grad()
            if len(idx) > 0:  # (only under torchrun can a rank's minibatch be empty: it then adds nothing)
                loss = ((critic(states[idx]) - targets[idx]) ** 2).mean()
                loss.backward()
            distributed.average_gradients(critic, weight=len(idx))  # [distributed] the mean over all ranks' samples
            nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
            critic_opt.step()
    return loss.item()


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float):
    for tp, sp in zip(target.parameters(), source.parameters()):
        tp.lerp_(sp, tau)  # tp = (1 - tau) * tp + tau * sp


def train_critic(critic, target_critic, critic_opt, obs_rms, window, args) -> float:
    """The critic's part of an iteration, on the window's finite data: the normaliser, TD(lambda) targets, the
    regression and the target critic. Under torchrun the normaliser merges every rank's states; the data stays per
    rank."""
    states, rewards, next_values, dones, valid = window
    valid = valid & torch.isfinite(states).all(-1) & torch.isfinite(rewards) & torch.isfinite(next_values)
    distributed.update_normaliser(obs_rms, states[valid])  # one process: obs_rms.update(states[valid])
    targets = td_lambda_targets(rewards, next_values, dones, args.gamma, args.lam)
    valid &= torch.isfinite(targets)
    critic_loss = update_critic(critic, critic_opt, obs_rms, states[valid], targets[valid], args)
    soft_update(target_critic, critic, 1 - args.target_alpha)  # SHAC: keep alpha of the target
    return critic_loss


def evaluate(task, actor, obs_rms, args, capture_video: bool = False):
    """One episode per env with the mean action; the training batch is put back afterwards.

    Returns (mean return, success rate, frames of env 0 or None). Success (`task.score`): the pole stays within
    0.3 rad of upright over the last 60 steps, and the episode ran to its time limit.
    """
    pixels = args.obs == "pixels"
    frames, video = FrameStack(args.frame_stack), []

    def policy(t):
        image = task.render() if pixels or capture_video else None
        if capture_video:
            video.append(image[0].cpu().numpy())
        obs = (frames.push(image) if t else frames.reset(image)) if pixels else obs_rms.normalize(task.critic_obs())
        return actor(obs, deterministic=True)

    snapshot = task.snapshot()
    returns, success = task.run_episodes(policy, task.max_episode_length)
    task.restore(snapshot)  # in grad mode: the next window reads a differentiable state
    return returns.mean().item(), success.mean().item(), np.stack(video) if capture_video else None


def linear_lr(base: float, min_lr: float, iteration: int, max_iters: int) -> float:
    return base + (min_lr - base) * min(iteration / max_iters, 1.0)


if __name__ == "__main__":
    args = tyro.cli(Args)
    args, checkpoint = load_checkpoint(args, Args, SHAPE_ARGS)  # --resume, --eval-only: the saved settings
    # [distributed] under torchrun: join the ranks, one GPU each, before Genesis or CUDA starts; else (0, 1)
    rank, world_size = distributed.setup(args.device)
    try:
        args = finalize_args(args, world_size)  # after the checkpoint's settings: the defaults follow them
    except ValueError as error:
        distributed.exit_with_error(f"error: {error}")

    from torch.utils.tensorboard import SummaryWriter

    from common.genesis_setup import resolve_device, resolve_renderer
    from common.tasks import make_task
    from common.utils import (RunningMeanStd, hparams_table, rng_state, run_name, save_checkpoint, seed_everything,
                              set_rng_state, write_video)

    try:
        device = resolve_device(args.device)
        renderer = resolve_renderer(args.renderer, device, args.image_width)
    except ValueError as error:
        distributed.exit_with_error(f"error: {error}")
    if (device.type == "cpu" and args.obs == "pixels" and args.num_envs >= 64 and args.image_size >= 84 and rank == 0
            and not args.eval_only):
        print(f"note: {args.num_envs} envs at {args.image_size} px are the paper's GPU settings; the CPU run of "
              f"docs/results.md: {CPU_COMMAND}")
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    seed_everything(args.seed + rank)  # [distributed] every rank its own noise, critic minibatches and start states
    pixels = args.obs == "pixels"

    # ------------------------------------------------------------------------------------------------ set-up
    image_size = (args.image_size, args.image_width)
    task = make_task("cartpole", args.num_envs // world_size, device, renderer=renderer, seed=args.seed + rank,
                     image_size=image_size if (pixels or args.capture_video or args.eval_only) else None)
    obs_shape = (3 * args.frame_stack, *image_size) if pixels else (task.critic_obs_dim,)
    actor = Actor(obs_shape, task.act_dim, args.actor_hidden).to(device)
    critic = Critic(task.critic_obs_dim, args.critic_hidden).to(device)
    distributed.broadcast_from_rank0(actor, critic)  # [distributed] every rank starts from rank 0's networks
    target_critic = deepcopy(critic).requires_grad_(False)
    obs_rms = RunningMeanStd((task.critic_obs_dim,)).to(device)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, betas=args.betas)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, betas=args.betas)
    start_iter, global_step = 1, 0
    if checkpoint is not None:
        try:
            for module, key in ((actor, "actor"), (critic, "critic"), (target_critic, "target_critic"),
                                (obs_rms, "obs_rms")):
                module.load_state_dict(checkpoint[key])
        except (RuntimeError, KeyError) as error:
            distributed.exit_with_error(f"error: the checkpoint does not fit this script's networks: {error}")

    if args.eval_only:  # [distributed] every rank evaluates its envs; rank 0 records its env 0
        ret, success, clip = evaluate(task, actor, obs_rms, args, capture_video=rank == 0)
        ret, success = distributed.mean(ret, success)
        out = Path(args.eval_only).with_name("eval_only.mp4")
        if rank == 0:
            write_video(clip, out)
        print(f"eval over {args.num_envs} episodes: mean return {ret:.1f}, success {success:.2f}; video: {out}")
        sys.exit(0)

    if checkpoint is not None:
        actor_opt.load_state_dict(checkpoint["actor_opt"])
        critic_opt.load_state_dict(checkpoint["critic_opt"])
        start_iter, global_step = checkpoint["iteration"] + 1, checkpoint["global_step"]
        if rank == 0:  # [distributed] the checkpoint holds rank 0's random streams; the others keep seed + rank
            set_rng_state(checkpoint["rng"])
            task.set_rng_state(checkpoint["task_rng"])
        run_dir = Path(args.resume).parent
    else:
        run_dir = Path("runs") / run_name(task.name, args.exp_name, args.seed)
    writer = SummaryWriter(str(run_dir)) if rank == 0 else distributed.NullWriter()  # [distributed] rank 0 logs
    writer.add_text("hyperparameters", hparams_table(args))
    ranks = f", {world_size} ranks x {task.num_envs} envs" if world_size > 1 else ""
    print(f"run folder: {run_dir}  (tensorboard --logdir runs)  device {device}, renderer {renderer}{ranks}")

    best_return = checkpoint.get("best_return", -math.inf) if checkpoint is not None and args.resume else -math.inf

    def save(iteration: int, name: str = "checkpoint.pt"):
        if rank > 0:  # [distributed] rank 0 alone writes the checkpoint
            return
        save_checkpoint(run_dir / name, {
            "actor": actor.state_dict(), "critic": critic.state_dict(), "target_critic": target_critic.state_dict(),
            "obs_rms": obs_rms.state_dict(), "actor_opt": actor_opt.state_dict(), "critic_opt": critic_opt.state_dict(),
            "wall_minutes": minutes_before + (time.time() - start_time) / 60,
            "iteration": iteration, "global_step": global_step, "rng": rng_state(),
            "task_rng": task.rng_state(), "args": vars(args), "world_size": world_size, "best_return": best_return,
        })

    # ------------------------------------------------------------------------------------------------ training loop
    frames = FrameStack(args.frame_stack)
    if pixels:
        frames.reset(task.render())
    episode = Episodes.zeros(task.num_envs, device)
    recent_returns, nan_skips, iteration = [], 0, start_iter - 1

    def log_episodes(finished):
        """Log the episodes that ended, as (return, length) pairs; keep the last 20 returns for the console."""
        for ret, length in finished:
            recent_returns.append(ret)
            writer.add_scalar("charts/episodic_return", ret, global_step)
            writer.add_scalar("charts/episodic_length", length, global_step)
        del recent_returns[:-20]

    # Ctrl-C and `kill` (also of a background job, which ignores SIGINT by default) end the run with a checkpoint.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    # charts/wall_minutes: the run's wall clock, which a resumed run continues from its checkpoint
    minutes_before = checkpoint.get("wall_minutes", 0.0) if checkpoint is not None and args.resume else 0.0
    start_time = time.time()
    try:
        for iteration in range(start_iter, args.max_iters + 1):
            iter_start = time.perf_counter()
            for opt, base in ((actor_opt, args.actor_lr), (critic_opt, args.critic_lr)):
                for group in opt.param_groups:
                    group["lr"] = linear_lr(base, args.min_lr, iteration - 1, args.max_iters)

            # Rollout: H differentiable steps and the actor loss.
            start = time.perf_counter()
            try:
                actor_loss, window, render_s = rollout_window(task, actor, target_critic, obs_rms, frames, args,
                                                              episode)
                aborted = False
            except SimulationBlowUp:  # Genesis stopped the window: an env blew up
                aborted = True
            if not distributed.all_ranks(not aborted):  # [distributed] aborted on any rank: every rank skips it
                nan_skips += 1
                stack = frames if pixels else None
                boundary = reset_broken_envs(task, episode, stack) if aborted else window_boundary(task, episode, stack)
                log_episodes(boundary[1])
                print(f"  iteration {iteration}: the simulation blew up, window skipped ({nan_skips} so far)")
                continue
            forward_s = time.perf_counter() - start - render_s

            # Actor update: back-propagate through rewards, critic, dynamics and actions (not through images).
            start = time.perf_counter()
            grad_norm, skipped = actor_update(task, actor, actor_opt, actor_loss, args.max_grad_norm)
            if skipped:  # the envs that blew up, if any, start over below; the others go on
                nan_skips += 1
                episode.ended |= task.broken_envs()
                print(f"  iteration {iteration}: non-finite loss or gradient, update skipped ({nan_skips} so far)")
            backward_s = time.perf_counter() - start

            # Critic update on the window's states with TD(lambda) targets.
            start = time.perf_counter()
            critic_loss = train_critic(critic, target_critic, critic_opt, obs_rms, window, args)
            critic_s = time.perf_counter() - start

            # Bookkeeping and the resets of ended envs, at the window boundary.
            global_step += args.num_envs * args.horizon
            log_episodes(window_boundary(task, episode, frames if pixels else None)[1])
            iteration_s = time.perf_counter() - iter_start

            elapsed = time.time() - start_time
            sps = int((iteration - start_iter + 1) * args.num_envs * args.horizon / elapsed)
            for tag, value in (("losses/actor_loss", actor_loss.item()), ("losses/critic_loss", critic_loss),
                               ("grads/actor_grad_norm", grad_norm), ("charts/SPS", sps),
                               ("charts/learning_rate", actor_opt.param_groups[0]["lr"]),
                               ("charts/nan_skips", nan_skips),
                               ("charts/wall_minutes", minutes_before + elapsed / 60),
                               ("time/render_s", render_s), ("time/forward_s", forward_s),
                               ("time/backward_s", backward_s), ("time/critic_s", critic_s),
                               ("time/iteration_s", iteration_s)):
                writer.add_scalar(tag, value, global_step)
            # [distributed] the ranks agree on stopping (rank 0's clock alone could leave the others waiting)
            out_of_time = args.max_minutes > 0 and distributed.any_rank(elapsed > args.max_minutes * 60)
            last = iteration == args.max_iters or out_of_time
            if (args.eval_every > 0 and iteration % args.eval_every == 0) or last:
                record = args.capture_video and rank == 0  # [distributed] rank 0 records its env 0
                ret, success, clip = evaluate(task, actor, obs_rms, args, capture_video=record)
                ret, success = distributed.mean(ret, success)  # [distributed] over every rank's envs
                writer.add_scalar("charts/eval_return", ret, global_step)
                writer.add_scalar("charts/eval_success", success, global_step)
                print(f"  eval at iter {iteration} ({minutes_before + elapsed / 60:.1f} min): return {ret:.1f}, "
                      f"success {success:.2f}", flush=True)
                if clip is not None:
                    write_video(clip, run_dir / f"eval_{iteration:06d}.mp4", writer, step=global_step)
                if ret > best_return:  # the best evaluated policy so far, resumable as the checkpoint is
                    best_return = ret
                    save(iteration, "best.pt")
            if iteration % args.log_every == 0 or last:
                mean_ret = np.mean(recent_returns) if recent_returns else float("nan")
                eta = (args.max_iters - iteration) * elapsed / (iteration - start_iter + 1)
                print(f"iter {iteration}/{args.max_iters}  return {mean_ret:.1f}  SPS {sps}  "
                      f"{iteration_s:.2f} s/iter  ETA {eta / 60:.1f} min", flush=True)
            if iteration % args.save_every == 0:
                distributed.check_in_sync(actor, critic, target_critic, obs_rms)  # [distributed] debug: no drift
                save(iteration)
            if out_of_time:
                print(f"stopping: --max-minutes {args.max_minutes} reached")
                break
    except KeyboardInterrupt:
        print("interrupted: saving the checkpoint", flush=True)
    save(iteration)
    writer.close()
    print(f"checkpoint: {run_dir / 'checkpoint.pt'}")
