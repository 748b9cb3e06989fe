"""The paper's Fig. 9 on this machine: the actor's policy-gradient norm vs the horizon, D.Va vs SHAC with
differentiable rendering.

    python benchmarks/grad_norm_horizon.py                      # cartpole and ant, H 8 16 32 64, 5 seeds, 16 envs
    python benchmarks/grad_norm_horizon.py --tasks cartpole --seeds 3
    python benchmarks/grad_norm_horizon.py --tasks cartpole --checkpoints cartpole=runs/<run>/checkpoint.pt \
        --name grad_norm_horizon_trained              # at a trained policy instead of at initialisation

For every task, seed and horizon: a freshly initialised actor and critic (seeded), the envs reset (seeded), one
window of H steps through the script's own rollout function, `scene.backward`, and the actor gradient's norm before
clipping. Both methods see the same task, seeds and start states; D.Va's frames come from Genesis's camera, SHAC-
diffrender's from the torch renderer (in the graph).

With `--checkpoints TASK=PATH` (a D.Va or SHAC-diffrender checkpoint of that task, pixels, the same image size; its
frame stack and network widths are used), the actor, target critic and normaliser are that checkpoint's instead of
fresh ones, the same weights for both methods, and both methods see the torch renderer's images (D.Va's detached):
the renderer's Jacobian in the policy gradient is then the only difference. Prints median and quartiles over seeds,
writes results/<name>.json and .png (median, with the interquartile range shaded, log scale).
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class BenchArgs:
    tasks: list[str] = field(default_factory=lambda: ["cartpole", "ant"])
    """tasks (cartpole, hopper, ant, humanoid)"""
    horizons: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    """window lengths"""
    seeds: int = 5
    """seeds per (task, horizon, method)"""
    num_envs: int = 16
    """envs per window"""
    image_size: int = 48
    """image height (cart-pole: 32 x 64 whatever this is)"""
    device: str = "auto"
    """auto | cpu | cuda"""
    checkpoints: list[str] = field(default_factory=list)
    """TASK=PATH entries: measure at this checkpoint's trained actor (see above) instead of at initialisation"""
    out: str = "results"
    """folder for the JSON and the plot"""
    name: str = "grad_norm_horizon"
    """file name (without extension) of the JSON and the plot"""


def checkpoint_paths(entries: list[str]) -> dict[str, str]:
    if any("=" not in entry for entry in entries):
        raise SystemExit(f"error: --checkpoints takes TASK=PATH entries (got {entries})")
    return dict(entry.split("=", 1) for entry in entries)


def load_checkpoint(path: str, task_name: str, size: tuple[int, int]) -> tuple[dict, dict]:
    """The trained weights at `path`, checked against the bench's task and image size, and the network shapes
    (frame stack, widths) to build the actor and critic with."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # missing, truncated or foreign
        raise SystemExit(f"error: cannot read the checkpoint {path}: {error}")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("args"), dict):
        raise SystemExit(f"error: {path} is not a checkpoint of this project's scripts")
    saved = checkpoint["args"]
    if saved.get("task", "cartpole") != task_name:
        raise SystemExit(f"error: {path} is a checkpoint of {saved.get('task')}, given for {task_name}")
    saved_size = (saved["image_size"], saved.get("image_width") or saved["image_size"])
    if saved.get("obs", "pixels") != "pixels" or saved_size != tuple(size):
        raise SystemExit(f"error: {path}: a {saved.get('obs', 'pixels')} checkpoint of {saved_size} px; "
                         f"this bench needs pixels, {tuple(size)} px")
    shapes = dict(frame_stack=saved["frame_stack"], actor_hidden=tuple(saved["actor_hidden"]),
                  critic_hidden=tuple(saved["critic_hidden"]))
    return checkpoint, shapes


def window_grad_norm(task, renderer, method, args, size, seed, dva, sd, checkpoint=None):
    from common.task import SimulationBlowUp
    from common.utils import Episodes, FrameStack, RunningMeanStd

    torch.manual_seed(seed)
    task.generator.manual_seed(seed)
    actor_cls = dva.Actor if method == "dva" else sd.Actor
    actor = actor_cls((3 * args.frame_stack, *size), task.act_dim, args.actor_hidden).to(task.device)
    target = dva.Critic(task.critic_obs_dim, args.critic_hidden).to(task.device).requires_grad_(False)
    obs_rms = RunningMeanStd((task.critic_obs_dim,)).to(task.device)
    if checkpoint is not None:
        actor.load_state_dict(checkpoint["actor"])
        target.load_state_dict(checkpoint["target_critic"])
        obs_rms.load_state_dict(checkpoint["obs_rms"])
    task.reset()
    frames = FrameStack(args.frame_stack)
    with torch.no_grad():
        frames.reset(task.render() if method == "dva" else sd.render(task, renderer))
    episode = Episodes.zeros(task.num_envs, task.device)
    torch.manual_seed(seed)  # the same action noise for both methods
    if method == "dva":
        loss, _, _ = dva.rollout_window(task, actor, target, obs_rms, frames, args, episode)
    else:
        loss, _, _ = sd.rollout_window(task, renderer, actor, target, obs_rms, frames, args, episode)
    try:
        task.backward(loss)
    except SimulationBlowUp:  # Genesis's NaN stop in the backward pass: record it as infinite
        task.cut_graph()
        return float("inf")
    return torch.nn.utils.clip_grad_norm_(actor.parameters(), float("inf")).item()


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
    for ax, task_name in zip(axes[0], tasks):
        for method, colour in (("dva", "tab:blue"), ("diffrender", "tab:red")):
            rows = sorted((r for r in results if r["task"] == task_name and r["method"] == method),
                          key=lambda r: r["horizon"])
            hs = [r["horizon"] for r in rows]
            ax.plot(hs, [r["median"] for r in rows], "o-", color=colour, label=method)
            ax.fill_between(hs, [r["q25"] for r in rows], [r["q75"] for r in rows], color=colour, alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("horizon H")
        trained = any(r.get("trained") for r in results if r["task"] == task_name)
        ax.set_title(f"{task_name}: actor gradient norm" + (" (trained actor)" if trained else " (initialisation)"))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    bench = tyro.cli(BenchArgs)
    if bench.seeds < 1 or bench.num_envs < 1 or not bench.horizons or min(bench.horizons) < 1:
        sys.exit(f"error: --seeds, --num-envs and every --horizons must be >= 1 "
                 f"(got {bench.seeds}, {bench.num_envs}, {bench.horizons})")
    paths = checkpoint_paths(bench.checkpoints)
    unused = set(paths) - set(bench.tasks)
    if unused:
        sys.exit(f"error: --checkpoints names tasks not in --tasks: {sorted(unused)}")
    import shac_diffrender as sd
    from common.genesis_setup import resolve_device
    from dva_setup import dva_setup

    device = resolve_device(bench.device)
    results = []
    for task_name in bench.tasks:
        size = (32, 64) if task_name == "cartpole" else (bench.image_size, bench.image_size)
        checkpoint, shapes = load_checkpoint(paths[task_name], task_name, size) if task_name in paths else (None, {})
        # at a checkpoint both methods see the torch renderer's images (D.Va's through task.render, detached)
        dva, args, task = dva_setup(task_name, bench.num_envs, size, device,
                                    renderer="torch" if checkpoint is not None else "auto", **shapes)
        renderer = task.torch_renderer()
        args.recompute_renderer = True
        for horizon in bench.horizons:
            args.horizon = horizon
            for method in ("dva", "diffrender"):
                norms = [window_grad_norm(task, renderer, method, args, size, seed, dva, sd, checkpoint)
                         for seed in range(1, bench.seeds + 1)]
                q25, median, q75 = np.percentile(norms, [25, 50, 75])
                results.append(dict(task=task_name, method=method, horizon=horizon, norms=norms, median=median,
                                    q25=q25, q75=q75, trained=checkpoint is not None))
                print(f"{task_name:9s} H={horizon:3d} {method:10s} grad norm median {median:10.4g}  "
                      f"[{q25:.4g}, {q75:.4g}]  ({', '.join(f'{x:.3g}' for x in norms)})", flush=True)
    out_dir = ROOT / bench.out
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"{bench.name}.json").write_text(json.dumps(
        dict(num_envs=bench.num_envs, image_size=bench.image_size, device=str(device), checkpoints=bench.checkpoints,
             results=results), indent=2))
    plot(results, out_dir / f"{bench.name}.png")
    print(f"written: {out_dir / bench.name}.json and .png")
