"""The paper's Table 1 and Fig. 10 on this machine: actor backward time and peak memory per iteration, D.Va vs SHAC
with differentiable rendering, at the same envs, horizon and image size.

    python benchmarks/backward_cost.py --config cpu      # 16 envs, 48 x 48 px (cart-pole 32 x 64), each task's H
    python benchmarks/backward_cost.py --config paper    # 64 envs, 84 x 84 px, H = 32

Methods: `dva` (frames from Genesis's camera, outside the graph), `diffrender` (shac_diffrender.py as shipped: frames
from the torch renderer in the graph, its forward pass recomputed in the backward pass) and `diffrender_store`
(the same, keeping the renderer's activations: the paper's setting). Each (task, method) runs the real rollout
function of its script in a process of its own, 1 warm-up and --iters timed iterations, and records
  - backward_s: `scene.backward(loss)`, everything the actor update back-propagates through;
  - peak_mb: the peak memory of the iterations above the level after set-up (CPU: resident set size, sampled
    every 2 ms; CUDA: torch's peak allocation).
Writes results/backward_cost_<config>.json and .png, and prints the table.
"""

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"cpu": dict(num_envs=16, image_size=48), "paper": dict(num_envs=64, image_size=84)}
METHODS = ("dva", "diffrender", "diffrender_store")
PAPER_BACKWARD_S = {"cartpole": (0.11, 0.36), "hopper": (0.19, 0.51), "ant": (0.21, 0.58), "humanoid": (0.68, 1.38)}


@dataclass
class BenchArgs:
    config: Literal["cpu", "paper"] = "cpu"
    """cpu: 16 envs at 48 x 48 px (cart-pole 32 x 64) with each task's D.Va horizon; paper: 64 envs at 84 x 84, H 32"""
    tasks: list[str] = field(default_factory=lambda: ["cartpole", "hopper", "ant", "humanoid"])
    """tasks to measure"""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """methods to measure"""
    iters: int = 3
    """timed iterations per (task, method), after one warm-up"""
    num_envs: int = 0
    """override the config's number of envs (0: keep)"""
    image_size: int = 0
    """override the config's image size (0: keep; cart-pole's width is twice its height at the cpu config)"""
    horizon: int = 0
    """override the horizon (0: the config's: each task's D.Va horizon at cpu, 32 at paper)"""
    device: str = "auto"
    """auto | cpu | cuda"""
    out: str = "results"
    """folder for the JSON and the plot"""
    one: str = ""
    """internal: 'task:method' measures one pair in this process and prints its JSON"""


class PeakRSS:
    """Samples this process's resident set size in a thread: the peak above the level at `start()`."""

    def __init__(self):
        self.page = __import__("os").sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def start(self):
        self.base, self.peak, self.running = self.rss(), 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return max(self.peak, self.rss()) - self.base


def measure(task_name: str, method: str, bench: BenchArgs) -> dict:
    from common.genesis_setup import resolve_device
    from common.utils import Episodes, FrameStack, RunningMeanStd
    from dva_setup import dva_setup

    device = resolve_device(bench.device)
    cfg = CONFIGS[bench.config]
    height = bench.image_size or (32 if task_name == "cartpole" and bench.config == "cpu" else cfg["image_size"])
    size = (height, 2 * height) if task_name == "cartpole" and bench.config == "cpu" else (height, height)
    dva, args, task = dva_setup(task_name, bench.num_envs or cfg["num_envs"], size, device, build_task=method == "dva")
    if bench.config == "paper":
        args.horizon = 32
    args.horizon = bench.horizon or args.horizon
    import shac_diffrender as sd

    if method == "dva":
        actor_cls, rollout = dva.Actor, dva.rollout_window
    else:
        task, renderer = sd.make_env(task_name, args.num_envs, device, size, seed=1)
        args.recompute_renderer = method == "diffrender"
        actor_cls = sd.Actor

        def rollout(task, actor, target, obs_rms, frames, args, episode):
            return sd.rollout_window(task, renderer, actor, target, obs_rms, frames, args, episode)

    torch.manual_seed(1)
    actor = actor_cls((3 * args.frame_stack, *size), task.act_dim, args.actor_hidden).to(device)
    target = dva.Critic(task.critic_obs_dim, args.critic_hidden).to(device).requires_grad_(False)
    obs_rms = RunningMeanStd((task.critic_obs_dim,)).to(device)
    frames = FrameStack(args.frame_stack)
    with torch.no_grad():
        frames.reset(task.render() if method == "dva" else sd.render(task, renderer))
    # Peak memory: the high-water mark of the training iterations above the level after set-up (freed memory is
    # reused by the next iteration, so a per-iteration baseline would hide it).
    rows, memory = [], PeakRSS()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    memory.start()
    for it in range(1 + bench.iters):
        episode = Episodes.zeros(args.num_envs, device)
        start = time.perf_counter()
        loss, _, _ = rollout(task, actor, target, obs_rms, frames, args, episode)
        forward_s = time.perf_counter() - start
        start = time.perf_counter()
        actor.zero_grad()
        task.backward(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(actor.parameters(), float("inf")).item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        backward_s = time.perf_counter() - start
        ended = episode.ended.nonzero().flatten()
        task.reset(ended)
        with torch.no_grad():
            frames.reset(task.render() if method == "dva" else sd.render(task, renderer), ended)
        if it >= 1:
            rows.append(dict(forward_s=forward_s, backward_s=backward_s, grad_norm=grad_norm))
    peak = memory.stop() if device.type != "cuda" else torch.cuda.max_memory_allocated() - base
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    mean["peak_mb"], mean["memory_before_mb"] = peak / 2**20, memory.base / 2**20
    return dict(task=task_name, method=method, num_envs=args.num_envs, horizon=args.horizon, image=list(size),
                device=str(device), torch_threads=torch.get_num_threads(), **mean)


def plot(results: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        for ax, key in zip(axes, ("backward_s", "peak_mb")):
            values = [next((r[key] for r in results if r["task"] == t and r["method"] == method), 0) for t in tasks]
            ax.bar([i + m * width for i in range(len(tasks))], values, width, label=method)
    for ax, title in zip(axes, ("actor backward per iteration (s)", "peak memory of an iteration (MB)")):
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(tasks))], tasks)
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    bench = tyro.cli(BenchArgs)
    if bench.one:
        task_name, method = bench.one.split(":")
        print("RESULT " + json.dumps(measure(task_name, method, bench)), flush=True)
        sys.exit(0)
    unknown = [t for t in bench.tasks if t not in PAPER_BACKWARD_S] + [m for m in bench.methods if m not in METHODS]
    if unknown:
        sys.exit(f"error: unknown task or method {unknown}: tasks {list(PAPER_BACKWARD_S)}, methods {list(METHODS)}")
    results = []
    for task_name in bench.tasks:
        for method in bench.methods:
            cmd = [sys.executable, __file__, "--config", bench.config, "--iters", str(bench.iters), "--device",
                   bench.device, "--num-envs", str(bench.num_envs), "--image-size", str(bench.image_size),
                   "--horizon", str(bench.horizon), "--one", f"{task_name}:{method}"]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"error: {task_name}:{method} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(line[len("RESULT "):]))
            r = results[-1]
            print(f"{task_name:9s} {method:17s} {r['num_envs']} envs x H={r['horizon']}, {r['image'][0]}x"
                  f"{r['image'][1]} px: backward {r['backward_s']:.2f} s, forward {r['forward_s']:.2f} s, "
                  f"peak {r['peak_mb']:.0f} MB, grad norm {r['grad_norm']:.3g}", flush=True)
    out_dir = ROOT / bench.out
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"backward_cost_{bench.config}.json").write_text(json.dumps(results, indent=2))
    plot(results, out_dir / f"backward_cost_{bench.config}.png")
    print(f"\n| task | D.Va backward s | diffrender backward s | ratio | D.Va peak MB | diffrender peak MB "
          f"(recompute / store) | paper backward (RTX 4080) |")
    print("|---|---|---|---|---|---|---|")
    for task_name in bench.tasks:
        by = {r["method"]: r for r in results if r["task"] == task_name}
        if "dva" in by and "diffrender" in by:
            store = by.get("diffrender_store", {}).get("peak_mb", float("nan"))
            paper = PAPER_BACKWARD_S[task_name]
            print(f"| {task_name} | {by['dva']['backward_s']:.2f} | {by['diffrender']['backward_s']:.2f} | "
                  f"{by['diffrender']['backward_s'] / by['dva']['backward_s']:.1f}x | {by['dva']['peak_mb']:.0f} | "
                  f"{by['diffrender']['peak_mb']:.0f} / {store:.0f} | {paper[0]} vs {paper[1]} |")
    print(f"written: {out_dir / f'backward_cost_{bench.config}.json'} and .png")
