"""DreamerV3 from pixels over a batch of Genesis envs: the model-based baseline of D.Va's comparison.

Hafner et al. "Mastering Diverse Domains through World Models" (arXiv 2301.04104), as D.Va's authors ran it (You et
al., arXiv 2505.10646, Appendix C, Table 6; their config `examples/cfg/dreamerv3/configs.yaml`, on the PyTorch
DreamerV3 of NM512/dreamerv3-torch). A world model (conv encoder, an RSSM with 32 x 32 discrete latents, conv decoder,
reward and continue heads) learns from replayed sequences; an actor and a critic learn inside it, on 15-step imagined
rollouts, from lambda-returns scaled by their 5-95 % percentile range. The envs run in parallel: one iteration is one
batched agent step of all envs (each action held for `--action-repeat` simulation steps) and then as many updates as
the train ratio asks for (512 replayed steps per collected agent step: with batches of 16 x 64 steps, one update per
2 agent steps, i.e. 2 per iteration with 4 envs). Genesis runs without a gradient tape: the simulator is only sampled.

    python dreamerv3.py                                                  # cart-pole, the paper's settings (64 px)
    python dreamerv3.py --num-envs 16 --image-size 32 --image-width 64   # the CPU configuration of the D.Va runs
    python dreamerv3.py --task hopper

The parts, each under its own name below: `RSSM` (32 categoricals of 32 classes, 1 % unimix, straight-through
samples), `symlog`/`symexp` and the two-hot heads of reward and critic (`two_hot`: 255 bins on [-20, 20] in symlog
space), `kl_balance_loss` (dynamics 0.5, representation 0.1, 1 nat free bits), the continue head, `imagine` (15
states), `lambda_returns`, `ReturnNorm` (EMA of the 5th and 95th percentiles), the critic's regulariser towards its EMA
copy, Adam with the reference's learning rates, epsilons and clips, and its `prefill` (2500 agent steps of uniform
actions) and `pretrain` (100 updates at once). Where the paper is silent this follows NM512/dreamerv3-torch (the code
the authors vendored); where it departs (docs/method.md says why): one file, no config system, torch.compile or mixed
precision; the replay is a ring of frames per env that keeps every terminal frame, no delayed reset (a tape-free
Genesis resets one env at any step), and is refilled after --resume instead of checkpointed; no vector inputs to
symlog; non-square images; the entropy bonus on detached features; D.Va's evaluation (`evaluate`).
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

from common.tasks import TaskName
from common.utils import Episodes, load_checkpoint, range_problems


@dataclass
class Args:
    task: TaskName = "cartpole"
    """which task"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of torch, numpy, python and the task's start states"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where torch, Genesis and the replay buffer live (auto: cuda if torch sees a GPU)"""
    renderer: Literal["auto", "batch", "rasterizer", "torch"] = "auto"
    """Genesis's BatchRenderer or Rasterizer (auto: BatchRenderer on CUDA, Rasterizer on CPU), or the torch ray
    caster of common/diff_render.py"""
    num_envs: int = 4
    """number of parallel envs (the paper's 4)"""
    max_iters: int | None = None
    """iterations (one = a batched agent step + its updates); default: the authors' 1e7 simulation steps"""
    max_minutes: float = 0.0
    """stop after this many minutes of wall clock (0 = no limit); with --resume: this many more (charts/wall_minutes
    goes on from the checkpoint's)"""
    image_size: int = 64
    """image height in pixels (and width, unless --image-width is given)"""
    image_width: int = 0
    """image width in pixels (0 = square images)"""
    action_repeat: int = 2
    """simulation steps per agent step (the action is held; the agent's reward is their sum)"""
    batch_size: int = 16
    """sequences per update"""
    batch_length: int = 64
    """agent steps per sequence"""
    train_ratio: float = 512
    """replayed steps (batch_size x batch_length per update) per collected agent step"""
    prefill: int = 2500
    """agent steps (all envs together) of uniform actions before the first update (after --resume: of the policy)"""
    pretrain: int = 100
    """updates done at once when training starts (not again after --resume)"""
    buffer_size: int = 1_000_000
    """replay capacity in agent steps; each frame is stored once (12 GB at 64 x 64 when full; not checkpointed)"""
    deter: int = 512
    """RSSM: width of the deterministic (GRU) state (model size S)"""
    hidden: int = 512
    """RSSM: width of its hidden layers"""
    stoch: int = 32
    """RSSM: number of categorical latents"""
    discrete: int = 32
    """RSSM: classes per categorical latent"""
    units: int = 512
    """width of the MLPs (reward, continue, actor, critic)"""
    layers: int = 2
    """hidden layers of the MLPs"""
    cnn_depth: int = 32
    """channels of the first conv layer (doubled at every stride-2 stage)"""
    model_lr: float = 1e-4
    """world model: Adam learning rate"""
    model_eps: float = 1e-8
    """world model: Adam epsilon"""
    model_grad_clip: float = 1000.0
    """world model: gradient norm clip"""
    kl_free: float = 1.0
    """free bits: each KL term (nats, summed over the latents) is clipped from below at this value"""
    dyn_scale: float = 0.5
    """dynamics loss scale: KL[sg(posterior) || prior]"""
    rep_scale: float = 0.1
    """representation loss scale: KL[posterior || sg(prior)]"""
    imag_horizon: int = 15
    """imagined states per rollout (the start state included)"""
    gamma: float = 0.997
    """discount per agent step"""
    lam: float = 0.95
    """lambda of the lambda-returns"""
    actor_lr: float = 3e-5
    """actor: Adam learning rate"""
    critic_lr: float = 3e-5
    """critic: Adam learning rate"""
    ac_eps: float = 1e-5
    """actor and critic: Adam epsilon"""
    ac_grad_clip: float = 100.0
    """actor and critic: gradient norm clip"""
    actor_entropy: float = 3e-4
    """scale of the actor's entropy bonus"""
    critic_ema: float = 0.98
    """decay of the critic's EMA copy, its regulariser: ema = decay * ema + (1 - decay) * critic"""
    return_norm_decay: float = 0.99
    """decay of the EMA of the returns' 5th and 95th percentiles"""
    eval_every: int = 1250
    """evaluate the deterministic policy every this many iterations once updates have begun (0 = only at the end)"""
    eval_steps: int = 1000
    """simulation steps per evaluation episode of a locomotion task (cart-pole episodes are 240 steps)"""
    log_every: int = 20
    """print a console line every this many iterations"""
    save_every: int = 500
    """write runs/<run>/checkpoint.pt every this many iterations (and at the end, on Ctrl-C and on kill)"""
    resume: str | None = None
    """continue training from this checkpoint (networks, optimisers, counters; the replay starts empty) with the
    settings it was saved with; a flag given with --resume changes that setting"""
    eval_only: str | None = None
    """load this checkpoint, run one evaluation episode per env with its saved settings (as --resume), print the
    mean return and write a video"""
    capture_video: bool = False
    """record env 0 of every evaluation as mp4 in the run folder and in TensorBoard"""
    torch_threads: int = 0
    """torch CPU threads (0 = torch's default)"""


SHAPE_ARGS = ("task", "image_size", "image_width", "deter", "hidden", "stoch", "discrete", "units", "layers",
              "cnn_depth")
"""Arguments that fix the networks' shapes: --resume and --eval-only take them from the checkpoint."""
TOTAL_SIM_STEPS = 10_000_000  # the authors' config (`dflex_vision: steps: 1e7`)
BINS, BIN_LIMIT = 255, 20.0  # two-hot bins: 255, evenly spaced on [-20, 20] in symlog space (the reference's)
UNIMIX = 0.01  # share of the uniform distribution mixed into the latents' categoricals
ACTOR_STD = (0.1, 1.0)  # the actor's smallest and largest std


def conv_stages(height: int, width: int) -> int | None:
    """Stride-2 stages of the conv encoder: both sides halve until the smaller is 4 px. None if the sizes do not
    allow it (the smaller side must be 4 x 2^k, k >= 1, and the larger a multiple of 2^k)."""
    small = min(height, width)
    stages = round(math.log2(small / 4)) if small >= 8 else 0
    if stages < 1 or small != 4 * 2**stages or max(height, width) % 2**stages:
        return None
    return stages


def finalize_args(args: Args) -> Args:
    """Fill the defaults that depend on other flags and reject bad input before anything is built."""
    if args.max_iters is None and args.num_envs >= 1 and args.action_repeat >= 1:
        args.max_iters = math.ceil(TOTAL_SIM_STEPS / (args.num_envs * args.action_repeat))
    args.image_width = args.image_width or args.image_size
    problems = range_problems(
        args, at_least_one=("num_envs", "action_repeat", "batch_size", "batch_length", "buffer_size", "deter",
                            "hidden", "stoch", "discrete", "units", "layers", "cnn_depth", "eval_steps", "log_every",
                            "save_every"),
        non_negative=("train_ratio", "prefill", "pretrain", "kl_free", "dyn_scale", "rep_scale", "actor_entropy",
                      "max_minutes", "eval_every", "torch_threads"),
        positive=("model_lr", "model_eps", "model_grad_clip", "actor_lr", "critic_lr", "ac_eps", "ac_grad_clip"),
        unit=("gamma", "lam", "critic_ema", "return_norm_decay"))
    if args.max_iters is not None and args.max_iters < 1:
        problems.append(f"--max-iters must be >= 1 (got {args.max_iters})")
    if args.imag_horizon < 2:
        problems.append(f"--imag-horizon must be >= 2 for a lambda-return (got {args.imag_horizon})")
    if conv_stages(args.image_size, args.image_width) is None:
        problems.append(f"--image-size/--image-width: the smaller side must be 4 x a power of two (8, 16, 32, 64, ...) "
                        f"and the larger a multiple of its stride (got {args.image_size}x{args.image_width})")
    if args.num_envs >= 1 and args.buffer_size // args.num_envs < args.batch_length:
        problems.append(f"--buffer-size {args.buffer_size} leaves fewer than --batch-length {args.batch_length} "
                        f"frames per env")
    for flag, path in (("--resume", args.resume), ("--eval-only", args.eval_only)):
        if path is not None and not Path(path).is_file():
            problems.append(f"{flag}: no checkpoint file at {path}")
    if problems:
        raise ValueError("; ".join(problems))
    return args


# ---------------------------------------------------------------------------------------------------------- symlog
def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) log(1 + |x|): squashes large magnitudes, identity-like near 0."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    """The inverse of symlog: sign(x) (exp(|x|) - 1)."""
    return torch.sign(x) * torch.expm1(x.abs())


def two_hot(x: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """(...,) values (already in symlog space) -> (..., K) weights on the two bins around each value, linear in the
    distance, so that sum(weights * bins) = x; a value beyond an end bin puts all its weight on that bin."""
    k = len(bins)
    above = torch.searchsorted(bins, x.contiguous(), right=True)  # the first bin > x
    below, above = (above - 1).clamp(0, k - 1), above.clamp(0, k - 1)
    same = below == above
    to_below = torch.where(same, 1.0, (bins[below] - x).abs())
    to_above = torch.where(same, 1.0, (bins[above] - x).abs())
    total = to_below + to_above
    return (F.one_hot(below, k) * (to_above / total)[..., None] + F.one_hot(above, k) * (to_below / total)[..., None])


def two_hot_loss(logits: torch.Tensor, target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a two-hot head's logits (..., K) against the two-hot code of symlog(target) (...,)."""
    return -(two_hot(symlog(target.detach()), bins) * F.log_softmax(logits, -1)).sum(-1)


def two_hot_mean(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """A two-hot head's prediction: symexp of the expected bin (the reference's `DiscDist.mean`)."""
    return symexp((F.softmax(logits, -1) * bins).sum(-1))


# ---------------------------------------------------------------------------------------------------------- networks
def fan_avg(layer: nn.Module) -> float:
    if isinstance(layer, nn.Linear):
        return (layer.in_features + layer.out_features) / 2
    return math.prod(layer.kernel_size) * (layer.in_channels + layer.out_channels) / 2  # a convolution


def init_hidden(module: nn.Module):
    """The reference's init of hidden layers: truncated normal (at 2 std) of variance 1 / fan_avg, zero biases."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            std = math.sqrt(1.0 / fan_avg(layer)) / 0.87962566103423978  # the std of a unit normal cut at +-2
            nn.init.trunc_normal_(layer.weight, 0.0, std, -2 * std, 2 * std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def init_output(layer: nn.Module, scale: float):
    """The reference's init of output layers: uniform of variance scale / fan_avg (scale 0: zeros), zero bias."""
    limit = math.sqrt(3 * scale / fan_avg(layer))
    nn.init.uniform_(layer.weight, -limit, limit)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def mlp(in_dim: int, units: int, layers: int, out_dim: int | None = None, out_scale: float = 1.0) -> nn.Sequential:
    """`layers` x (Linear without bias, LayerNorm, SiLU), then a linear output layer unless out_dim is None."""
    net = nn.Sequential()
    for i in range(layers):
        net.extend([nn.Linear(in_dim if i == 0 else units, units, bias=False), nn.LayerNorm(units, eps=1e-3),
                    nn.SiLU()])
    init_hidden(net)
    if out_dim is not None:
        net.append(nn.Linear(units if layers else in_dim, out_dim))
        init_output(net[-1], out_scale)
    return net


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W) maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvEncoder(nn.Module):
    """uint8 images (..., H, W, 3) -> features: x / 255 - 0.5, then 4x4 convs of stride 2 (depth, 2 depth, ...
    channels, each with channel LayerNorm and SiLU) until the smaller side is 4 px; 64 x 64: 256 x 4 x 4 = 4096."""

    def __init__(self, image_hw: tuple[int, int], depth: int):
        super().__init__()
        stages, layers, channels = conv_stages(*image_hw), [], 3
        for i in range(stages):
            layers += [nn.Conv2d(channels, depth * 2**i, 4, stride=2, padding=1, bias=False),
                       ChannelNorm(depth * 2**i, eps=1e-3), nn.SiLU()]
            channels = depth * 2**i
        self.convs = nn.Sequential(*layers)
        init_hidden(self.convs)
        self.out_dim = channels * (image_hw[0] >> stages) * (image_hw[1] >> stages)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.reshape(-1, *images.shape[-3:]).permute(0, 3, 1, 2).float() / 255.0 - 0.5
        return self.convs(x).reshape(*images.shape[:-3], -1)


class ConvDecoder(nn.Module):
    """Features (..., F) -> the mean image (..., H, W, 3) on the scale x / 255: a linear layer to the encoder's last
    feature map, then 4x4 transposed convs of stride 2 back to H x W (the last without norm and activation), + 0.5."""

    def __init__(self, feat_dim: int, image_hw: tuple[int, int], depth: int):
        super().__init__()
        stages = conv_stages(*image_hw)
        self.start = (depth * 2 ** (stages - 1), image_hw[0] >> stages, image_hw[1] >> stages)
        self.linear = nn.Linear(feat_dim, math.prod(self.start))
        layers = []
        for i in range(stages):
            channels, last = depth * 2 ** (stages - 1 - i), i == stages - 1
            layers.append(nn.ConvTranspose2d(channels, 3 if last else channels // 2, 4, stride=2, padding=1, bias=last))
            if not last:
                layers += [ChannelNorm(channels // 2, eps=1e-3), nn.SiLU()]
        self.deconvs = nn.Sequential(*layers)
        init_hidden(self.deconvs)
        init_output(self.linear, 1.0)
        init_output(self.deconvs[-1], 1.0)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = self.deconvs(self.linear(feat).reshape(-1, *self.start)).permute(0, 2, 3, 1) + 0.5
        return x.reshape(*feat.shape[:-1], *x.shape[1:])


def unimix_probs(logits: torch.Tensor, unimix: float) -> torch.Tensor:
    """Class probabilities with `unimix` of the uniform distribution mixed in (no probability is ever ~0)."""
    return F.softmax(logits, -1) * (1.0 - unimix) + unimix / logits.shape[-1]


class RSSM(nn.Module):
    """The recurrent state-space model. A state is a dict: deter (B, D), the GRU's deterministic state h; logits and
    stoch (B, S, K), S categoricals of K classes and a one-hot sample z of them.

        prior      h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}]),  z_t ~ p(z | h_t)        img_step (imagination)
        posterior  z_t ~ q(z | h_t, embed(o_t))                                  obs_step (filtering)

    Samples are straight-through (one-hot forward, the probabilities' gradient backward); the initial h is learned.
    """

    def __init__(self, embed_dim: int, act_dim: int, deter: int, hidden: int, stoch: int, discrete: int,
                 unimix: float = UNIMIX):
        super().__init__()
        self.stoch, self.discrete, self.unimix = stoch, discrete, unimix

        def dense(in_dim):
            return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.LayerNorm(hidden, eps=1e-3), nn.SiLU())

        self.img_in = dense(stoch * discrete + act_dim)
        self.gru = nn.Sequential(nn.Linear(hidden + deter, 3 * deter, bias=False), nn.LayerNorm(3 * deter, eps=1e-3))
        self.img_out, self.obs_out = dense(deter), dense(deter + embed_dim)
        self.prior_head, self.post_head = nn.Linear(hidden, stoch * discrete), nn.Linear(hidden, stoch * discrete)
        init_hidden(self)
        init_output(self.prior_head, 1.0)
        init_output(self.post_head, 1.0)
        self.initial_deter = nn.Parameter(torch.zeros(deter))  # h_0 = tanh(W)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        probs = unimix_probs(logits, self.unimix)
        index = torch.multinomial(probs.reshape(-1, self.discrete), 1).reshape(probs.shape[:-1])
        return F.one_hot(index, self.discrete).to(probs) + probs - probs.detach()

    def prior_logits(self, deter: torch.Tensor) -> torch.Tensor:
        return self.prior_head(self.img_out(deter)).unflatten(-1, (self.stoch, self.discrete))

    def initial(self, batch: int) -> dict:
        """The learned start state: h_0 = tanh(W), z_0 the most likely class of each prior categorical."""
        deter = torch.tanh(self.initial_deter).expand(batch, -1)
        logits = self.prior_logits(deter)
        probs = unimix_probs(logits, self.unimix)
        stoch = F.one_hot(probs.argmax(-1), self.discrete).to(probs) + probs - probs.detach()
        return dict(deter=deter, logits=logits, stoch=stoch)

    @staticmethod
    def feature(state: dict) -> torch.Tensor:
        """[z flattened, h]: what the decoder, the heads, the actor and the critic read."""
        return torch.cat([state["stoch"].flatten(-2), state["deter"]], -1)

    def img_step(self, state: dict, action: torch.Tensor) -> dict:
        x = self.img_in(torch.cat([state["stoch"].flatten(-2), action], -1))
        reset, cand, update = self.gru(torch.cat([x, state["deter"]], -1)).chunk(3, -1)
        cand = torch.tanh(torch.sigmoid(reset) * cand)
        update = torch.sigmoid(update - 1.0)  # biased towards keeping the old state
        deter = update * cand + (1 - update) * state["deter"]
        logits = self.prior_logits(deter)
        return dict(deter=deter, logits=logits, stoch=self.sample(logits))

    def obs_step(self, state: dict, action: torch.Tensor, embed: torch.Tensor, is_first: torch.Tensor):
        """One filtering step; where is_first (B,) the state restarts from `initial` and the action from zero.
        Returns (posterior, prior)."""
        if is_first.any():
            init = self.initial(len(is_first))
            state = {k: torch.where(is_first.reshape(-1, *[1] * (v.dim() - 1)), init[k], v) for k, v in state.items()}
            action = torch.where(is_first[:, None], 0.0, action)
        prior = self.img_step(state, action)
        logits = self.post_head(self.obs_out(torch.cat([prior["deter"], embed], -1)))
        logits = logits.unflatten(-1, (self.stoch, self.discrete))
        return dict(deter=prior["deter"], logits=logits, stoch=self.sample(logits)), prior

    def observe(self, embed: torch.Tensor, actions: torch.Tensor, is_first: torch.Tensor):
        """Filter (B, T) sequences (actions[:, t] led to frame t). Returns posteriors, priors: dicts of (B, T, ...)."""
        state, posts, priors = self.initial(embed.shape[0]), [], []
        for t in range(embed.shape[1]):
            state, prior = self.obs_step(state, actions[:, t], embed[:, t], is_first[:, t])
            posts.append(state)
            priors.append(prior)
        return ({k: torch.stack([s[k] for s in posts], 1) for k in state},
                {k: torch.stack([s[k] for s in priors], 1) for k in state})


class WorldModel(nn.Module):
    """Encoder, RSSM, decoder, reward head (two-hot, starts at 0) and continue head (a Bernoulli logit)."""

    def __init__(self, image_hw: tuple[int, int], act_dim: int, args: Args):
        super().__init__()
        self.encoder = ConvEncoder(image_hw, args.cnn_depth)
        self.rssm = RSSM(self.encoder.out_dim, act_dim, args.deter, args.hidden, args.stoch, args.discrete)
        self.feat_dim = args.stoch * args.discrete + args.deter
        self.decoder = ConvDecoder(self.feat_dim, image_hw, args.cnn_depth)
        self.reward = mlp(self.feat_dim, args.units, args.layers, BINS, out_scale=0.0)
        self.cont = mlp(self.feat_dim, args.units, args.layers, 1, out_scale=1.0)


class Actor(nn.Module):
    """The policy on model features: a Normal with mean tanh(mu) and std in [min_std, max_std] (the reference's
    "normal" actor: std = (max - min) sigmoid(s + 2) + min)."""

    def __init__(self, feat_dim: int, act_dim: int, units: int, layers: int, std_range=ACTOR_STD):
        super().__init__()
        self.trunk = mlp(feat_dim, units, layers)
        self.mean, self.std = nn.Linear(units, act_dim), nn.Linear(units, act_dim)
        init_output(self.mean, 1.0)
        init_output(self.std, 1.0)
        self.min_std, self.max_std = std_range

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(feat)
        std = (self.max_std - self.min_std) * torch.sigmoid(self.std(h) + 2.0) + self.min_std
        return torch.tanh(self.mean(h)), std


def sample_action(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A reparameterised Normal sample, each entry beyond +-1 scaled back onto it (the reference's `absmax`)."""
    action = mean + std * torch.randn_like(mean)
    return action / action.abs().clamp(min=1.0).detach()


def normal_entropy(std: torch.Tensor) -> torch.Tensor:
    return (0.5 * math.log(2 * math.pi * math.e) + std.log()).sum(-1)


# ---------------------------------------------------------------------------------------------------------- world model
def kl_balance_loss(post_logits, prior_logits, free: float, dyn_scale: float, rep_scale: float, unimix=UNIMIX):
    """KL balancing with free bits, per step, each KL summed over the latents. The dynamics loss KL[sg(q) || p]
    moves the prior towards the posterior, the representation loss KL[q || sg(p)] the posterior towards what the
    prior can predict; each is clipped from below at `free` nats (no gradient there).
    Returns (dyn_scale * dyn + rep_scale * rep, the KL, dyn, rep)."""
    def kl(p_logits, q_logits):
        p, q = unimix_probs(p_logits, unimix), unimix_probs(q_logits, unimix)
        return (p * (p.log() - q.log())).sum((-2, -1))

    rep = kl(post_logits, prior_logits.detach())
    dyn = kl(post_logits.detach(), prior_logits)
    value = rep.detach()
    rep, dyn = rep.clamp(min=free), dyn.clamp(min=free)
    return dyn_scale * dyn + rep_scale * rep, value, dyn, rep


def update_world_model(world_model: WorldModel, model_opt, batch, bins: torch.Tensor, args: Args):
    """One Adam step on the world model's loss over a batch of (B, T) sequences: the image's squared error summed
    over pixels, the reward's two-hot cross-entropy, the continue head's binary cross-entropy (1 - is_terminal) and
    the balanced KL, each per step, averaged. Returns (metrics, the posterior states detached, flattened to B*T)."""
    images, actions, rewards, is_first, is_terminal = batch
    embed = world_model.encoder(images)
    post, prior = world_model.rssm.observe(embed, actions, is_first)
    kl_loss, kl, dyn, rep = kl_balance_loss(post["logits"], prior["logits"], args.kl_free, args.dyn_scale,
                                            args.rep_scale)
    feat = world_model.rssm.feature(post)
    image_loss = ((world_model.decoder(feat) - images.float() / 255.0) ** 2).sum((-3, -2, -1))
    reward_loss = two_hot_loss(world_model.reward(feat), rewards, bins)
    cont_loss = F.binary_cross_entropy_with_logits(world_model.cont(feat).squeeze(-1), (~is_terminal).float(),
                                                   reduction="none")
    loss = (image_loss + reward_loss + cont_loss + kl_loss).mean()
    model_opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(world_model.parameters(), args.model_grad_clip)
    model_opt.step()
    metrics = {"losses/world_model_loss": loss.item(), "losses/image_loss": image_loss.mean().item(),
               "losses/reward_loss": reward_loss.mean().item(), "losses/cont_loss": cont_loss.mean().item(),
               "losses/kl": kl.mean().item(), "losses/dyn_loss": dyn.mean().item(),
               "losses/rep_loss": rep.mean().item(), "losses/model_grad_norm": norm.item()}
    return metrics, {k: v.detach().flatten(0, 1) for k, v in post.items()}


# ---------------------------------------------------------------------------------------------------------- behaviour
def imagine(rssm: RSSM, actor: Actor, start: dict, horizon: int):
    """Roll the prior forward from `start` (dict of (N, ...) states) to `horizon` states s_0 .. s_{H-1}, each action
    drawn by the actor from its state's features detached: the actor learns through the dynamics (the imagined
    states and rewards depend on its actions), not through its input. Returns features (H, N, F), actions (H, N, A)
    and the policy's entropies (H, N)."""
    state, feats, actions, entropies = start, [], [], []
    for t in range(horizon):
        feat = rssm.feature(state)
        mean, std = actor(feat.detach())
        action = sample_action(mean, std)
        feats.append(feat)
        actions.append(action)
        entropies.append(normal_entropy(std))
        if t < horizon - 1:
            state = rssm.img_step(state, action)
    return torch.stack(feats), torch.stack(actions), torch.stack(entropies)


def lambda_returns(reward: torch.Tensor, value: torch.Tensor, discount: torch.Tensor, lam: float) -> torch.Tensor:
    """Lambda-returns along (H, ...) imagined sequences, where reward[t] and discount[t] (gamma x the continue
    probability) belong to arriving at state t and value[t] is its value:

        R_t = reward[t+1] + discount[t+1] ((1 - lam) value[t+1] + lam R_{t+1}),   R_{H-1} = value[H-1]

    Returns (H - 1, ...): R_0 .. R_{H-2}."""
    ret, out = value[-1], []
    for t in reversed(range(len(reward) - 1)):
        ret = reward[t + 1] + discount[t + 1] * ((1 - lam) * value[t + 1] + lam * ret)
        out.append(ret)
    return torch.stack(out[::-1])


class ReturnNorm(nn.Module):
    """Return normalisation: an EMA (from 0) of the 5th and 95th percentiles of each batch of lambda-returns; returns
    are divided by max(1, P95 - P5) (only large returns are scaled down), after subtracting the EMA's P5."""

    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema", torch.zeros(2))
        self.register_buffer("quantiles", torch.tensor([0.05, 0.95]), persistent=False)

    @torch.no_grad()
    def forward(self, returns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the EMA with `returns`; returns (offset, scale)."""
        self.ema.lerp_(torch.quantile(returns.detach().flatten().float(), self.quantiles), 1 - self.decay)
        return self.ema[0].clone(), (self.ema[1] - self.ema[0]).clamp(min=1.0)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float):
    for tp, sp in zip(target.parameters(), source.parameters()):
        tp.lerp_(sp, tau)  # tp = (1 - tau) * tp + tau * sp


def update_behaviour(world_model: WorldModel, actor: Actor, critic: nn.Module, slow_critic: nn.Module,
                     return_norm: ReturnNorm, actor_opt, critic_opt, start: dict, bins: torch.Tensor, args: Args):
    """One actor and one critic step on rollouts imagined from every posterior state of the batch.

    Actor: maximise the normalised advantage (R_t - v_t) / scale, weighted by the imagined survival (the product of
    the earlier discounts), plus the entropy bonus; its gradient flows back through the world model's dynamics, but
    only the actor's parameters receive it. Critic: two-hot cross-entropy towards the lambda-returns and towards its
    slow EMA copy's prediction, with the same weights. Returns (metrics, imagined features, imagined actions)."""
    soft_update(slow_critic, critic, 1 - args.critic_ema)  # ema = 0.98 ema + 0.02 critic, before every update
    feats, actions, entropy = imagine(world_model.rssm, actor, start, args.imag_horizon)
    reward = two_hot_mean(world_model.reward(feats), bins)
    discount = args.gamma * torch.sigmoid(world_model.cont(feats).squeeze(-1))
    value = two_hot_mean(critic(feats), bins)
    returns = lambda_returns(reward, value, discount, args.lam)
    weights = torch.cumprod(torch.cat([torch.ones_like(discount[:1]), discount[:-1]]), 0).detach()
    offset, scale = return_norm(returns)
    advantage = (returns - offset) / scale - (value[:-1] - offset) / scale
    actor_loss = (-weights[:-1] * advantage - args.actor_entropy * entropy[:-1]).mean()

    critic_feats = feats[:-1].detach()
    logits = critic(critic_feats)
    with torch.no_grad():
        slow_value = two_hot_mean(slow_critic(critic_feats), bins)
    critic_loss = (weights[:-1] * (two_hot_loss(logits, returns, bins) + two_hot_loss(logits, slow_value, bins))).mean()

    actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward(inputs=list(actor.parameters()))  # the world model and the critic get nothing from it
    actor_norm = nn.utils.clip_grad_norm_(actor.parameters(), args.ac_grad_clip)
    actor_opt.step()
    critic_opt.zero_grad(set_to_none=True)
    critic_loss.backward(inputs=list(critic.parameters()))
    critic_norm = nn.utils.clip_grad_norm_(critic.parameters(), args.ac_grad_clip)
    critic_opt.step()
    metrics = {"losses/actor_loss": actor_loss.item(), "losses/critic_loss": critic_loss.item(),
               "losses/actor_grad_norm": actor_norm.item(), "losses/critic_grad_norm": critic_norm.item(),
               "losses/actor_entropy": entropy.mean().item(), "losses/value": value.mean().item(),
               "losses/return_scale": scale.item()}
    return metrics, feats, actions


# ---------------------------------------------------------------------------------------------------------- replay
class ReplayBuffer:
    """Agent steps of a batch of envs, each frame stored once, in a per-env ring of capacity // num_envs slots.

    Slot s of env e holds a frame (H, W, 3) uint8 and what came with it: the action that led to it (zero on an
    episode's first frame), the agent reward of that step, is_first, and is_terminal (the episode ended there by
    termination; a time limit is not terminal). An episode of L agent steps fills L + 1 slots, its final frame
    included, so the continue head sees it. A sequence is `length` consecutive slots of one env; it runs into the
    env's next episode only through a slot marked is_first (where the RSSM restarts), and never past the newest
    frame into overwritten data. Memory: capacity x H x W x 3 bytes for the frames (empty until written).
    """

    def __init__(self, capacity: int, num_envs: int, image_hw: tuple[int, int], act_dim: int, device: torch.device):
        self.slots, self.num_envs = capacity // num_envs, num_envs
        shape = (self.slots, num_envs)
        self.images = torch.empty(*shape, *image_hw, 3, dtype=torch.uint8, device=device)
        self.actions = torch.zeros(*shape, act_dim, device=device)
        self.rewards = torch.zeros(shape, device=device)
        self.is_first = torch.zeros(shape, dtype=torch.bool, device=device)
        self.is_terminal = torch.zeros(shape, dtype=torch.bool, device=device)
        self.count = torch.zeros(num_envs, dtype=torch.long, device=device)  # frames ever written, per env
        self.envs = torch.arange(num_envs, device=device)

    def add(self, images, actions, rewards, is_first, is_terminal, env_ids: torch.Tensor | None = None):
        """One slot for each of `env_ids` (all if None): images (M, H, W, 3), actions (M, A), rewards, flags (M,)."""
        env_ids = self.envs if env_ids is None else env_ids
        slot = self.count[env_ids] % self.slots
        self.images[slot, env_ids] = images
        self.actions[slot, env_ids] = actions
        self.rewards[slot, env_ids] = rewards
        self.is_first[slot, env_ids] = is_first
        self.is_terminal[slot, env_ids] = is_terminal
        self.count[env_ids] += 1

    def valid_starts(self, length: int) -> torch.Tensor:
        """(slots, N) bool: a sequence of `length` slots may start here (it and the length - 1 slots after it are
        written, and the start is not yet overwritten)."""
        age = (self.count[None] - 1 - torch.arange(self.slots, device=self.count.device)[:, None]) % self.slots
        return (age < self.count.clamp(max=self.slots)[None]) & (age >= length - 1)

    def sample(self, batch_size: int, length: int):
        """(images (B, T, H, W, 3) uint8, actions (B, T, A), rewards, is_first, is_terminal (B, T)) of uniformly drawn
        valid sequences; is_first is set on each sequence's first slot (the RSSM starts there)."""
        flat = self.valid_starts(length).flatten().nonzero().squeeze(1)
        pick = flat[torch.randint(len(flat), (batch_size,), device=flat.device)]
        env = (pick % self.num_envs)[:, None]
        slot = (pick // self.num_envs)[:, None] + torch.arange(length, device=pick.device)[None]
        slot = slot % self.slots
        is_first = self.is_first[slot, env].clone()
        is_first[:, 0] = True
        return self.images[slot, env], self.actions[slot, env], self.rewards[slot, env], is_first, \
            self.is_terminal[slot, env]


# ---------------------------------------------------------------------------------------------------------- acting
@torch.no_grad()
def filter_and_act(world_model: WorldModel, actor: Actor, state: dict, prev_action: torch.Tensor,
                   image: torch.Tensor, is_first: torch.Tensor, explore: bool):
    """Fold the newest frames (N, H, W, 3) into the RSSM state (restarting where is_first) and act: a sample of the
    policy when exploring, its mean otherwise. Returns (state, action)."""
    state, _ = world_model.rssm.obs_step(state, prev_action, world_model.encoder(image), is_first)
    mean, std = actor(world_model.rssm.feature(state))
    return state, (sample_action(mean, std) if explore else mean)


@torch.no_grad()
def evaluate(task, world_model: WorldModel, actor: Actor, args: Args, capture_video: bool = False):
    """One episode per env from task.reset() with the mean action (held for action_repeat sim steps), on D.Va's
    scale: the return is the sum of the per-sim-step rewards while alive.

    Returns (mean return, score, frames of env 0 or None). The score is the task's (`task.score`): the cart-pole's
    success rate or the locomotion's forward velocity. The caller resets the training envs afterwards.
    """
    cartpole = args.task == "cartpole"  # the cart-pole's success needs the full episode
    n, video = task.num_envs, []
    memory = {"state": world_model.rssm.initial(n), "action": torch.zeros(n, task.act_dim, device=task.device)}

    def policy(t):
        image = task.render()
        if capture_video:
            video.append(image[0].cpu().numpy())
        is_first = torch.full((n,), t == 0, dtype=torch.bool, device=task.device)
        memory["state"], memory["action"] = filter_and_act(world_model, actor, memory["state"], memory["action"],
                                                           image, is_first, explore=False)
        return memory["action"]

    steps = task.max_episode_length if cartpole else min(args.eval_steps, task.max_episode_length)
    returns, score = task.run_episodes(policy, steps, args.action_repeat)
    return returns.mean().item(), score.mean().item(), np.stack(video) if capture_video else None


if __name__ == "__main__":
    args = tyro.cli(Args)
    args, checkpoint = load_checkpoint(args, Args, SHAPE_ARGS)  # --resume, --eval-only: the saved settings
    try:
        args = finalize_args(args)
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
    image_hw = (args.image_size, args.image_width)
    task = make_task(args.task, args.num_envs, device, image_hw, renderer, args.seed, requires_grad=False)
    n, act_dim = args.num_envs, task.act_dim
    score_name = task.score_name  # success (cart-pole) or forward_velocity
    score_tag = f"charts/eval_{score_name}"
    bins = torch.linspace(-BIN_LIMIT, BIN_LIMIT, BINS, device=device)
    world_model = WorldModel(image_hw, act_dim, args).to(device)
    actor = Actor(world_model.feat_dim, act_dim, args.units, args.layers).to(device)
    critic = mlp(world_model.feat_dim, args.units, args.layers, BINS, out_scale=0.0).to(device)  # two-hot logits
    slow_critic = deepcopy(critic).requires_grad_(False)
    return_norm = ReturnNorm(args.return_norm_decay).to(device)
    model_opt = torch.optim.Adam(world_model.parameters(), lr=args.model_lr, eps=args.model_eps)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, eps=args.ac_eps)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=args.ac_eps)
    networks = {"world_model": world_model, "actor": actor, "critic": critic, "slow_critic": slow_critic,
                "return_norm": return_norm}
    optimizers = {"model_opt": model_opt, "actor_opt": actor_opt, "critic_opt": critic_opt}
    start_iter, global_step, agent_steps, num_updates, update_credit = 1, 0, 0, 0, 0.0
    if checkpoint is not None:
        try:
            for key, module in networks.items():
                module.load_state_dict(checkpoint[key])
        except (RuntimeError, KeyError) as error:
            sys.exit(f"error: the checkpoint does not fit this script's networks: {error}")

    if args.eval_only:
        ret, score, clip = evaluate(task, world_model, actor, args, capture_video=True)
        out = Path(args.eval_only).with_name("eval_only.mp4")
        write_video(clip, out, fps=video_fps)
        print(f"eval over {args.num_envs} episodes: mean return {ret:.1f}, {score_name} {score:.2f}; video: {out}")
        sys.exit(0)

    if checkpoint is not None:
        for key, opt in optimizers.items():
            opt.load_state_dict(checkpoint[key])
        start_iter, global_step = checkpoint["iteration"] + 1, checkpoint["global_step"]
        agent_steps, num_updates = checkpoint["agent_steps"], checkpoint["num_updates"]
        update_credit = checkpoint["update_credit"]
        set_rng_state(checkpoint["rng"])
        task.set_rng_state(checkpoint["task_rng"])
        run_dir = Path(args.resume).parent
    else:
        run_dir = Path("runs") / run_name(task.name, args.exp_name, args.seed)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", hparams_table(args))
    print(f"run folder: {run_dir}  (tensorboard --logdir runs)  task {args.task}, {n} envs, train ratio "
          f"{args.train_ratio:g}, {args.image_size}x{args.image_width} px, device {device}, renderer {renderer}; "
          f"world model {sum(p.numel() for p in world_model.parameters()):,} parameters")

    def save(iteration: int):
        save_checkpoint(run_dir / "checkpoint.pt", {
            **{key: module.state_dict() for key, module in {**networks, **optimizers}.items()},
            "wall_minutes": minutes_before + (time.time() - start_time) / 60,
            "iteration": iteration, "global_step": global_step, "agent_steps": agent_steps,
            "num_updates": num_updates, "update_credit": update_credit, "rng": rng_state(),
            "task_rng": task.rng_state(), "args": vars(args),
        })

    # ------------------------------------------------------------------------------------------------ training loop
    buffer = ReplayBuffer(args.buffer_size, n, image_hw, act_dim, device)
    # A fresh run prefills with uniform actions, then pretrains; a resumed run refills its empty replay with the policy.
    random_until = args.prefill if checkpoint is None else 0
    update_from, pretrained = agent_steps + args.prefill, checkpoint is not None
    no_action, no_reward = torch.zeros(n, act_dim, device=device), torch.zeros(n, device=device)
    no_flag, all_flags = torch.zeros(n, dtype=torch.bool, device=device), torch.ones(n, dtype=torch.bool, device=device)
    acting = {}  # what the policy acts from: the newest frames, the RSSM state, the last action, is_first

    def restart_all_envs():
        """Every env to a new episode (at the start and after an evaluation); the replay marks each first frame."""
        task.reset()
        image = task.render()
        buffer.add(image, no_action, no_reward, all_flags, no_flag)
        acting.update(image=image, state=world_model.rssm.initial(n), action=no_action, is_first=all_flags)
        episode.restart()

    episode = Episodes.zeros(n, device)
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

            # Act: filter the newest frames into the RSSM state, act (uniform while prefilling), one agent step.
            with torch.no_grad():
                start = time.perf_counter()
                state, actions = filter_and_act(world_model, actor, acting["state"], acting["action"],
                                                acting["image"], acting["is_first"], explore=True)
                if agent_steps < random_until:
                    actions = torch.rand(n, act_dim, device=device) * 2 - 1
                policy_s = time.perf_counter() - start
                start = time.perf_counter()
                reward, terminated, ended, lived = task.repeat_step(actions, args.action_repeat)
                image = task.render()
                env_s = time.perf_counter() - start
                buffer.add(image, actions, reward, no_flag, terminated)  # every last frame is kept, terminal or not
                episode.returns += reward
                episode.lengths += lived
                done = ended.nonzero().flatten()
                for ret, length in episode.finish(done):
                    recent_returns = (recent_returns + [ret])[-20:]
                    writer.add_scalar("charts/episodic_return", ret, global_step)
                    writer.add_scalar("charts/episodic_length", length, global_step)
                if len(done) > 0:  # ended envs start a new episode right away (no gradient tape: safe at any step)
                    start = time.perf_counter()
                    task.reset(done)
                    image = task.render()
                    env_s += time.perf_counter() - start
                    buffer.add(image[done], no_action[done], no_reward[done], all_flags[done], no_flag[done], done)
                acting.update(image=image, state=state, action=actions, is_first=ended)
            global_step += n * args.action_repeat
            agent_steps += n

            # Update: the world model on replayed sequences, then actor and critic in imagination, as the ratio asks.
            updates = 0
            if agent_steps >= update_from and buffer.valid_starts(args.batch_length).any():
                if not pretrained:
                    updates, pretrained = args.pretrain, True
                else:
                    update_credit += n * args.train_ratio / (args.batch_size * args.batch_length)
                    updates = int(update_credit)
                    update_credit -= updates
            metrics, model_s, behaviour_s = {}, 0.0, 0.0
            for _ in range(updates):
                batch = buffer.sample(args.batch_size, args.batch_length)
                start = time.perf_counter()
                step_metrics, post = update_world_model(world_model, model_opt, batch, bins, args)
                model_s += time.perf_counter() - start
                start = time.perf_counter()
                step_metrics.update(update_behaviour(world_model, actor, critic, slow_critic, return_norm, actor_opt,
                                                     critic_opt, post, bins, args)[0])
                behaviour_s += time.perf_counter() - start
                for key, value in step_metrics.items():  # the mean over this iteration's updates
                    metrics[key] = metrics.get(key, 0.0) + value / updates
                num_updates += 1
            if updates > 0:
                metrics["time/model_update_s"], metrics["time/behaviour_update_s"] = model_s / updates, \
                    behaviour_s / updates
            iteration_s = time.perf_counter() - iter_start

            # Logging, all in one place.
            elapsed = time.time() - start_time
            sps = int((iteration - start_iter + 1) * n * args.action_repeat / elapsed)
            metrics.update({"charts/SPS": sps, "charts/wall_minutes": minutes_before + elapsed / 60,
                            "charts/updates": num_updates, "time/env_s": env_s, "time/policy_s": policy_s,
                            "time/update_s": model_s + behaviour_s, "time/iteration_s": iteration_s})
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, global_step)
            out_of_time = args.max_minutes > 0 and elapsed > args.max_minutes * 60
            last = iteration == args.max_iters or out_of_time
            if (args.eval_every > 0 and iteration % args.eval_every == 0 and num_updates > 0) or last:
                ret, score, clip = evaluate(task, world_model, actor, args, capture_video=args.capture_video)
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
                image_loss = metrics.get("losses/image_loss", float("nan"))
                print(f"iter {iteration}/{args.max_iters}  return {mean_ret:.1f}  SPS {sps}  {iteration_s:.2f} s/iter  "
                      f"updates {num_updates}  image loss {image_loss:.1f}  ETA {eta / 60:.1f} min", flush=True)
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
