"""CURL on Genesis: SAC from pixels with a contrastive (bilinear InfoNCE) loss on random crops, over a batch of envs.

Laskin, Srinivas, Abbeel. "CURL: Contrastive Unsupervised Representations for Reinforcement Learning" (ICML 2020),
a pixel baseline of D.Va (arXiv 2505.10646). Model-free and gradient-free through the simulator: every env step goes
into a replay buffer, and each batched env step is followed by `--updates-per-step` SAC + CURL updates.

- The critic (twin Q) owns the conv encoder (`common/encoder.py`) and a trunk Linear -> LayerNorm to 50 features.
  The critic loss and the contrastive loss train the encoder; the actor reads the conv features detached and has its
  own trunk, as in CURL.
- CURL: a query from the online encoder + trunk on one random crop, a key from the momentum (target critic's)
  encoder + trunk on another crop of the same observation, logits = q^T W k over the batch, positives on the diagonal.
- The task renders (H + margin) x (W + margin) px; training samples are randomly cropped to H x W per sample, and
  acting and evaluation use the centre crop (CURL: render 100, crop 84).

    python curl.py                                              # the paper's settings: 16 envs, 84 x 84 px
    python curl.py --num-envs 16 --image-size 32 --image-width 64   # the CPU configuration of visual cart-pole

Action repeat is 2 here, as for the other baselines of this repository (CURL used 8 for cart-pole on DMC).
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
from common.utils import FrameStack, load_checkpoint, range_problems


@dataclass
class Args:
    task: TaskName = "cartpole"
    """which task"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of torch, numpy, python and the task's start states"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where torch and Genesis run (auto: cuda if torch sees a GPU)"""
    renderer: Literal["auto", "batch", "rasterizer", "torch"] = "auto"
    """Genesis's BatchRenderer or Rasterizer (auto: BatchRenderer on CUDA, Rasterizer on CPU), or the torch ray
    caster of common/diff_render.py"""
    num_envs: int = 16
    """number of parallel envs"""
    max_iters: int = 30000
    """training iterations; one = one batched env step (x action repeat) of all envs and its updates
    (30000 = 960k sim steps at 16 envs and action repeat 2)"""
    max_minutes: float = 0.0
    """stop after this many minutes of wall clock (0 = no limit); with --resume: this many more (charts/wall_minutes
    goes on from the checkpoint's)"""
    image_size: int = 84
    """height in pixels of the images the networks see (after cropping)"""
    image_width: int = 0
    """width in pixels of the images the networks see (0 = square images)"""
    crop_margin: int = -1
    """the task renders (H + margin) x (W + margin) px and every sample is cropped to H x W (-1: CURL's 16 px at
    84 px scaled, round(16 x min(H, W) / 84), raised until W + margin is a multiple of 4: 16 at 84 x 84, 8 at
    32 x 64)"""
    frame_stack: int = 3
    """number of stacked frames the networks see"""
    action_repeat: int = 2
    """sim steps per agent step, with the same action (CURL used 8 for cart-pole; 2 as the other baselines here)"""
    feature_dim: int = 50
    """features of the trunk after the conv encoder (critic, actor and CURL)"""
    hidden_dim: int = 1024
    """width of the two hidden layers of the actor and of each Q network"""
    buffer_size: int = 100_000
    """replay capacity in transitions (all envs together). Stored as single uncropped uint8 frames in a time-major
    ring (no stacks, no next_obs copies): 100k x 3 x 100 x 100 B = 3.0 GB at the default 84 px + 16; 0.8 GB at
    32 x 64 + 8; pages are touched only as the ring fills. Not saved in checkpoints (too large): --resume refills it
    with --seed-steps steps of the loaded policy before updating again"""
    batch_size: int = 32
    """transitions per update (and the InfoNCE batch: B - 1 negatives per positive)"""
    updates_per_step: int = 8
    """SAC + CURL updates after each batched env step"""
    seed_steps: int = 1000
    """transitions (all envs together) of uniform random actions before the first update (CURL: 1000)"""
    gamma: float = 0.99
    """discount per agent step"""
    actor_lr: float = 1e-3
    """actor learning rate"""
    critic_lr: float = 1e-3
    """critic (and its encoder) learning rate"""
    encoder_lr: float = 1e-3
    """learning rate of the CURL update (W, the encoder and its trunk)"""
    alpha_lr: float = 1e-4
    """temperature learning rate"""
    alpha_beta: float = 0.5
    """Adam beta1 of the temperature (CURL; 0.9 for actor and critic)"""
    init_temperature: float = 0.1
    """initial SAC temperature alpha"""
    critic_tau: float = 0.01
    """target Q networks: target += tau (online - target)"""
    encoder_tau: float = 0.05
    """momentum (key) encoder and trunk: target += tau (online - target)"""
    actor_update_every: int = 2
    """update the actor and the temperature every this many updates (CURL: 2)"""
    target_update_every: int = 2
    """move the target critic (and the key encoder) every this many updates (CURL: 2)"""
    eval_every: int = 250
    """evaluate the deterministic policy every this many iterations (0 = only at the end)"""
    eval_steps: int = 1000
    """locomotion only: sim steps per evaluation episode (1000 = a full episode); cart-pole always runs its 240"""
    log_every: int = 10
    """print a console line every this many iterations"""
    save_every: int = 500
    """write runs/<run>/checkpoint.pt every this many iterations (and at the end, on Ctrl-C and on kill)"""
    resume: str | None = None
    """continue training from this checkpoint (networks, optimisers, counters; the replay buffer starts empty) with
    the settings it was saved with; a flag given with --resume changes that setting"""
    eval_only: str | None = None
    """load this checkpoint, run one evaluation episode per env with its saved settings (as --resume), print the
    mean return and write a video
    (--resume and --eval-only take the task, the image sizes, frame stack and widths from the checkpoint)"""
    capture_video: bool = False
    """record env 0 of every evaluation as mp4 in the run folder and in TensorBoard"""
    torch_threads: int = 0
    """torch CPU threads (0 = torch's default)"""


SHAPE_ARGS = ("task", "image_size", "image_width", "crop_margin", "frame_stack", "feature_dim", "hidden_dim")
"""Arguments that fix the networks' shapes (and what they see): --resume and --eval-only take them from the
checkpoint."""


def finalize_args(args: Args) -> Args:
    """Fill the defaults that depend on other flags and reject bad input before anything is built."""
    args.image_width = args.image_width or args.image_size
    if args.crop_margin == -1:
        args.crop_margin = round(16 * min(args.image_size, args.image_width) / 84)
        args.crop_margin += -(args.image_width + args.crop_margin) % 4
    problems = range_problems(
        args, at_least_one=("num_envs", "max_iters", "frame_stack", "action_repeat", "feature_dim", "hidden_dim",
                            "buffer_size", "actor_update_every", "target_update_every", "eval_steps", "log_every",
                            "save_every"),
        non_negative=("updates_per_step", "seed_steps", "max_minutes", "eval_every", "torch_threads"),
        positive=("actor_lr", "critic_lr", "encoder_lr", "alpha_lr", "init_temperature"),
        unit=("gamma", "alpha_beta", "critic_tau", "encoder_tau"))
    if min(args.image_size, args.image_width) < 15:
        problems.append(f"--image-size/--image-width must be >= 15 px after cropping, for the encoder "
                        f"(got {args.image_size}x{args.image_width})")
    if args.crop_margin < 0:
        problems.append(f"--crop-margin must be >= 0 or -1 for the default (got {args.crop_margin})")
    elif (args.image_width + args.crop_margin) % 4 and args.renderer != "torch":
        # Measured: a Genesis Rasterizer camera 70 or 66 px wide aborts the process (malloc(): invalid size);
        # 64, 68, 72 work (rows of 3-byte pixels must fill whole 4-byte words).
        problems.append(f"the rendered width --image-width + --crop-margin = {args.image_width + args.crop_margin} "
                        f"must be a multiple of 4 (Genesis's camera corrupts memory at other widths)")
    if args.batch_size < 2:
        problems.append(f"--batch-size must be >= 2: InfoNCE needs negatives (got {args.batch_size})")
    if args.num_envs >= 1 and args.buffer_size // args.num_envs < args.frame_stack + 2:
        problems.append(f"--buffer-size must hold at least frame_stack + 2 steps per env "
                        f"(got {args.buffer_size} for {args.num_envs} envs)")
    for flag, path in (("--resume", args.resume), ("--eval-only", args.eval_only)):
        if path is not None and not Path(path).is_file():
            problems.append(f"{flag}: no checkpoint file at {path}")
    if problems:
        raise ValueError("; ".join(problems))
    return args


# ---------------------------------------------------------------------------------------------------------- crops
def crop_at(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Window (size) of each image (B, C, H, W) whose top-left corner is (top[b], left[b])."""
    b, c = images.shape[:2]
    dev = images.device
    rows = (top.to(dev)[:, None] + torch.arange(size[0], device=dev))[:, None, :, None]
    cols = (left.to(dev)[:, None] + torch.arange(size[1], device=dev))[:, None, None, :]
    return images[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows, cols]


def random_crop(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """CURL's augmentation: an independent, uniformly placed H x W window per sample (the same for its frames)."""
    b, _, h, w = images.shape
    top = torch.randint(0, h - size[0] + 1, (b,))
    left = torch.randint(0, w - size[1] + 1, (b,))
    return crop_at(images, top, left, size)


def center_crop(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The middle H x W window (top-left at ((H' - H) // 2, (W' - W) // 2)): what acting and evaluation see."""
    top, left = (images.shape[-2] - size[0]) // 2, (images.shape[-1] - size[1]) // 2
    return images[..., top : top + size[0], left : left + size[1]]


# ---------------------------------------------------------------------------------------------------------- replay
class ReplayBuffer:
    """Transitions of `num_envs` envs in a time-major ring of single uint8 frames, (slots, num_envs, 3, H', W').

    Each env writes its own column: the frame it acts on, then (in the same slot) the action, the reward summed over
    the action repeat and whether the episode terminated. The next observation is the next slot of the same column;
    when an episode ends that slot holds its last frame (no action), and the next episode starts in a new slot with
    `ep_step` 0. Stacks are rebuilt at sampling from `ep_step` (the frames before an episode's first one repeat it,
    as FrameStack.reset does), so no sample crosses an episode boundary or reads an overwritten frame.
    """

    def __init__(self, capacity: int, num_envs: int, frame_shape: tuple[int, int, int], act_dim: int,
                 frame_stack: int, device: torch.device):
        self.slots, self.num_envs, self.k, self.device = capacity // num_envs, num_envs, frame_stack, device
        shape = (self.slots, num_envs)
        self.frames = torch.empty(*shape, *frame_shape, dtype=torch.uint8, device=device)  # touched as it fills
        self.actions = torch.zeros(*shape, act_dim, device=device)
        self.rewards = torch.zeros(shape, device=device)
        self.terminal = torch.zeros(shape, dtype=torch.bool, device=device)
        self.has_action = torch.zeros(shape, dtype=torch.bool, device=device)
        self.ep_step = torch.full(shape, -1, dtype=torch.long, device=device)  # agent steps since the episode began
        self.ptr = torch.zeros(num_envs, dtype=torch.long, device=device)  # next slot to write, per env
        self._valid = None

    def nbytes(self) -> int:
        return self.frames.numel() * self.frames.element_size()

    def add_frames(self, frames: torch.Tensor, env_ids: torch.Tensor | None = None, first: bool = False):
        """Append a frame (n, H', W', 3) to the column of each of `env_ids` (all if None); `first`: a new episode."""
        env_ids = torch.arange(self.num_envs, device=self.device) if env_ids is None else env_ids.to(self.device)
        t = self.ptr[env_ids]
        previous = self.ep_step[(t - 1) % self.slots, env_ids]
        self.frames[t, env_ids] = frames.to(self.device).permute(0, 3, 1, 2)
        self.ep_step[t, env_ids] = 0 if first else previous + 1
        self.has_action[t, env_ids] = False
        self.ptr[env_ids] = (t + 1) % self.slots
        self._valid = None

    def add_action(self, actions: torch.Tensor, rewards: torch.Tensor, terminal: torch.Tensor):
        """The action every env took on its newest frame, its reward and whether the episode terminated there."""
        t, e = (self.ptr - 1) % self.slots, torch.arange(self.num_envs, device=self.device)
        self.actions[t, e], self.rewards[t, e] = actions.to(self.device), rewards.to(self.device)
        self.terminal[t, e], self.has_action[t, e] = terminal.to(self.device), True
        self._valid = None

    def valid(self) -> torch.Tensor:
        """(slots, num_envs) bool: the slot starts a transition whose stacks and next frame are all in the ring."""
        if self._valid is None:
            # slots older than slot i in its column (when the column has wrapped; larger before, which is harmless)
            age = (torch.arange(self.slots, device=self.device)[:, None] - self.ptr[None, :]) % self.slots
            successor = torch.roll(self.ep_step, -1, dims=0)
            self._valid = (self.has_action & (successor == self.ep_step + 1)
                           & (self.ep_step.clamp(max=self.k - 1) <= age))
        return self._valid

    def __len__(self) -> int:
        return int(self.valid().sum())

    def stack(self, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The stacked observation (B, 3k, H', W') at slots t of envs e, oldest frame first."""
        back = torch.arange(self.k - 1, -1, -1, device=self.device)
        idx = (t[:, None] - torch.minimum(back[None, :], self.ep_step[t, e][:, None])) % self.slots
        return self.frames[idx, e[:, None]].flatten(1, 2)

    def sample(self, batch_size: int):
        """Uniform transitions: (obs, action, reward, not_done, next_obs), frames uncropped."""
        choices = self.valid().flatten().nonzero().squeeze(1)
        pick = choices[torch.randint(len(choices), (batch_size,), device=self.device)]
        t, e = pick // self.num_envs, pick % self.num_envs
        not_done = (~self.terminal[t, e]).float()
        return self.stack(t, e), self.actions[t, e], self.rewards[t, e], not_done, self.stack((t + 1) % self.slots, e)


# ---------------------------------------------------------------------------------------------------------- networks
def weight_init(m: nn.Module):
    """CURL's (SAC-AE's) initialisation: orthogonal Linear weights, delta-orthogonal convolutions, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)
        mid = m.weight.shape[2] // 2
        nn.init.orthogonal_(m.weight.data[:, :, mid, mid], nn.init.calculate_gain("relu"))


def trunk(repr_dim: int, feature_dim: int) -> nn.Sequential:
    """CURL's head of the encoder: Linear -> LayerNorm (its `output_logits=True`: no tanh)."""
    return nn.Sequential(nn.Linear(repr_dim, feature_dim), nn.LayerNorm(feature_dim))


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                         nn.Linear(hidden_dim, out_dim))


class Critic(nn.Module):
    """Twin Q on (trunk(encoder(obs)), action). The encoder and trunk are also CURL's query (online) network."""

    def __init__(self, obs_shape: tuple[int, int, int], act_dim: int, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.encoder = Encoder(obs_shape)
        self.trunk = trunk(self.encoder.repr_dim, feature_dim)
        self.q1 = mlp(feature_dim + act_dim, hidden_dim, 1)
        self.q2 = mlp(feature_dim + act_dim, hidden_dim, 1)

    def embed(self, obs: torch.Tensor) -> torch.Tensor:
        """The 50 features of CURL's InfoNCE (query with the online critic, key with the target critic)."""
        return self.trunk(self.encoder(obs))

    def q_values(self, conv: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both Q from conv features (the actor update passes them detached)."""
        h = torch.cat([self.trunk(conv), action], dim=-1)
        return self.q1(h).squeeze(-1), self.q2(h).squeeze(-1)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_values(self.encoder(obs), action)


class Actor(nn.Module):
    """Tanh-squashed Gaussian on the critic encoder's conv features, through its own trunk (CURL's tied convs)."""

    def __init__(self, repr_dim: int, act_dim: int, feature_dim: int, hidden_dim: int,
                 log_std_bounds: tuple[float, float] = (-10.0, 2.0)):
        super().__init__()
        self.trunk = trunk(repr_dim, feature_dim)
        self.policy = mlp(feature_dim, hidden_dim, 2 * act_dim)
        self.log_std_bounds = log_std_bounds

    def forward(self, conv: torch.Tensor):
        """Returns (tanh(mean), a sample, its log-probability (B,)), the sample squashed by tanh."""
        mu, log_std = self.policy(self.trunk(conv)).chunk(2, dim=-1)
        lo, hi = self.log_std_bounds
        log_std = lo + 0.5 * (hi - lo) * (torch.tanh(log_std) + 1)
        noise = torch.randn_like(mu)
        pi = torch.tanh(mu + noise * log_std.exp())
        log_pi = (-0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_pi = log_pi - torch.log(F.relu(1 - pi.pow(2)) + 1e-6).sum(-1)  # the tanh's change of volume
        return torch.tanh(mu), pi, log_pi


# ---------------------------------------------------------------------------------------------------------- CURL
def curl_logits(z_anchor: torch.Tensor, z_positive: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Bilinear similarities (B, B): logits[i, j] = z_anchor[i]^T W z_positive[j], minus each row's maximum
    (the softmax is unchanged; the exponentials stay finite)."""
    logits = z_anchor @ (W @ z_positive.T)
    return logits - logits.max(dim=1, keepdim=True).values


def info_nce_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the positive of row i in column i: labels arange(B)."""
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float):
    for tp, sp in zip(target.parameters(), source.parameters()):
        tp.lerp_(sp, tau)  # tp = (1 - tau) * tp + tau * sp


class CurlSacAgent:
    """SAC + CURL: networks, optimisers and the three updates; each update returns its metrics."""

    def __init__(self, obs_shape: tuple[int, int, int], act_dim: int, args: Args, device: torch.device):
        self.args, self.image_size = args, obs_shape[1:]
        self.critic = Critic(obs_shape, act_dim, args.feature_dim, args.hidden_dim).to(device)
        self.actor = Actor(self.critic.encoder.repr_dim, act_dim, args.feature_dim, args.hidden_dim).to(device)
        self.critic.apply(weight_init)
        self.actor.apply(weight_init)
        self.critic_target = deepcopy(self.critic).requires_grad_(False)  # its encoder + trunk: CURL's key network
        self.W = nn.Parameter(torch.rand(args.feature_dim, args.feature_dim, device=device))  # as CURL: U(0, 1)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(args.init_temperature), device=device))
        self.target_entropy = -float(act_dim)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr, betas=(0.9, 0.999))
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, betas=(0.9, 0.999))
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=args.alpha_lr, betas=(args.alpha_beta, 0.999))
        self.curl_opt = torch.optim.Adam([self.W, *self.critic.encoder.parameters(), *self.critic.trunk.parameters()],
                                         lr=args.encoder_lr)
        self.num_updates = 0

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Actions in [-1, 1] for centre-cropped stacks (N, 3k, H, W)."""
        mean, sample, _ = self.actor(self.critic.encoder(obs))
        return mean if deterministic else sample

    def update_critic(self, obs, action, reward, not_done, next_obs) -> dict:
        with torch.no_grad():
            _, next_action, next_log_pi = self.actor(self.critic.encoder(next_obs))
            target_q1, target_q2 = self.critic_target(next_obs, next_action)
            target_v = torch.min(target_q1, target_q2) - self.alpha * next_log_pi
            target_q = reward + not_done * self.args.gamma * target_v
        q1, q2 = self.critic(obs, action)
        loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        self.critic_opt.zero_grad()
        loss.backward()
        self.critic_opt.step()
        return {"losses/critic_loss": loss.item(), "losses/q_mean": q1.mean().item()}

    def update_actor_and_alpha(self, obs) -> dict:
        with torch.no_grad():
            conv = self.critic.encoder(obs)  # detached: the actor loss does not train the encoder
        _, pi, log_pi = self.actor(conv)
        q1, q2 = self.critic.q_values(conv, pi)
        actor_loss = (self.alpha.detach() * log_pi - torch.min(q1, q2)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        alpha_loss = (self.alpha * (-log_pi - self.target_entropy).detach()).mean()
        self.alpha_opt.zero_grad()
        alpha_loss.backward()
        self.alpha_opt.step()
        return {"losses/actor_loss": actor_loss.item(), "losses/alpha_loss": alpha_loss.item(),
                "charts/entropy": -log_pi.mean().item()}

    def update_curl(self, anchor, positive) -> dict:
        z_anchor = self.critic.embed(anchor)
        with torch.no_grad():
            z_positive = self.critic_target.embed(positive)  # the momentum encoder: no gradient
        logits = curl_logits(z_anchor, z_positive, self.W)
        loss = info_nce_loss(logits)
        self.curl_opt.zero_grad()
        loss.backward()
        self.curl_opt.step()
        accuracy = (logits.argmax(1) == torch.arange(len(logits), device=logits.device)).float().mean()
        return {"losses/curl_loss": loss.item(), "charts/curl_accuracy": accuracy.item()}

    def update(self, buffer: ReplayBuffer) -> dict:
        """One SAC + CURL update on a random batch, in CURL's order: critic, actor and alpha (every
        actor_update_every), targets (every target_update_every), contrastive loss."""
        obs, action, reward, not_done, next_obs = buffer.sample(self.args.batch_size)
        obs, positive, next_obs = (random_crop(x, self.image_size) for x in (obs, obs, next_obs))
        metrics = self.update_critic(obs, action, reward, not_done, next_obs)
        if self.num_updates % self.args.actor_update_every == 0:
            metrics |= self.update_actor_and_alpha(obs)
        if self.num_updates % self.args.target_update_every == 0:
            soft_update(self.critic_target.q1, self.critic.q1, self.args.critic_tau)
            soft_update(self.critic_target.q2, self.critic.q2, self.args.critic_tau)
            soft_update(self.critic_target.encoder, self.critic.encoder, self.args.encoder_tau)
            soft_update(self.critic_target.trunk, self.critic.trunk, self.args.encoder_tau)
        metrics |= self.update_curl(obs, positive)
        metrics["charts/alpha"] = self.alpha.item()
        self.num_updates += 1
        return metrics

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "curl_W": self.W.detach().clone(),
                "log_alpha": self.log_alpha.detach().clone(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(), "alpha_opt": self.alpha_opt.state_dict(),
                "curl_opt": self.curl_opt.state_dict(), "num_updates": self.num_updates}

    def load_networks(self, state: dict):
        for module, key in ((self.actor, "actor"), (self.critic, "critic"), (self.critic_target, "critic_target")):
            module.load_state_dict(state[key])
        with torch.no_grad():
            self.W.copy_(state["curl_W"])
            self.log_alpha.copy_(state["log_alpha"])

    def load_optimisers(self, state: dict):
        for opt, key in ((self.actor_opt, "actor_opt"), (self.critic_opt, "critic_opt"),
                         (self.alpha_opt, "alpha_opt"), (self.curl_opt, "curl_opt")):
            opt.load_state_dict(state[key])
        self.num_updates = state["num_updates"]


# ---------------------------------------------------------------------------------------------------------- episodes
@torch.no_grad()
def evaluate(task, agent: CurlSacAgent, args: Args, capture_video: bool = False):
    """One episode per env from task.reset() with the mean action on centre crops, at the training action repeat.

    The return is the sum of the task's per-sim-step rewards while alive, as D.Va's evaluation (240 sim steps for
    cart-pole, --eval-steps for locomotion). Returns (mean return, the task's score: cart-pole success rate or
    locomotion forward velocity, frames of env 0 as the policy sees them or None). The caller resets the training
    batch afterwards.
    """
    cartpole = task.name == "cartpole"  # the cart-pole's success needs the full episode
    size = (args.image_size, args.image_width)
    frames, video = FrameStack(args.frame_stack), []

    def policy(t):
        image = task.render()
        if capture_video:
            video.append(center_crop(image[0].permute(2, 0, 1), size).permute(1, 2, 0).cpu().numpy())
        return agent.act(center_crop(frames.push(image) if t else frames.reset(image), size), deterministic=True)

    steps = task.max_episode_length if cartpole else min(args.eval_steps, task.max_episode_length)
    returns, score = task.run_episodes(policy, steps, args.action_repeat)
    return returns.mean().item(), score.mean().item(), np.stack(video) if capture_video else None


if __name__ == "__main__":
    args = tyro.cli(Args)
    args, checkpoint = load_checkpoint(args, Args, SHAPE_ARGS)  # --resume, --eval-only: the saved settings
    try:
        args = finalize_args(args)  # after the checkpoint's settings: the defaults that depend on them follow them
    except ValueError as error:
        sys.exit(f"error: {error}")

    from torch.utils.tensorboard import SummaryWriter

    from common.genesis_setup import resolve_device, resolve_renderer
    from common.tasks import make_task
    from common.utils import (hparams_table, rng_state, run_name, save_checkpoint, seed_everything, set_rng_state,
                              write_video)

    try:
        device = resolve_device(args.device)
        renderer = resolve_renderer(args.renderer, device)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    seed_everything(args.seed)

    # ------------------------------------------------------------------------------------------------ set-up
    image_size = (args.image_size, args.image_width)
    render_size = (args.image_size + args.crop_margin, args.image_width + args.crop_margin)
    task_kwargs = dict(image_size=render_size, renderer=renderer, requires_grad=False, seed=args.seed)
    task = make_task(args.task, args.num_envs, device, **task_kwargs)
    agent = CurlSacAgent((3 * args.frame_stack, *image_size), task.act_dim, args, device)
    start_iter, global_step = 1, 0
    if checkpoint is not None:
        try:
            agent.load_networks(checkpoint)
        except (RuntimeError, KeyError) as error:
            sys.exit(f"error: the checkpoint does not fit this script's networks: {error}")

    def report_eval(score: float) -> str:
        return f"success {score:.2f}" if task.score_name == "success" else f"forward velocity {score:.2f} m/s"

    if args.eval_only:
        ret, score, clip = evaluate(task, agent, args, capture_video=True)
        out = Path(args.eval_only).with_name("eval_only.mp4")
        write_video(clip, out)
        print(f"eval over {args.num_envs} episodes: mean return {ret:.1f}, {report_eval(score)}; video: {out}")
        sys.exit(0)

    if checkpoint is not None:
        agent.load_optimisers(checkpoint)
        start_iter, global_step = checkpoint["iteration"] + 1, checkpoint["global_step"]
        set_rng_state(checkpoint["rng"])
        task.set_rng_state(checkpoint["task_rng"])
        run_dir = Path(args.resume).parent
    else:
        run_dir = Path("runs") / run_name(task.name, args.exp_name, args.seed)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", hparams_table(args))
    buffer = ReplayBuffer(args.buffer_size, args.num_envs, (3, *render_size), task.act_dim, args.frame_stack, device)
    print(f"run folder: {run_dir}  (tensorboard --logdir runs)  task {args.task}, {args.num_envs} envs, device "
          f"{device}, renderer {renderer}; renders {render_size[0]}x{render_size[1]} px, crops "
          f"{image_size[0]}x{image_size[1]}; replay: {buffer.slots * args.num_envs} transitions, "
          f"{buffer.nbytes() / 2**30:.2f} GiB of frames when full")

    def save(iteration: int):
        save_checkpoint(run_dir / "checkpoint.pt", {
            "wall_minutes": minutes_before + (time.time() - start_time) / 60,
            **agent.state_dict(), "iteration": iteration, "global_step": global_step, "rng": rng_state(),
            "task_rng": task.rng_state(), "args": vars(args),
        })

    def restart_episodes():
        """All envs to new episodes: at the start, and after an evaluation (in-flight episodes are dropped)."""
        task.reset()
        image = task.render()
        frames.reset(image)
        buffer.add_frames(image, first=True)
        episode_return.zero_()
        episode_length.zero_()

    # ------------------------------------------------------------------------------------------------ training loop
    # The first seed iterations act at random (a fresh run) or with the loaded policy (--resume), without updates.
    seed_iters = math.ceil(args.seed_steps / args.num_envs)
    frames = FrameStack(args.frame_stack)
    episode_return = torch.zeros(args.num_envs, device=device)
    episode_length = torch.zeros(args.num_envs, dtype=torch.long, device=device)
    restart_episodes()
    recent_returns, iteration = [], start_iter - 1
    # Ctrl-C and `kill` (also of a background job, which ignores SIGINT by default) end the run with a checkpoint.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    # charts/wall_minutes: the run's wall clock, which a resumed run continues from its checkpoint
    minutes_before = checkpoint.get("wall_minutes", 0.0) if checkpoint is not None and args.resume else 0.0
    start_time = time.time()
    try:
        for iteration in range(start_iter, args.max_iters + 1):
            iter_start = time.perf_counter()
            seeding = iteration < start_iter + seed_iters

            # Act and step every env (action repeat), store the transition, restart the envs that ended.
            with torch.no_grad():
                if seeding and checkpoint is None:
                    action = torch.rand(args.num_envs, task.act_dim, device=device) * 2 - 1
                else:
                    action = agent.act(center_crop(frames.frames, image_size))
                reward, terminal, ended, steps = task.repeat_step(action, args.action_repeat)
                buffer.add_action(action, reward, terminal)
                image = task.render()
                frames.push(image)
                buffer.add_frames(image)  # the next observation; for an ended env its episode's last frame
                episode_return += reward
                episode_length += steps
                global_step += args.num_envs * args.action_repeat
                ended_ids = ended.nonzero().flatten()
                for i in ended_ids.tolist():
                    recent_returns = (recent_returns + [episode_return[i].item()])[-20:]
                    writer.add_scalar("charts/episodic_return", episode_return[i].item(), global_step)
                    writer.add_scalar("charts/episodic_length", episode_length[i].item(), global_step)
                if len(ended_ids) > 0:
                    episode_return[ended_ids], episode_length[ended_ids] = 0.0, 0
                    task.reset(ended_ids)
                    image = task.render()
                    frames.reset(image, ended_ids)
                    buffer.add_frames(image[ended_ids], ended_ids, first=True)
            env_s = time.perf_counter() - iter_start

            # SAC + CURL updates on random crops of replayed transitions.
            start = time.perf_counter()
            metrics = {}
            if not seeding and len(buffer) > 0:
                for _ in range(args.updates_per_step):
                    for key, value in agent.update(buffer).items():
                        metrics.setdefault(key, []).append(value)
            update_s = time.perf_counter() - start
            iteration_s = time.perf_counter() - iter_start

            # Logging, evaluation, checkpoints.
            elapsed = time.time() - start_time
            sps = int((iteration - start_iter + 1) * args.num_envs * args.action_repeat / elapsed)
            scalars = {key: float(np.mean(values)) for key, values in metrics.items()}
            scalars |= {"charts/SPS": sps, "charts/wall_minutes": minutes_before + elapsed / 60, "time/env_s": env_s,
                        "time/update_s": update_s, "time/iteration_s": iteration_s}
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, global_step)
            out_of_time = args.max_minutes > 0 and elapsed > args.max_minutes * 60
            last = iteration == args.max_iters or out_of_time
            if (args.eval_every > 0 and iteration % args.eval_every == 0) or last:
                ret, score, clip = evaluate(task, agent, args, capture_video=args.capture_video)
                writer.add_scalar("charts/eval_return", ret, global_step)
                writer.add_scalar(f"charts/eval_{task.score_name}", score, global_step)
                print(f"  eval at iter {iteration} ({minutes_before + elapsed / 60:.1f} min): return {ret:.1f}, "
                      f"{report_eval(score)}", flush=True)
                if clip is not None:
                    write_video(clip, run_dir / f"eval_{iteration:06d}.mp4", writer, step=global_step)
                with torch.no_grad():
                    restart_episodes()
            if iteration % args.log_every == 0 or last:
                mean_ret = np.mean(recent_returns) if recent_returns else float("nan")
                per_iter = elapsed / (iteration - start_iter + 1)
                eta = (args.max_iters - iteration) * per_iter
                if args.max_minutes > 0:
                    eta = min(eta, max(args.max_minutes * 60 - elapsed, 0.0))
                print(f"iter {iteration}/{args.max_iters}  return {mean_ret:.1f}  SPS {sps}  "
                      f"{iteration_s:.2f} s/iter (env {env_s:.2f}, updates {update_s:.2f})  ETA {eta / 60:.1f} min",
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
