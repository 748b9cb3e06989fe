"""DrQ-v2 from pixels over a batch of Genesis envs: the model-free visual baseline of D.Va's comparison.

Yarats et al. "Mastering Visual Continuous Control: Improved Data-Augmented Reinforcement Learning" (ICLR 2022),
with the settings of D.Va's baseline section (You et al., arXiv 2505.10646): DDPG with n-step returns, clipped double
Q, a scheduled exploration std, and random-shift augmentation of the replay frames; the encoder learns from the
critic loss only. The envs run in parallel: one iteration is one batched agent step of all envs (each action held for
`--action-repeat` simulation steps) followed by `--updates-per-step` gradient updates (16 envs and 8 updates keep
DrQ-v2's one update per two agent steps). Genesis runs without a gradient tape: the simulator is only sampled here.

    python drqv2.py                                                    # cart-pole, the paper's settings (84 px)
    python drqv2.py --num-envs 16 --image-size 32 --image-width 64     # the CPU configuration of the D.Va runs
    python drqv2.py --task hopper                                      # 32 envs, 16 updates per step
"""

import math
import os
import signal
import sys
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common.encoder import Encoder
from common.tasks import TaskName
from common.utils import Episodes, FrameStack, load_checkpoint, range_problems


@dataclass
class Args:
    task: TaskName = "cartpole"
    """which task; it selects the defaults below (any flag overrides them)"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of torch, numpy, python and the task's start states"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where torch, Genesis and the replay buffer live (auto: cuda if torch sees a GPU)"""
    renderer: Literal["auto", "batch", "rasterizer", "torch"] = "auto"
    """Genesis's BatchRenderer or Rasterizer (auto: BatchRenderer on CUDA, Rasterizer on CPU), or the torch ray
    caster of common/diff_render.py"""
    num_envs: int | None = None
    """number of parallel envs (default: 16 for cartpole, 32 otherwise)"""
    updates_per_step: int | None = None
    """gradient updates after each batched agent step (default: 8 for cartpole, 16 otherwise: one per two agent
    steps, DrQ-v2's `update_every_steps: 2`)"""
    max_iters: int | None = None
    """iterations (one = a batched agent step + its updates); default: DrQ-v2's training frames for the task's
    difficulty (cartpole easy 1.1M, hopper and ant medium 3.1M, humanoid hard 30.1M) / (num_envs x action_repeat)"""
    max_minutes: float = 0.0
    """stop after this many minutes of wall clock (0 = no limit); with --resume: this many more (charts/wall_minutes
    goes on from the checkpoint's)"""
    image_size: int = 84
    """image height in pixels (and width, unless --image-width is given)"""
    image_width: int = 0
    """image width in pixels (0 = square images)"""
    frame_stack: int = 3
    """number of stacked frames the networks see"""
    action_repeat: int = 2
    """simulation steps per agent step (the action is held; the agent's reward is their sum)"""
    feature_dim: int | None = None
    """width of the trunks' output (Linear, LayerNorm, Tanh) after the encoder (default: 50; humanoid 100)"""
    hidden_dim: int = 1024
    """width of the actor's and the critic's two hidden layers"""
    lr: float = 1e-4
    """Adam learning rate of the encoder, the actor and the critic"""
    batch_size: int = 256
    """transitions per update"""
    n_step: int = 3
    """n of the n-step returns (shorter where an episode ends inside the window)"""
    gamma: float = 0.99
    """discount per agent step"""
    critic_tau: float = 0.01
    """target critic smoothing: target = (1 - tau) * target + tau * critic, after every update"""
    shift_pad: int = 4
    """random-shift augmentation: replicate-pad by this many pixels, then crop back to the image size at a random
    offset per sample (a shift of up to +-pad pixels in each direction)"""
    std_start: float = 1.0
    """exploration std at the start of the schedule"""
    std_end: float = 0.1
    """exploration std at the end of the schedule"""
    std_schedule_steps: int | None = None
    """agent steps (all envs together) over which the exploration std falls linearly from std_start to std_end;
    default: DrQ-v2's schedule for the task's difficulty (counted in agent steps there too): cartpole easy 100k,
    hopper and ant medium 500k, humanoid hard 2M"""
    std_clip: float = 0.3
    """the policy noise of the critic targets and the actor loss is clipped to +-std_clip"""
    seed_steps: int = 2000
    """agent steps (all envs together) of uniform random actions before the updates start (DrQ-v2: 4000 frames at
    action repeat 2). After --resume the empty buffer is refilled with this many steps of the loaded policy first"""
    buffer_size: int = 100_000
    """replay capacity in transitions (a ring of buffer_size // num_envs frames per env). Each frame is stored once:
    3 x H x W bytes, i.e. 2.1 GB at 84 x 84 and 0.61 GB at 32 x 64 for 100k. Not part of the checkpoint (too big)"""
    eval_every: int = 250
    """evaluate the deterministic policy every this many iterations (0 = only at the end)"""
    eval_steps: int = 1000
    """simulation steps per evaluation episode of a locomotion task (cart-pole episodes are 240 steps)"""
    log_every: int = 20
    """print a console line every this many iterations"""
    save_every: int = 500
    """write runs/<run>/checkpoint.pt every this many iterations (and at the end, on Ctrl-C and on kill)"""
    resume: str | None = None
    """continue training from this checkpoint (networks, optimisers, counters; the replay buffer starts empty) with
    the settings it was saved with; a flag given with --resume changes that setting"""
    eval_only: str | None = None
    """load this checkpoint, run one evaluation episode per env with its saved settings (as --resume), print the
    mean return and write a video
    (--resume and --eval-only take the task and the networks' shapes from the checkpoint)"""
    capture_video: bool = False
    """record env 0 of every evaluation as mp4 in the run folder and in TensorBoard"""
    torch_threads: int = 0
    """torch CPU threads (0 = torch's default)"""


TASK_DEFAULTS = {  # DrQ-v2's difficulty presets: easy (cartpole), medium (hopper, ant), hard (humanoid)
    "cartpole": dict(num_envs=16, updates_per_step=8, feature_dim=50, std_schedule_steps=100_000,
                     train_frames=1_100_000),
    "hopper": dict(num_envs=32, updates_per_step=16, feature_dim=50, std_schedule_steps=500_000,
                   train_frames=3_100_000),
    "ant": dict(num_envs=32, updates_per_step=16, feature_dim=50, std_schedule_steps=500_000,
                train_frames=3_100_000),
    "humanoid": dict(num_envs=32, updates_per_step=16, feature_dim=100, std_schedule_steps=2_000_000,
                     train_frames=30_100_000),
}
SHAPE_ARGS = ("task", "image_size", "image_width", "frame_stack", "feature_dim", "hidden_dim")
"""Arguments that fix the networks' shapes: --resume and --eval-only take them from the checkpoint."""


def finalize_args(args: Args) -> Args:
    """Fill the task's defaults and reject bad input before anything is built."""
    defaults = TASK_DEFAULTS[args.task]
    for key in ("num_envs", "updates_per_step", "feature_dim", "std_schedule_steps"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.max_iters is None and args.num_envs >= 1 and args.action_repeat >= 1:
        args.max_iters = math.ceil(defaults["train_frames"] / (args.num_envs * args.action_repeat))
    args.image_width = args.image_width or args.image_size
    problems = range_problems(
        args, at_least_one=("num_envs", "frame_stack", "action_repeat", "feature_dim", "hidden_dim", "batch_size",
                            "n_step", "eval_steps", "std_schedule_steps", "buffer_size", "log_every", "save_every"),
        non_negative=("updates_per_step", "seed_steps", "shift_pad", "max_minutes", "eval_every", "torch_threads",
                      "std_start", "std_end", "std_clip"),
        positive=("lr",), unit=("gamma", "critic_tau"))
    if args.max_iters is not None and args.max_iters < 1:
        problems.append(f"--max-iters must be >= 1 (got {args.max_iters})")
    if min(args.image_size, args.image_width) < 15:
        problems.append(f"--image-size/--image-width must be >= 15 px for the encoder "
                        f"(got {args.image_size}x{args.image_width})")
    if args.num_envs >= 1 and args.buffer_size // args.num_envs < args.n_step + args.frame_stack + 1:
        problems.append(f"--buffer-size {args.buffer_size} leaves fewer than n_step + frame_stack + 1 = "
                        f"{args.n_step + args.frame_stack + 1} frames per env")
    for flag, path in (("--resume", args.resume), ("--eval-only", args.eval_only)):
        if path is not None and not Path(path).is_file():
            problems.append(f"{flag}: no checkpoint file at {path}")
    if problems:
        raise ValueError("; ".join(problems))
    return args


# ---------------------------------------------------------------------------------------------------------- networks
def weight_init(module: nn.Module):
    """DrQ-v2's init: orthogonal weights (ReLU gain for convolutions), zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.orthogonal_(module.weight.data)
        module.bias.data.fill_(0.0)
    elif isinstance(module, nn.Conv2d):
        nn.init.orthogonal_(module.weight.data, nn.init.calculate_gain("relu"))
        module.bias.data.fill_(0.0)


class RandomShift(nn.Module):
    """Replicate-pad by `pad` pixels, then crop back to H x W at a random offset per sample.

    Done as one gather of clamped pixel indices (no interpolation), so it works on uint8 frames and a shift of 0 is
    exactly the identity: out[b, :, i, j] = x[b, :, clamp(i - dy), clamp(j - dx)], content moves by (+dy, +dx).
    """

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor, shifts: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W); shifts (B, 2) integer (dy, dx) in [-pad, pad], drawn uniformly when not given."""
        b, c, h, w = x.shape
        if shifts is None:
            shifts = torch.randint(-self.pad, self.pad + 1, (b, 2), device=x.device)
        rows = (torch.arange(h, device=x.device)[None] - shifts[:, :1]).clamp(0, h - 1)  # (B, H)
        cols = (torch.arange(w, device=x.device)[None] - shifts[:, 1:]).clamp(0, w - 1)  # (B, W)
        index = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        return x.reshape(b, c, h * w).gather(2, index).reshape(b, c, h, w)


def trunk(in_dim: int, feature_dim: int) -> nn.Sequential:
    """Encoder features -> a small normalised feature vector (DrQ-v2's trunk)."""
    return nn.Sequential(nn.Linear(in_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class Actor(nn.Module):
    """Deterministic policy mean on (detached) encoder features: trunk -> MLP -> tanh. The std is scheduled."""

    def __init__(self, repr_dim: int, act_dim: int, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.trunk = trunk(repr_dim, feature_dim)
        self.policy = mlp(feature_dim, hidden_dim, act_dim)
        self.apply(weight_init)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.policy(self.trunk(features)))


class Critic(nn.Module):
    """Twin Q(s, a) on encoder features: its own trunk, then two MLP heads on [trunk(s), a]."""

    def __init__(self, repr_dim: int, act_dim: int, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.trunk = trunk(repr_dim, feature_dim)
        self.q1 = mlp(feature_dim + act_dim, hidden_dim, 1)
        self.q2 = mlp(feature_dim + act_dim, hidden_dim, 1)
        self.apply(weight_init)

    def forward(self, features: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([self.trunk(features), action], dim=-1)
        return self.q1(h).squeeze(-1), self.q2(h).squeeze(-1)


def sample_action(mu: torch.Tensor, std: float, clip: float | None) -> torch.Tensor:
    """DrQ-v2's truncated normal: mu + noise (noise clipped to +-clip if given), kept inside (-1, 1) by a clamp whose
    gradient passes straight through."""
    noise = torch.randn_like(mu) * std
    if clip is not None:
        noise = noise.clamp(-clip, clip)
    action = mu + noise
    clamped = action.clamp(-1.0 + 1e-6, 1.0 - 1e-6)
    return action - action.detach() + clamped.detach()


def exploration_std(args: Args, agent_steps: int) -> float:
    """linear(std_start -> std_end) over std_schedule_steps agent steps, then constant."""
    frac = min(agent_steps / args.std_schedule_steps, 1.0)
    return args.std_start + frac * (args.std_end - args.std_start)


# ---------------------------------------------------------------------------------------------------------- replay
def nstep_return(rewards: torch.Tensor, terminated: torch.Tensor, ended: torch.Tensor, gamma: float):
    """n-step returns along windows (B, n) of one env's consecutive agent steps.

    Sums gamma^j r_j up to and including the first step after which the episode ended (a window never reaches into
    the next episode). Returns (return, bootstrap discount, steps m): discount = gamma^m, or 0 if the episode
    terminated inside the window (a time limit still bootstraps); the next observation is m steps ahead.
    """
    b, n = rewards.shape
    ret = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    discount = torch.ones_like(ret)
    steps = torch.zeros(b, dtype=torch.long, device=rewards.device)
    alive = torch.ones(b, dtype=torch.bool, device=rewards.device)
    for j in range(n):
        ret = ret + torch.where(alive, discount * rewards[:, j], 0.0)
        discount = torch.where(alive, discount * gamma, discount)
        steps = steps + alive.long()
        discount = torch.where(alive & terminated[:, j], 0.0, discount)
        alive = alive & ~ended[:, j]
    return ret, discount, steps


class ReplayBuffer:
    """The transitions of a batch of envs, each frame stored once, in a per-env ring of capacity // num_envs slots.

    Slot s of env e holds a frame (3, H, W) uint8 and the agent steps since its episode's first frame; once the
    agent has acted from it, also the action, the agent reward and whether the episode terminated / ended right
    after. An episode of L agent steps fills L + 1 slots, o_0 ... o_L: the final frame o_L is never acted from, it
    is what a time-limit transition bootstraps on. Frame stacks and n-step next observations are read back from the
    same env's neighbouring slots, so nothing is stored twice, and no sample crosses an episode boundary: a stack
    repeats its episode's first frame (as FrameStack.reset does) and an n-step window stops at its episode's end.

    Memory: the frames take capacity x 3 x H x W bytes (2.1 GB for 100k at 84 x 84, 0.61 GB at 32 x 64); the rest
    is about (12 + 4 x act_dim) bytes per slot.
    """

    def __init__(self, capacity: int, num_envs: int, image_size: tuple[int, int], act_dim: int, frame_stack: int,
                 n_step: int, gamma: float, device: torch.device):
        self.slots, self.num_envs = capacity // num_envs, num_envs
        self.frame_stack, self.n_step, self.gamma = frame_stack, n_step, gamma
        shape = (self.slots, num_envs)
        self.frames = torch.zeros(*shape, 3, *image_size, dtype=torch.uint8, device=device)
        self.actions = torch.zeros(*shape, act_dim, device=device)
        self.rewards = torch.zeros(shape, device=device)
        self.terminated = torch.zeros(shape, dtype=torch.bool, device=device)
        self.ended = torch.zeros(shape, dtype=torch.bool, device=device)
        self.acted = torch.zeros(shape, dtype=torch.bool, device=device)
        self.episode_step = torch.zeros(shape, dtype=torch.long, device=device)
        self.count = torch.zeros(num_envs, dtype=torch.long, device=device)  # frames ever written, per env
        self.envs = torch.arange(num_envs, device=device)

    def add_frames(self, frames: torch.Tensor, episode_step: torch.Tensor, env_ids: torch.Tensor | None = None):
        """Write the newest frame (M, H, W, 3) of `env_ids` (all if None) into each one's next slot."""
        env_ids = self.envs if env_ids is None else env_ids
        slot = self.count[env_ids] % self.slots
        self.frames[slot, env_ids] = frames.permute(0, 3, 1, 2)
        self.episode_step[slot, env_ids] = episode_step
        self.acted[slot, env_ids] = False
        self.count[env_ids] += 1

    def add_transitions(self, actions, rewards, terminated, ended):
        """Record what every env did from its newest frame: (N, act_dim) actions, (N,) rewards and flags."""
        slot = (self.count - 1) % self.slots
        self.actions[slot, self.envs] = actions
        self.rewards[slot, self.envs] = rewards
        self.terminated[slot, self.envs] = terminated
        self.ended[slot, self.envs] = ended
        self.acted[slot, self.envs] = True

    def valid_starts(self) -> torch.Tensor:
        """(slots, N) bool: where a sample may start. The slot was acted from, its frame stack's history is still in
        the ring, and its n-step window runs n acted steps or stops at its episode's end before leaving the data."""
        age = (self.count[None] - 1 - torch.arange(self.slots, device=self.count.device)[:, None]) % self.slots
        stored = self.count.clamp(max=self.slots)[None]  # age 0 = the env's newest frame
        ok = age + self.episode_step.clamp(max=self.frame_stack - 1) < stored
        alive = torch.ones_like(ok)
        for j in range(self.n_step):  # slot s + j acted from, and the frame after it written (age > j)
            acted = self.acted.roll(-j, 0) & (age > j)
            ok &= ~alive | acted
            alive &= ~self.ended.roll(-j, 0)
        return ok

    def stack(self, slot: torch.Tensor, env: torch.Tensor) -> torch.Tensor:
        """(B, 3k, H, W) frame stacks ending at `slot`, oldest first, not reaching before the episode's first frame."""
        back = torch.arange(self.frame_stack - 1, -1, -1, device=slot.device)[None]
        back = torch.minimum(back, self.episode_step[slot, env][:, None])
        return self.frames[(slot[:, None] - back) % self.slots, env[:, None]].flatten(1, 2)

    def gather(self, slot: torch.Tensor, env: torch.Tensor):
        """(obs, action, n-step return, bootstrap discount, next obs) of the transitions starting at (slot, env)."""
        window = (slot[:, None] + torch.arange(self.n_step, device=slot.device)[None]) % self.slots
        ret, discount, steps = nstep_return(self.rewards[window, env[:, None]], self.terminated[window, env[:, None]],
                                            self.ended[window, env[:, None]], self.gamma)
        next_slot = (slot + steps) % self.slots
        return self.stack(slot, env), self.actions[slot, env], ret, discount, self.stack(next_slot, env)

    def sample(self, batch_size: int, valid: torch.Tensor):
        """A uniform batch among the `valid` starts (see valid_starts; pass it in to reuse it across updates)."""
        flat = valid.flatten().nonzero().squeeze(1)
        pick = flat[torch.randint(len(flat), (batch_size,), device=flat.device)]
        return self.gather(pick // self.num_envs, pick % self.num_envs)


# ---------------------------------------------------------------------------------------------------------- algorithm
@torch.no_grad()
def act(encoder, actor, obs: torch.Tensor, std: float | None) -> torch.Tensor:
    """The policy's action for stacked uint8 frames: the mean (std None) or mean + unclipped noise, in (-1, 1)."""
    mu = actor(encoder(obs))
    return mu if std is None else sample_action(mu, std, clip=None)


def update_critic(encoder, critic, critic_target, actor, encoder_opt, critic_opt, obs, action, ret, discount,
                  next_obs, std: float, args: Args):
    """Clipped double-Q n-step TD on augmented frames; the encoder learns from this loss only.

    Returns (metrics, the obs features detached for the actor)."""
    with torch.no_grad():
        next_features = encoder(next_obs)
        next_action = sample_action(actor(next_features), std, args.std_clip)
        target_q1, target_q2 = critic_target(next_features, next_action)
        target = ret + discount * torch.min(target_q1, target_q2)
    features = encoder(obs)
    q1, q2 = critic(features, action)
    loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
    encoder_opt.zero_grad(set_to_none=True)
    critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    critic_opt.step()
    encoder_opt.step()
    metrics = {"losses/critic_loss": loss.item(), "losses/critic_q1": q1.mean().item(),
               "losses/critic_q2": q2.mean().item(), "losses/critic_target_q": target.mean().item()}
    return metrics, features.detach()


def update_actor(actor, critic, actor_opt, features: torch.Tensor, std: float, args: Args) -> dict:
    """Deterministic policy gradient through min(Q1, Q2) with clipped policy noise; only the actor is stepped."""
    action = sample_action(actor(features), std, args.std_clip)
    q1, q2 = critic(features, action)
    loss = -torch.min(q1, q2).mean()
    actor_opt.zero_grad(set_to_none=True)
    loss.backward(inputs=list(actor.parameters()))  # no gradients for the critic's parameters
    actor_opt.step()
    return {"losses/actor_loss": loss.item()}


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float):
    for tp, sp in zip(target.parameters(), source.parameters()):
        tp.lerp_(sp, tau)  # tp = (1 - tau) * tp + tau * sp


@torch.no_grad()
def evaluate(task, encoder, actor, args: Args, capture_video: bool = False):
    """One episode per env from task.reset() with the mean action (held for action_repeat sim steps), on D.Va's
    scale: the return is the sum of the per-sim-step rewards while alive.

    Returns (mean return, score, frames of env 0 or None). The score is the task's (`task.score`): the cart-pole's
    success rate (pole within 0.3 rad of upright at every sim step of the last 60, and alive at the end) or the
    locomotion's forward velocity (distance over the evaluation's full duration). The caller resets the training
    envs afterwards.
    """
    cartpole = args.task == "cartpole"  # the cart-pole's success needs the full episode
    frames, video = FrameStack(args.frame_stack), []

    def policy(t):
        image = task.render()
        if capture_video:
            video.append(image[0].cpu().numpy())
        return act(encoder, actor, frames.push(image) if t else frames.reset(image), std=None)

    steps = task.max_episode_length if cartpole else min(args.eval_steps, task.max_episode_length)
    returns, score = task.run_episodes(policy, steps, args.action_repeat)
    return returns.mean().item(), score.mean().item(), np.stack(video) if capture_video else None


if __name__ == "__main__":
    args = tyro.cli(Args)
    args, checkpoint = load_checkpoint(args, Args, SHAPE_ARGS)  # --resume, --eval-only: the saved settings
    try:
        args = finalize_args(args)  # after the checkpoint's settings: the task's defaults follow them
    except ValueError as error:
        sys.exit(f"error: {error}")

    from torch.utils.tensorboard import SummaryWriter

    from common.genesis_setup import resolve_device, resolve_renderer
    from common.tasks import make_task
    from common.utils import hparams_table, rng_state, run_name, save_checkpoint, seed_everything, set_rng_state, \
        write_video

    try:
        device = resolve_device(args.device)
        renderer = resolve_renderer(args.renderer, device, args.image_width)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    seed_everything(args.seed)
    video_fps = max(1, 30 // args.action_repeat)  # one video frame per agent step, at dva_cartpole.py's speed

    # ------------------------------------------------------------------------------------------------ set-up
    image_size = (args.image_size, args.image_width)
    task = make_task(args.task, args.num_envs, device, image_size, renderer, args.seed, requires_grad=False)
    score_name = task.score_name  # success (cart-pole) or forward_velocity
    score_tag = f"charts/eval_{score_name}"
    obs_shape = (3 * args.frame_stack, *image_size)
    encoder = Encoder(obs_shape).to(device)
    encoder.apply(weight_init)
    actor = Actor(encoder.repr_dim, task.act_dim, args.feature_dim, args.hidden_dim).to(device)
    critic = Critic(encoder.repr_dim, task.act_dim, args.feature_dim, args.hidden_dim).to(device)
    critic_target = deepcopy(critic).requires_grad_(False)
    encoder_opt = torch.optim.Adam(encoder.parameters(), lr=args.lr)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.lr)
    networks = {"encoder": encoder, "actor": actor, "critic": critic, "critic_target": critic_target}
    optimizers = {"encoder_opt": encoder_opt, "actor_opt": actor_opt, "critic_opt": critic_opt}
    start_iter, global_step, agent_steps, num_updates = 1, 0, 0, 0
    if checkpoint is not None:
        try:
            for key, module in networks.items():
                module.load_state_dict(checkpoint[key])
        except (RuntimeError, KeyError) as error:
            sys.exit(f"error: the checkpoint does not fit this script's networks: {error}")

    if args.eval_only:
        ret, score, clip = evaluate(task, encoder, actor, args, capture_video=True)
        out = Path(args.eval_only).with_name("eval_only.mp4")
        write_video(clip, out, fps=video_fps)
        print(f"eval over {args.num_envs} episodes: mean return {ret:.1f}, {score_name} {score:.2f}; "
              f"video: {out}")
        sys.exit(0)

    if checkpoint is not None:
        for key, opt in optimizers.items():
            opt.load_state_dict(checkpoint[key])
        start_iter, global_step = checkpoint["iteration"] + 1, checkpoint["global_step"]
        agent_steps, num_updates = checkpoint["agent_steps"], checkpoint["num_updates"]
        set_rng_state(checkpoint["rng"])
        task.set_rng_state(checkpoint["task_rng"])
        run_dir = Path(args.resume).parent
    else:
        run_dir = Path("runs") / run_name(task.name, args.exp_name, args.seed)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", hparams_table(args))
    print(f"run folder: {run_dir}  (tensorboard --logdir runs)  task {args.task}, {args.num_envs} envs, "
          f"{args.updates_per_step} updates/step, {args.image_size}x{args.image_width} px, device {device}, "
          f"renderer {renderer}")

    def save(iteration: int):
        save_checkpoint(run_dir / "checkpoint.pt", {
            **{key: module.state_dict() for key, module in {**networks, **optimizers}.items()},
            "wall_minutes": minutes_before + (time.time() - start_time) / 60,
            "iteration": iteration, "global_step": global_step, "agent_steps": agent_steps,
            "num_updates": num_updates, "rng": rng_state(), "task_rng": task.rng_state(), "args": vars(args),
        })

    # ------------------------------------------------------------------------------------------------ training loop
    buffer = ReplayBuffer(args.buffer_size, args.num_envs, image_size, task.act_dim, args.frame_stack, args.n_step,
                          args.gamma, device)
    aug = RandomShift(args.shift_pad)
    # Fresh runs explore with uniform actions for seed_steps; a resumed run refills its empty buffer with the policy.
    random_until = args.seed_steps if checkpoint is None else 0
    update_from = agent_steps + args.seed_steps

    def restart_all_envs():
        """Every env to a new episode (at the start and after an evaluation): frame stacks and buffer follow."""
        task.reset()
        image = task.render()
        frames.reset(image)
        buffer.add_frames(image, torch.zeros(args.num_envs, dtype=torch.long, device=device))
        episode.restart()
        episode_step.zero_()

    frames = FrameStack(args.frame_stack)
    episode = Episodes.zeros(args.num_envs, device)
    episode_step = torch.zeros(args.num_envs, dtype=torch.long, device=device)  # agent steps: the buffer's frame index
    with torch.no_grad():
        restart_all_envs()
    recent_returns, iteration = [], start_iter - 1
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C and `kill` end the run with a checkpoint
        signal.signal(sig, signal.default_int_handler)
    # charts/wall_minutes: the run's wall clock, which a resumed run continues from its checkpoint
    minutes_before = checkpoint.get("wall_minutes", 0.0) if checkpoint is not None and args.resume else 0.0
    start_time = time.time()
    try:
        for iteration in range(start_iter, args.max_iters + 1):
            iter_start = time.perf_counter()
            std = exploration_std(args, agent_steps)

            # Act: one agent step of every env (the action held for action_repeat sim steps), into the buffer.
            with torch.no_grad():
                if agent_steps < random_until:
                    actions = torch.rand(args.num_envs, task.act_dim, device=device) * 2 - 1
                else:
                    actions = act(encoder, actor, frames.frames, std)
                start = time.perf_counter()
                reward, terminated, ended, lived = task.repeat_step(actions, args.action_repeat)
                image = task.render()
                env_s = time.perf_counter() - start
                buffer.add_transitions(actions, reward, terminated, ended)
                episode.returns += reward
                episode.lengths += lived
                episode_step += 1
                buffer.add_frames(image, episode_step)
                frames.push(image)
                # Ended envs start a new episode right away (no gradient tape: safe at any step).
                done = ended.nonzero().flatten()
                for ret, length in episode.finish(done):
                    recent_returns = (recent_returns + [ret])[-20:]
                    writer.add_scalar("charts/episodic_return", ret, global_step)
                    writer.add_scalar("charts/episodic_length", length, global_step)
                if len(done) > 0:
                    start = time.perf_counter()
                    task.reset(done)
                    image = task.render()
                    env_s += time.perf_counter() - start
                    episode_step[done] = 0
                    buffer.add_frames(image[done], episode_step[done], done)
                    frames.reset(image, done)
            global_step += args.num_envs * args.action_repeat
            agent_steps += args.num_envs

            # Update: updates_per_step DrQ-v2 updates on random-shifted replay samples.
            start, sample_s, metrics = time.perf_counter(), 0.0, {}
            valid = buffer.valid_starts() if agent_steps >= update_from and args.updates_per_step > 0 else None
            if valid is not None and valid.any():
                sample_s = time.perf_counter() - start
                for _ in range(args.updates_per_step):
                    sample_start = time.perf_counter()
                    obs, action, ret, discount, next_obs = buffer.sample(args.batch_size, valid)
                    obs, next_obs = aug(obs), aug(next_obs)
                    sample_s += time.perf_counter() - sample_start
                    step_metrics, features = update_critic(encoder, critic, critic_target, actor, encoder_opt,
                                                           critic_opt, obs, action, ret, discount, next_obs, std, args)
                    step_metrics.update(update_actor(actor, critic, actor_opt, features, std, args))
                    soft_update(critic_target, critic, args.critic_tau)
                    step_metrics["charts/batch_reward"] = ret.mean().item()
                    for key, value in step_metrics.items():  # the mean over this iteration's updates
                        metrics[key] = metrics.get(key, 0.0) + value / args.updates_per_step
                    num_updates += 1
            update_s = time.perf_counter() - start
            iteration_s = time.perf_counter() - iter_start

            # Logging, all in one place.
            elapsed = time.time() - start_time
            sps = int((iteration - start_iter + 1) * args.num_envs * args.action_repeat / elapsed)
            metrics.update({"charts/SPS": sps, "charts/wall_minutes": minutes_before + elapsed / 60,
                            "charts/exploration_std": std, "charts/updates": num_updates, "time/env_s": env_s,
                            "time/sample_s": sample_s, "time/update_s": update_s, "time/iteration_s": iteration_s})
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, global_step)
            out_of_time = args.max_minutes > 0 and elapsed > args.max_minutes * 60
            last = iteration == args.max_iters or out_of_time
            if (args.eval_every > 0 and iteration % args.eval_every == 0) or last:
                ret, score, clip = evaluate(task, encoder, actor, args, capture_video=args.capture_video)
                writer.add_scalar("charts/eval_return", ret, global_step)
                writer.add_scalar(score_tag, score, global_step)
                print(f"  eval at iter {iteration} ({minutes_before + elapsed / 60:.1f} min): return {ret:.1f}, "
                      f"{score_name} {score:.2f}", flush=True)
                if clip is not None:
                    write_video(clip, run_dir / f"eval_{iteration:06d}.mp4", writer, step=global_step, fps=video_fps)
                with torch.no_grad():  # the in-flight training episodes are dropped, unlogged
                    restart_all_envs()
            if iteration % args.log_every == 0 or iteration == start_iter or last:
                mean_ret = np.mean(recent_returns) if recent_returns else float("nan")
                eta = (args.max_iters - iteration) * elapsed / (iteration - start_iter + 1)
                print(f"iter {iteration}/{args.max_iters}  return {mean_ret:.1f}  SPS {sps}  "
                      f"{iteration_s:.2f} s/iter  updates {num_updates}  std {std:.2f}  ETA {eta / 60:.1f} min",
                      flush=True)
            if iteration % args.save_every == 0:
                save(iteration)
            if out_of_time:
                print(f"stopping: --max-minutes {args.max_minutes} reached")
                break
    except KeyboardInterrupt:
        print("interrupted: saving the checkpoint", flush=True)
    save(iteration)
    writer.close()
    print(f"checkpoint: {run_dir / 'checkpoint.pt'}")
