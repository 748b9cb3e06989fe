"""Where the time of one D.Va iteration goes: render, encoder, simulation forward/backward, critic.

    python benchmarks/iteration_time.py --config cpu      # cartpole, CPU scale: 32 envs, 32 x 64 px
    python benchmarks/iteration_time.py --config cpu --num-envs 16 --horizon 16 --name cpu16_h16  # the README's run
    python benchmarks/iteration_time.py --config paper    # cartpole, the paper's: 64 envs, 84 x 84 px
    python benchmarks/iteration_time.py --config cpu --image-size 64 --image-width 64 --name cpu64   # any variant
    python benchmarks/iteration_time.py --task humanoid --config paper    # locomotion: 64 envs, 84 x 84 px
    python benchmarks/iteration_time.py --task hopper --obs state --config paper   # state SHAC, 64 envs, no camera
    DVA_PERFORMANCE_MODE=0 python benchmarks/iteration_time.py ...        # without Genesis's static arrays

Runs a few warm iterations of the real training step (the functions of dva_cartpole.py or dva_locomotion.py, with
timers around the renderer, the actor and the simulator), prints a table and writes
results/iteration_time_<config>.json (cartpole) or results/iteration_time_<task>_<config>.json.
`backward_s` is the whole `scene.backward` (simulator and actor); the actor's share of it is measured by a separate
backward of the actor alone on the same frames (`encoder_actor_backward_s`), and the rest is `sim_backward_s`.
"""

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.genesis_setup import resolve_device, resolve_renderer  # noqa: E402
from common.utils import Episodes, FrameStack, RunningMeanStd  # noqa: E402
from dva_setup import dva_setup  # noqa: E402

CONFIGS = {"cpu": dict(num_envs=32, image_size=32, image_width=64), "paper": dict(num_envs=64, image_size=84)}
LOCOMOTION_CONFIGS = {"cpu": dict(num_envs=16, image_size=48), "paper": dict(num_envs=64, image_size=84)}


@dataclass
class BenchArgs:
    task: Literal["cartpole", "hopper", "ant", "humanoid"] = "cartpole"
    """which task (and script: dva_cartpole.py or dva_locomotion.py)"""
    obs: Literal["pixels", "state"] = "pixels"
    """what the actor sees (state: state SHAC, no camera; locomotion only)"""
    config: Literal["cpu", "paper"] = "cpu"
    """cpu: CPU scale (cartpole 32 envs at 32 x 64; locomotion 16 envs at 48 x 48); paper: 64 envs at 84 x 84"""
    iters: int = 5
    """timed iterations (after 2 warm-up iterations)"""
    device: str = "auto"
    """auto | cpu | cuda"""
    renderer: str = "auto"
    """auto | batch | rasterizer | torch (as the scripts' --renderer)"""
    num_envs: int = 0
    """override the config's number of envs (0: keep)"""
    image_size: int = 0
    """override the config's image height (0: keep)"""
    image_width: int = 0
    """override the config's image width (0: keep; cartpole only)"""
    horizon: int = 0
    """override the script's horizon H (0: keep)"""
    name: str = ""
    """name of the result (default: the config's)"""
    out: str = "results"
    """folder for the JSON"""


def sync():
    """Wait for queued CUDA work, so that a timer measures it (CUDA kernels run asynchronously)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, timer, key, inputs=None):
    """Wrap `fn` so that its seconds add up in timer[key] (and its calls in timer[key + "_calls"])."""
    def wrapper(*args, **kwargs):
        if inputs is not None:
            inputs.append(args[0])
        sync()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        timer[key] += time.perf_counter() - start
        timer[key + "_calls"] += 1
        return out
    return wrapper


if __name__ == "__main__":
    bench = tyro.cli(BenchArgs)
    device = resolve_device(bench.device)
    renderer = resolve_renderer(bench.renderer, device)
    config = (CONFIGS if bench.task == "cartpole" else LOCOMOTION_CONFIGS)[bench.config]
    height = bench.image_size or config["image_size"]
    width = (bench.image_width or config.get("image_width", height)) if bench.task == "cartpole" else height
    # the script's own per-task defaults (networks, learning rates) and input checks
    overrides = dict(horizon=bench.horizon) if bench.horizon else {}
    pixels = bench.obs == "pixels"
    if not pixels:
        if bench.task == "cartpole":
            sys.exit("error: --obs state is for the locomotion tasks")
        overrides["obs"] = "state"
    algo, args, task = dva_setup(bench.task, bench.num_envs or config["num_envs"], (height, width), device,
                                 renderer=bench.renderer, camera=pixels, **overrides)
    args.image_width = width  # locomotion's Args have no width: its images are square
    name = bench.name or (bench.config if bench.task == "cartpole" else f"{bench.task}_{bench.config}")
    name += "" if pixels or bench.name else "_state"
    Actor, Critic, rollout_window = algo.Actor, algo.Critic, algo.rollout_window
    td_lambda_targets, update_critic = algo.td_lambda_targets, algo.update_critic
    obs_shape = (3 * args.frame_stack, args.image_size, args.image_width) if pixels else (task.critic_obs_dim,)
    actor = Actor(obs_shape, task.act_dim, args.actor_hidden).to(device)
    critic = Critic(task.critic_obs_dim, args.critic_hidden).to(device)
    target = Critic(task.critic_obs_dim, args.critic_hidden).to(device).requires_grad_(False)
    obs_rms = RunningMeanStd((task.critic_obs_dim,)).to(device)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, betas=args.betas)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, betas=args.betas)

    timer = defaultdict(float)
    task.render = timed(task.render, timer, "render_s")
    task.step = timed(task.step, timer, "sim_forward_s")
    actor_forward, stacked = actor.forward, []
    actor.forward = timed(actor_forward, timer, "encoder_actor_forward_s", inputs=stacked)
    frames = FrameStack(args.frame_stack)
    if pixels:
        frames.reset(task.render())
    rows = []
    for it in range(2 + bench.iters):
        if it == 2 and device.type == "cuda":  # peak memory of the timed iterations
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        timer.clear()
        stacked.clear()
        episode = Episodes.zeros(args.num_envs, device)
        start = time.perf_counter()
        loss, (states, rewards, next_values, dones, valid), _ = rollout_window(
            task, actor, target, obs_rms, frames, args, episode)
        t0 = time.perf_counter()
        actor_opt.zero_grad()
        task.backward(loss)
        torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
        actor_opt.step()
        sync()
        timer["backward_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        obs_rms.update(states[valid])
        targets = td_lambda_targets(rewards, next_values, dones, args.gamma, args.lam)
        update_critic(critic, critic_opt, obs_rms, states[valid], targets[valid], args)
        sync()
        timer["critic_s"] = time.perf_counter() - t0
        ended = episode.ended.nonzero().flatten()
        task.reset(ended)
        if pixels:
            frames.reset(task.render(), ended)
        total = time.perf_counter() - start
        # The actor's (mostly the encoder's) share of the backward: the actor alone on the same frames, step by step
        # as in the rollout, with a random output gradient; the rest of `backward_s` is the simulator's.
        actor_backward = 0.0
        for obs in stacked:
            actions = actor_forward(obs.detach())  # state inputs carry the (freed) simulator graph
            t0 = time.perf_counter()
            actions.backward(torch.randn_like(actions))
            actor_backward += time.perf_counter() - t0
        parts = ["render_s", "encoder_actor_forward_s", "sim_forward_s", "backward_s", "critic_s"]
        row = {k: timer[k] for k in parts}
        row["iteration_s"] = total
        row["overhead"] = total / sum(row[k] for k in parts)
        row["ms_per_image"] = 1000 * timer["render_s"] / max(timer["render_s_calls"] * args.num_envs, 1)
        row["encoder_actor_backward_s"] = actor_backward
        if it >= 2:
            rows.append(row)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    mean["sim_backward_s"] = mean["backward_s"] - mean["encoder_actor_backward_s"]
    if device.type == "cuda":
        # torch's own peak, and the whole device's use (torch, Genesis's fields, the renderer, the CUDA context)
        mean["torch_peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        free, total = torch.cuda.mem_get_info()
        mean["device_used_gpu_mb"] = (total - free) / 2**20
    from common.genesis_setup import performance_mode

    result = {"task": bench.task, "config": name, "obs": bench.obs, "num_envs": args.num_envs, "horizon": args.horizon,
              "image": [args.image_size, args.image_width] if pixels else None, "device": str(device),
              "renderer": renderer if pixels else None, "performance_mode": performance_mode(),
              "torch_threads": torch.get_num_threads(), "iters": bench.iters, "mean": mean}
    print(f"{bench.task} {name}: {args.num_envs} envs x H={args.horizon}, {args.image_size}x{args.image_width} px, "
          f"{device}, {renderer}")
    for k, v in mean.items():
        print(f"  {k:32s} {v:8.3f}")
    out = ROOT / bench.out
    out.mkdir(exist_ok=True)
    (out / f"iteration_time_{name}.json").write_text(json.dumps(result, indent=2))
