"""State-to-visual DAgger (Mu et al. 2025), the distillation baseline of D.Va's paper, on Genesis.

Stage 1 trains a state expert: the state-based SHAC of `dva_cartpole.py --obs state` / `dva_locomotion.py --obs
state`, run as a subprocess (or `--expert PATH` loads its checkpoint and skips the stage). Stage 2 rolls out the
visual student in 32-step segments, labels every visited state with the expert's action, keeps the labelled frames
in a replay buffer and fits the student to them by MSE, stopping an iteration's updates early once the BC loss falls
below 0.1. The wall clock (`charts/wall_minutes`) includes stage 1; a given expert's training counts only as
`--expert-minutes` (e.g. its run's last `charts/wall_minutes`).

    python s2v_dagger.py --task cartpole --num-envs 16 --image-size 32 --image-width 64     # CPU configuration
    python s2v_dagger.py --task cartpole --expert runs/<state run>/checkpoint.pt            # reuse an expert
    python s2v_dagger.py --task ant --expert runs/<state run>/checkpoint.pt --expert-minutes 49.3   # and count it
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import tyro

from common.encoder import Encoder, init_pixel_path
from common.tasks import TaskName
from common.utils import Episodes, FrameStack, load_checkpoint, range_problems


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    task: TaskName = "cartpole"
    """which task"""
    seed: int = 1
    """seed of torch, numpy, python, the task's start states and the expert's training"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where torch and Genesis run (auto: cuda if torch sees a GPU)"""
    renderer: Literal["auto", "batch", "rasterizer", "torch"] = "auto"
    """Genesis's BatchRenderer or Rasterizer (auto: BatchRenderer on CUDA, Rasterizer on CPU), or the torch ray
    caster of common/diff_render.py"""
    expert: str | None = None
    """checkpoint of a state expert (a `--obs state` run of dva_cartpole.py / dva_locomotion.py); None = train one
    first (stage 1) and count its time"""
    expert_minutes: float = 0.0
    """with --expert: the minutes that expert took to train, counted as stage 1's would be (the wall clock starts
    there, and --max-minutes includes them)"""
    expert_envs: int = 0
    """stage 1: envs of the state-SHAC run (0 = that script's default)"""
    expert_iters: int = 0
    """stage 1: iterations of the state-SHAC run (0 = that script's default)"""
    num_envs: int = 64
    """number of parallel envs the student drives in stage 2"""
    segment_length: int = 32
    """steps per env per stage-2 iteration (SHAC-style segments)"""
    max_iters: int = 500
    """stage-2 iterations (one = a segment of every env, then the student's updates)"""
    max_minutes: float = 0.0
    """stop after this many minutes of wall clock, stage 1 included (0 = no limit); with --resume: this many more
    (charts/wall_minutes goes on from the checkpoint's)"""
    image_size: int = 84
    """image height in pixels (and width, unless --image-width is given)"""
    image_width: int = 0
    """image width in pixels (0 = square images)"""
    frame_stack: int = 3
    """number of stacked frames the student sees"""
    student_hidden: tuple[int, ...] | None = None
    """student MLP widths behind the encoder (default: D.Va's actor per task: cartpole 64 64, hopper and ant
    128 64 32, humanoid 256 128)"""
    lr: float = 1e-3
    """student learning rate (Adam)"""
    batch_size: int = 128
    """samples per BC update"""
    max_updates: int = 2000
    """most BC updates per iteration"""
    bc_loss_stop: float = 0.1
    """end an iteration's updates once the mean BC loss of the last 10 updates falls below this"""
    buffer_size: int = 100_000
    """labelled samples kept (oldest dropped first); uint8 stacked frames: 100k x 9 x 84 x 84 = 6.4 GB, 100k x 9 x 32
    x 64 = 1.8 GB"""
    beta_decay: float = 0.5
    """DAgger's mixture: in iteration i each env is driven by the expert with probability beta_decay^(i-1) (the first
    segment is the expert's), by the student otherwise"""
    eval_every: int = 10
    """evaluate the deterministic student every this many iterations (0 = only at the end)"""
    eval_steps: int = 1000
    """steps per evaluation episode on locomotion (1000 = a full episode; fewer is cheaper on a CPU)"""
    log_every: int = 1
    """print a console line every this many iterations"""
    save_every: int = 20
    """write runs/<run>/checkpoint.pt every this many iterations (and at the end, on Ctrl-C and on kill)"""
    resume: str | None = None
    """continue stage 2 from this checkpoint (its expert, iteration count, optimiser) with the settings it was saved
    with (a flag given with --resume changes that setting); the replay buffer is not saved (too large) and refills
    from the resumed rollouts"""
    eval_only: str | None = None
    """load this checkpoint, run one evaluation episode per env with its saved settings (as --resume), print the
    mean return and write a video"""
    capture_video: bool = False
    """record env 0 of every evaluation as mp4 in the run folder and in TensorBoard"""
    torch_threads: int = 0
    """torch CPU threads (0 = torch's default)"""


STUDENT_HIDDEN = {"cartpole": (64, 64), "hopper": (128, 64, 32), "ant": (128, 64, 32), "humanoid": (256, 128)}
SHAPE_ARGS = ("task", "image_size", "image_width", "frame_stack", "student_hidden")
"""Arguments that fix the student's shape: --resume and --eval-only take them from the checkpoint."""


def finalize_args(args: Args) -> Args:
    """Fill the per-task defaults and reject bad input before anything is built."""
    args.image_width = args.image_width or args.image_size
    args.student_hidden = args.student_hidden or STUDENT_HIDDEN[args.task]
    problems = range_problems(
        args, at_least_one=("num_envs", "segment_length", "max_iters", "frame_stack", "student_hidden", "batch_size",
                            "max_updates", "buffer_size", "eval_steps", "log_every", "save_every"),
        non_negative=("expert_envs", "expert_iters", "expert_minutes", "max_minutes", "bc_loss_stop", "eval_every",
                      "torch_threads"),
        positive=("lr",), unit=("beta_decay",))
    if args.expert_minutes > 0 and args.expert is None:
        problems.append("--expert-minutes counts a given expert's training: it needs --expert")
    if min(args.image_size, args.image_width) < 15:
        problems.append(f"--image-size/--image-width must be >= 15 px for the encoder "
                        f"(got {args.image_size}x{args.image_width})")
    for flag, path in (("--expert", args.expert), ("--resume", args.resume), ("--eval-only", args.eval_only)):
        if path is not None and not Path(path).is_file():
            problems.append(f"{flag}: no checkpoint file at {path}")
    if problems:
        raise ValueError("; ".join(problems))
    return args


# ---------------------------------------------------------------------------------------------------------- networks
def mlp(in_dim: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """Linear -> ELU -> LayerNorm per hidden layer (the D.Va scripts' MLPs, so the expert's weights load as saved)."""
    layers = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ELU(), nn.LayerNorm(width)]
        in_dim = width
    return nn.Sequential(*layers)


class Student(nn.Module):
    """The visual policy: D.Va's pixel actor without its noise (encoder -> trunk -> MLP -> tanh mean), with the
    authors' initialisation of the pixel path (orthogonal, zero bias; gain sqrt 2 for the convolutions, 1 for the
    trunk), as their DAgger's student shares their D.Va actor."""

    def __init__(self, obs_shape: tuple[int, int, int], act_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.encoder = Encoder(obs_shape)
        self.trunk = nn.Sequential(nn.Linear(self.encoder.repr_dim, hidden[0]), nn.LayerNorm(hidden[0]), nn.Tanh())
        init_pixel_path(self.encoder, self.trunk[0])
        self.mlp = mlp(hidden[0], hidden)
        self.mu = nn.Linear(hidden[-1], act_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mu(self.mlp(self.trunk(self.encoder(frames)))))


class StateExpert(nn.Module):
    """The state-SHAC actor of a `--obs state` checkpoint, deterministic: tanh(mu(MLP(normalised state)))."""

    def __init__(self, checkpoint: dict, obs_dim: int, act_dim: int):
        super().__init__()
        saved = checkpoint["args"]
        if saved.get("obs") != "state":
            raise ValueError("the expert checkpoint is not a state run (--obs state)")
        self.mlp = mlp(obs_dim, tuple(saved["actor_hidden"]))
        self.mu = nn.Linear(saved["actor_hidden"][-1], act_dim)
        self.logstd = nn.Parameter(torch.zeros(act_dim))  # saved with the actor; unused (the mean action)
        self.load_state_dict(checkpoint["actor"])
        self.register_buffer("obs_mean", checkpoint["obs_rms"]["mean"])
        self.register_buffer("obs_var", checkpoint["obs_rms"]["var"])
        self.requires_grad_(False)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mu(self.mlp((state - self.obs_mean) / torch.sqrt(self.obs_var + 1e-5))))


# ---------------------------------------------------------------------------------------------------------- algorithm
def train_expert(args: Args) -> str:
    """Stage 1: run the state-SHAC script as a user would and return its checkpoint's path: the one checkpoint the
    run adds under runs/<task>__<exp_name>_expert__<seed>__<time>/."""
    script = "dva_cartpole.py" if args.task == "cartpole" else "dva_locomotion.py"
    cmd = [sys.executable, str(Path(__file__).parent / script), "--obs", "state", "--seed", str(args.seed),
           "--device", args.device, "--exp-name", f"{args.exp_name}_expert", "--eval-every", "0"]
    cmd += [] if args.task == "cartpole" else ["--task", args.task]
    cmd += ["--num-envs", str(args.expert_envs)] if args.expert_envs else []
    cmd += ["--max-iters", str(args.expert_iters)] if args.expert_iters else []
    pattern = f"{args.task}__{args.exp_name}_expert__{args.seed}__*/checkpoint.pt"
    before = set(Path("runs").glob(pattern))
    print("stage 1, the state expert:", " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # its progress, indented (without Genesis's start-up lines)
        if not line.startswith("[Genesis]"):
            print("  expert |", line, end="", flush=True)
    new = sorted(set(Path("runs").glob(pattern)) - before)
    if proc.wait() != 0 or len(new) != 1:
        raise RuntimeError(f"stage 1 failed (exit code {proc.returncode}, {len(new)} new checkpoints): see its "
                           f"output above")
    return str(new[0])


class LabelledBuffer:
    """A FIFO of (stacked uint8 frames, expert action) pairs, preallocated on the CPU."""

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], act_dim: int):
        self.frames = torch.zeros(capacity, *obs_shape, dtype=torch.uint8)
        self.labels = torch.zeros(capacity, act_dim)
        self.capacity, self.next, self.size = capacity, 0, 0

    def add(self, frames: torch.Tensor, labels: torch.Tensor):
        for f, a in zip(frames.split(self.capacity), labels.split(self.capacity)):
            idx = (self.next + torch.arange(len(f))) % self.capacity
            self.frames[idx], self.labels[idx] = f.cpu(), a.cpu()
            self.next = (self.next + len(f)) % self.capacity
            self.size = min(self.size + len(f), self.capacity)

    def sample(self, batch_size: int, device: torch.device):
        idx = torch.randint(self.size, (batch_size,))
        return self.frames[idx].to(device), self.labels[idx].to(device)


@torch.no_grad()
def collect_segment(task, student, expert, frames: FrameStack, steps: int, expert_drives: torch.Tensor, episode):
    """Drive every env for `steps` steps (the expert where `expert_drives`, the student elsewhere) and label each
    visited state with the expert's action. Ended envs restart at once (no gradient tape in stage 2).

    Returns the visited frame stacks (steps * N, C, H, W), the expert's labels (steps * N, act_dim) and the episodes
    that ended, as (return, length) pairs.
    """
    seen, labels, finished = [], [], []
    for _ in range(steps):
        obs = frames.frames
        label = expert(task.critic_obs())
        seen.append(obs)
        labels.append(label)
        action = torch.where(expert_drives[:, None], label, student(obs))
        reward, terminated, truncated = task.step(action)
        episode.returns += reward
        episode.lengths += 1
        ended = (terminated | truncated).nonzero().flatten()
        image = task.render()
        frames.push(image)
        if len(ended) > 0:
            finished += episode.finish(ended)
            task.reset(ended)
            frames.reset(task.render(), ended)
    return torch.cat(seen), torch.cat(labels), finished


def fit_student(student, optimizer, buffer: LabelledBuffer, args: Args, device) -> tuple[float, int]:
    """BC by MSE on the buffer, up to --max-updates, stopping once the last 10 losses average below --bc-loss-stop."""
    recent = []
    for update in range(1, args.max_updates + 1):
        frames, labels = buffer.sample(args.batch_size, device)
        loss = ((student(frames) - labels) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        recent = (recent + [loss.item()])[-10:]
        if len(recent) == 10 and np.mean(recent) < args.bc_loss_stop:
            break
    return float(np.mean(recent)), update


def evaluate(task, student, args, capture_video: bool = False):
    """One episode per env from a fresh start with the student; returns (mean return, the task's score: success or
    forward velocity, frames of env 0 or None). The return sums the task's per-step rewards, as D.Va's evaluation
    does. Cart-pole success: alive at the end with the pole within 0.3 rad of upright over the last 60 steps."""
    frames, video = FrameStack(args.frame_stack), []

    def policy(t):
        image = task.render()
        if capture_video:
            video.append(image[0].cpu().numpy())
        return student(frames.push(image) if t else frames.reset(image))

    steps = task.max_episode_length if task.name == "cartpole" else min(args.eval_steps, task.max_episode_length)
    returns, score = task.run_episodes(policy, steps)
    return returns.mean().item(), score.mean().item(), np.stack(video) if capture_video else None


if __name__ == "__main__":
    start_time = time.time()  # the wall clock counts stage 1
    args = tyro.cli(Args)
    args, checkpoint = load_checkpoint(args, Args, SHAPE_ARGS)  # --resume, --eval-only: the saved settings
    if checkpoint is not None:  # --resume: the expert the student was trained with; --eval-only: the student alone
        args.expert = checkpoint.get("expert") if args.resume else None
    try:
        args = finalize_args(args)  # after the checkpoint's settings: the defaults that depend on them follow them
        from common.genesis_setup import resolve_device, resolve_renderer

        device = resolve_device(args.device)
        renderer = resolve_renderer(args.renderer, device, args.image_width)
    except ValueError as error:
        sys.exit(f"error: {error}")

    from torch.utils.tensorboard import SummaryWriter

    from common.utils import (hparams_table, rng_state, run_name, save_checkpoint, seed_everything, set_rng_state,
                              write_video)

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    seed_everything(args.seed)

    # ------------------------------------------------------------------------------------------------ stage 1
    stage1_minutes = 0.0
    if args.expert is None and not args.eval_only:
        try:
            args.expert = train_expert(args)
        except RuntimeError as error:
            sys.exit(f"error: {error}")
        stage1_minutes = (time.time() - start_time) / 60
        print(f"stage 1 done in {stage1_minutes:.1f} min: expert {args.expert}", flush=True)

    # ------------------------------------------------------------------------------------------------ set-up
    expert_checkpoint = None
    if args.expert is not None:
        args.expert = str(Path(args.expert).resolve())  # the checkpoint records it for --resume from anywhere
        try:
            expert_checkpoint = torch.load(args.expert, map_location=device, weights_only=False)
            expert_task = expert_checkpoint["args"].get("task", "cartpole")
        except Exception as error:
            sys.exit(f"error: cannot read the expert checkpoint {args.expert}: {error}")
        if expert_task != args.task:
            sys.exit(f"error: the expert {args.expert} was trained on {expert_task}, not --task {args.task}")
    from common.tasks import make_task

    task = make_task(args.task, args.num_envs, device, image_size=(args.image_size, args.image_width),
                     renderer=renderer, requires_grad=False, seed=args.seed)
    obs_shape = (3 * args.frame_stack, args.image_size, args.image_width)
    student = Student(obs_shape, task.act_dim, args.student_hidden).to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    expert = None
    if expert_checkpoint is not None:
        try:
            expert = StateExpert(expert_checkpoint, task.critic_obs_dim, task.act_dim).to(device)
        except (RuntimeError, KeyError, ValueError) as error:
            sys.exit(f"error: the expert checkpoint {args.expert} does not fit: {error}")
    start_iter, global_step = 1, 0
    if checkpoint is not None:
        try:
            student.load_state_dict(checkpoint["student"])
        except (RuntimeError, KeyError) as error:
            sys.exit(f"error: the checkpoint does not fit this script's student: {error}")

    metric_tag = f"charts/eval_{task.score_name}"  # success (cart-pole) or forward velocity
    if args.eval_only:
        ret, metric, clip = evaluate(task, student, args, capture_video=True)
        out = Path(args.eval_only).with_name("eval_only.mp4")
        write_video(clip, out)
        print(f"eval over {args.num_envs} episodes: mean return {ret:.1f}, {metric_tag.split('_', 1)[1]} "
              f"{metric:.2f}; video: {out}")
        sys.exit(0)

    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_iter, global_step = checkpoint["iteration"] + 1, checkpoint["global_step"]
        minutes_before = checkpoint.get("wall_minutes", 0.0)  # charts/wall_minutes goes on from the checkpoint's
        budget_used = 0.0  # --max-minutes: this many more
        set_rng_state(checkpoint["rng"])
        task.set_rng_state(checkpoint["task_rng"])
        run_dir = Path(args.resume).parent
    else:
        run_dir = Path("runs") / run_name(task.name, args.exp_name, args.seed)
        minutes_before = budget_used = args.expert_minutes  # a given expert's training, as stage 1's (else 0)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", hparams_table(args))
    print(f"run folder: {run_dir}  (tensorboard --logdir runs)  device {device}, renderer {renderer}", flush=True)

    def save(iteration: int):
        save_checkpoint(run_dir / "checkpoint.pt", {
            "student": student.state_dict(), "optimizer": optimizer.state_dict(), "expert": args.expert,
            "wall_minutes": minutes_before + (time.time() - start_time) / 60,
            "iteration": iteration, "global_step": global_step, "rng": rng_state(),
            "task_rng": task.rng_state(), "args": vars(args),
        })

    # ------------------------------------------------------------------------------------------------ stage 2
    buffer = LabelledBuffer(args.buffer_size, obs_shape, task.act_dim)
    frames = FrameStack(args.frame_stack)
    task.reset()
    frames.reset(task.render())
    episode = Episodes.zeros(args.num_envs, device)
    recent_returns, iteration = [], start_iter - 1
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C and `kill` end the run with a checkpoint
        signal.signal(sig, signal.default_int_handler)
    loop_start = time.time()
    try:
        for iteration in range(start_iter, args.max_iters + 1):
            iter_start = time.perf_counter()
            # Rollout: the expert drives a shrinking share of the envs (DAgger's beta), the student the rest.
            beta = args.beta_decay ** (iteration - 1)
            expert_drives = torch.rand(args.num_envs, device=device) < beta
            seen, labels, finished = collect_segment(task, student, expert, frames, args.segment_length, expert_drives,
                                                     episode)
            buffer.add(seen, labels)
            env_s = time.perf_counter() - iter_start

            # Behaviour cloning on everything labelled so far.
            start = time.perf_counter()
            bc_loss, updates = fit_student(student, optimizer, buffer, args, device)
            update_s = time.perf_counter() - start

            global_step += args.num_envs * args.segment_length
            for ret, length in finished:
                recent_returns = (recent_returns + [ret])[-20:]
                writer.add_scalar("charts/episodic_return", ret, global_step)
                writer.add_scalar("charts/episodic_length", length, global_step)
            iteration_s = time.perf_counter() - iter_start
            elapsed = time.time() - start_time
            sps = int((iteration - start_iter + 1) * args.num_envs * args.segment_length / (time.time() - loop_start))
            for tag, value in (("losses/bc_loss", bc_loss), ("charts/bc_updates", updates), ("charts/beta", beta),
                               ("charts/buffer_size", buffer.size), ("charts/SPS", sps),
                               ("charts/wall_minutes", minutes_before + elapsed / 60), ("time/env_s", env_s),
                               ("time/update_s", update_s), ("time/iteration_s", iteration_s)):
                writer.add_scalar(tag, value, global_step)
            out_of_time = args.max_minutes > 0 and budget_used + elapsed / 60 > args.max_minutes
            last = iteration == args.max_iters or out_of_time
            if (args.eval_every > 0 and iteration % args.eval_every == 0) or last:
                ret, metric, clip = evaluate(task, student, args, capture_video=args.capture_video)
                writer.add_scalar("charts/eval_return", ret, global_step)
                writer.add_scalar(metric_tag, metric, global_step)
                print(f"  eval at iter {iteration} ({minutes_before + elapsed / 60:.1f} min): return {ret:.1f}, "
                      f"{metric_tag.split('_', 1)[1]} {metric:.2f}", flush=True)
                if clip is not None:
                    write_video(clip, run_dir / f"eval_{iteration:06d}.mp4", writer, step=global_step)
                task.reset()  # evaluation used the training envs: start fresh episodes
                frames.reset(task.render())
                episode.restart()
            if iteration % args.log_every == 0 or last:
                mean_ret = np.mean(recent_returns) if recent_returns else float("nan")
                eta = (args.max_iters - iteration) * (time.time() - loop_start) / (iteration - start_iter + 1)
                print(f"iter {iteration}/{args.max_iters}  return {mean_ret:.1f}  bc loss {bc_loss:.3f} "
                      f"({updates} updates)  SPS {sps}  {iteration_s:.2f} s/iter  ETA {eta / 60:.1f} min", flush=True)
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
