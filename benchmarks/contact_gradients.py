"""Contact gradients: the quality and the cost of the state-SHAC actor gradient under Genesis's contact settings.

    python benchmarks/contact_gradients.py                          # hopper, ant, humanoid; every setting below
    python benchmarks/contact_gradients.py --tasks hopper --settings base substeps8 timeconst0.05
    python benchmarks/contact_gradients.py --tasks ant --checkpoints ant=runs/<state run>/checkpoint.pt \
        --name contact_gradients_trained                            # at a trained actor's states

dflex simulates the ground with penalty contacts at 16 (hopper, ant) or 48 (humanoid) substeps; our tasks use
Genesis's constraint contacts at 2 substeps, whose softness is `constraint_timeconst` (Genesis floors it at twice the
substep, so its default 0.01 s acts as 1/60 s at 2 substeps; the settings start from it, also for the hopper, whose
task default is 0.1 s). For each task and setting, in a process of its own
(a setting is a new scene, and fp64 a new Genesis):
- the actor gradient of one SHAC window (`dva_locomotion.rollout_window`, the script's own loss with a target
  critic, then `task.backward`) for each horizon and seed: its norm, and the norms' spread over seeds (the seed
  draws the start states and the action noise);
- at `--fd-horizon`: the gradient along 3 random unit directions of the actor's parameters against central finite
  differences of the same window loss (same start states, same noise) at several step sizes; their median is the
  smoothed estimate, and `agreement` = 1 - |g.v - fd| / max(|g.v|, |fd|) per direction (1: equal, 0: unrelated or
  opposite signs);
- the seconds of that window's forward and backward pass (one state-SHAC iteration without the critic's update).
The actor is freshly initialised and the starts are the task's random starts, or, with `--checkpoints TASK=PATH` (a
state checkpoint of dva_locomotion.py), the trained actor and critic at the states its policy reaches after
`--settle-steps` steps. Writes results/<name>.json and .png (norm against horizon, agreement and cost per setting).
"""

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: keyword arguments of the task (substeps, rigid_options) and the precision
SETTINGS = {
    "base": {},
    "substeps4": dict(substeps=4),
    "substeps8": dict(substeps=8),
    "substeps16": dict(substeps=16),
    "timeconst0.03": dict(rigid_options=dict(constraint_timeconst=0.03)),
    "timeconst0.1": dict(rigid_options=dict(constraint_timeconst=0.1)),
    "substeps8_timeconst0.03": dict(substeps=8, rigid_options=dict(constraint_timeconst=0.03)),
    "solver100_tol1e-8": dict(rigid_options=dict(iterations=100, tolerance=1e-8)),
    "fp64": dict(precision="64"),
}


@dataclass
class BenchArgs:
    tasks: list[str] = field(default_factory=lambda: ["hopper", "ant", "humanoid"])
    """tasks (hopper, ant, humanoid)"""
    settings: list[str] = field(default_factory=lambda: list(SETTINGS))
    """contact settings, by name (see SETTINGS)"""
    horizons: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    """window lengths for the gradient norm"""
    seeds: int = 3
    """seeds per (task, setting, horizon)"""
    num_envs: int = 16
    """envs per window"""
    fd_horizon: int = 32
    """window length of the finite-difference check"""
    fd_eps: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    """step sizes of the central differences (their median is the smoothed estimate)"""
    checkpoints: list[str] = field(default_factory=list)
    """TASK=PATH entries: a state checkpoint of dva_locomotion.py; measure at its actor's states"""
    settle_steps: int = 100
    """with a checkpoint: steps of its deterministic policy from the random starts before the windows"""
    timeout_s: int = 1200
    """limit per (task, setting) process"""
    out: str = "results"
    name: str = "contact_gradients"
    worker: str = ""
    """internal: TASK:SETTING to measure in this process (prints one JSON line)"""


def build(task_name: str, setting: dict, num_envs: int):
    from common import locomotion

    cls = {"hopper": locomotion.HopperTask, "ant": locomotion.AntTask, "humanoid": locomotion.HumanoidTask}[task_name]
    # every setting starts from Genesis's stiff default contacts (0.01 s), whatever the task's own default
    rigid_options = {"constraint_timeconst": 0.01, **setting.get("rigid_options", {})}
    return cls(num_envs, torch.device("cpu"), image_size=None, seed=0, precision=setting.get("precision", "32"),
               substeps=setting.get("substeps"), rigid_options=rigid_options)


def networks(task, checkpoint):
    import dva_locomotion as dl
    from common.utils import RunningMeanStd

    args = dl.finalize_args(dl.Args(task=task.name, obs="state", num_envs=task.num_envs))
    if checkpoint is not None:
        for key in ("actor_hidden", "critic_hidden", "gamma"):
            setattr(args, key, type(getattr(args, key))(checkpoint["args"][key]))
    actor = dl.Actor((task.critic_obs_dim,), task.act_dim, args.actor_hidden)
    critic = dl.Critic(task.critic_obs_dim, args.critic_hidden).requires_grad_(False)
    obs_rms = RunningMeanStd((task.critic_obs_dim,))
    if checkpoint is not None:
        actor.load_state_dict(checkpoint["actor"])
        critic.load_state_dict(checkpoint["target_critic"])
        obs_rms.load_state_dict(checkpoint["obs_rms"])
    return dl, args, actor, critic, obs_rms


def start_states(task, actor, obs_rms, seed: int, settle_steps: int):
    """(qpos, qvel) of every env: the task's random starts, then `settle_steps` of the deterministic policy (0: none);
    an env that ends on the way keeps its random start."""
    task.generator.manual_seed(seed)
    qpos, qvel = task.random_start(task.num_envs)
    task.set_state(qpos, qvel)
    alive = torch.ones(task.num_envs, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(settle_steps):
            _, terminated, truncated = task.step(actor(obs_rms.normalize(task.critic_obs()), deterministic=True))
            alive &= ~(terminated | truncated)
            qpos[alive], qvel[alive] = task.qpos[alive], task.qvel[alive]
    return qpos, qvel


def window(task, dl, args, actor, critic, obs_rms, state, seed, horizon, backward: bool):
    """The script's SHAC loss of one window from `state`, with the action noise of `seed`; with `backward`, the
    actor's gradient too. Returns (loss, gradient or None, forward seconds, backward seconds)."""
    from common.task import SimulationBlowUp
    from common.utils import Episodes

    args.horizon = horizon
    actor.zero_grad()
    task.set_state(*state)
    episode = Episodes.zeros(task.num_envs)
    torch.manual_seed(seed)
    start = time.perf_counter()
    try:
        loss, _, _ = dl.rollout_window(task, actor, critic, obs_rms, None, args, episode)
        forward_s = time.perf_counter() - start
        if not backward:
            task.cut_graph()
            return loss.item(), None, forward_s, 0.0
        start = time.perf_counter()
        task.backward(loss)
    except SimulationBlowUp:
        task.cut_graph()
        return float("nan"), None, float("nan"), float("nan")
    backward_s = time.perf_counter() - start
    grad = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in actor.parameters()])
    return loss.item(), grad.double(), forward_s, backward_s


def measure(task_name: str, setting_name: str, bench: BenchArgs, checkpoint_path: str | None) -> dict:
    setting = SETTINGS[setting_name]
    start = time.perf_counter()
    task = build(task_name, setting, bench.num_envs)
    build_s = time.perf_counter() - start
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False) if checkpoint_path else None
    torch.manual_seed(0)
    dl, args, actor, critic, obs_rms = networks(task, checkpoint)
    settle = bench.settle_steps if checkpoint is not None else 0
    out = dict(task=task_name, setting=setting_name, substeps=task.substeps, build_s=build_s,
               performance_mode=os.environ.get("DVA_PERFORMANCE_MODE", "1") == "1", trained=checkpoint is not None,
               norms={}, **{k: v for k, v in setting.items() if k != "substeps"})
    for horizon in bench.horizons:
        norms = []
        for seed in range(1, bench.seeds + 1):
            state = start_states(task, actor, obs_rms, seed, settle)
            _, grad, _, _ = window(task, dl, args, actor, critic, obs_rms, state, seed, horizon, backward=True)
            norms.append(float(grad.norm()) if grad is not None else float("inf"))
        out["norms"][str(horizon)] = norms
    # Finite differences along random directions of the parameters, at fd_horizon, seed 1.
    state = start_states(task, actor, obs_rms, 1, settle)
    loss, grad, forward_s, backward_s = window(task, dl, args, actor, critic, obs_rms, state, 1, bench.fd_horizon,
                                               backward=True)
    out.update(forward_s=forward_s, backward_s=backward_s, directions=[])
    params = torch.nn.utils.parameters_to_vector(actor.parameters()).detach().clone()
    generator = torch.Generator().manual_seed(123)
    for _ in range(3 if grad is not None else 0):
        v = torch.randn(params.numel(), generator=generator, dtype=torch.float64)
        v /= v.norm()
        fds = []
        for eps in bench.fd_eps:
            values = []
            for sign in (1.0, -1.0):
                torch.nn.utils.vector_to_parameters((params + sign * eps * v).float(), actor.parameters())
                values.append(window(task, dl, args, actor, critic, obs_rms, state, 1, bench.fd_horizon, False)[0])
            fds.append((values[0] - values[1]) / (2 * eps))
        torch.nn.utils.vector_to_parameters(params.float(), actor.parameters())
        analytic, fd = float(grad @ v), float(np.median(fds))
        agreement = 1.0 - abs(analytic - fd) / max(abs(analytic), abs(fd), 1e-12)
        out["directions"].append(dict(analytic=analytic, fd=fds, fd_median=fd, agreement=agreement))
    out["agreement"] = float(np.median([d["agreement"] for d in out["directions"]])) if out["directions"] else None
    return out


def summary_line(r: dict) -> str:
    norms = " ".join(f"H{h}:{np.median(v):.3g}(cv {np.std(v) / max(np.mean(v), 1e-12):.2f})"
                     for h, v in r["norms"].items())
    agreement = None if r["agreement"] is None else round(r["agreement"], 3)
    return (f"{r['task']:9s} {r['setting']:24s} agreement {agreement}"
            f"  fwd+bwd {r['forward_s'] + r['backward_s']:.2f} s  build {r['build_s']:.0f} s  norms {norms}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
    for col, task_name in enumerate(tasks):
        rows = [r for r in results if r["task"] == task_name]
        ax = axes[0, col]
        for r in rows:
            hs = [int(h) for h in r["norms"]]
            ax.plot(hs, [np.median(v) for v in r["norms"].values()], "o-", label=r["setting"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("horizon H")
        ax.set_title(f"{task_name}: actor gradient norm (median of seeds)")
        ax.legend(fontsize=7)
        ax = axes[1, col]
        names = [r["setting"] for r in rows]
        ax.bar(names, [r["agreement"] or 0.0 for r in rows], color="tab:blue", label="FD agreement")
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("agreement with smoothed FD")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        twin = ax.twinx()
        twin.plot(names, [r["forward_s"] + r["backward_s"] for r in rows], "ko-", label="s per window")
        twin.set_ylabel("seconds (forward + backward)")
        ax.set_title(f"{task_name}: H = {rows[0].get('fd_horizon', '')} window")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(bench: BenchArgs):
    paths = {}
    for entry in bench.checkpoints:
        if "=" not in entry:
            sys.exit(f"error: --checkpoints takes TASK=PATH entries (got {entry!r})")
        task_name, path = entry.split("=", 1)
        if not Path(path).is_file():
            sys.exit(f"error: --checkpoints: no checkpoint file at {path}")
        paths[task_name] = path
    problems = [f"unknown task {t!r}" for t in bench.tasks if t not in ("hopper", "ant", "humanoid")]
    problems += [f"unknown setting {s!r} (choose from {', '.join(SETTINGS)})" for s in bench.settings
                 if s not in SETTINGS]
    if bench.seeds < 1 or bench.num_envs < 1 or min(bench.horizons + [bench.fd_horizon]) < 1:
        problems.append("--seeds, --num-envs, --horizons and --fd-horizon must be >= 1")
    if problems:
        sys.exit("error: " + "; ".join(problems))
    if bench.worker:
        task_name, setting_name = bench.worker.split(":")
        print("RESULT " + json.dumps(measure(task_name, setting_name, bench, paths.get(task_name))), flush=True)
        return
    out_dir = ROOT / bench.out
    out_dir.mkdir(exist_ok=True)
    results = []
    for task_name in bench.tasks:
        for setting_name in bench.settings:
            cmd = [sys.executable, __file__, "--worker", f"{task_name}:{setting_name}", *sys.argv[1:]]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=bench.timeout_s)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("[W ")]
                    tail = (lines or ["no output"])[-1]  # the error, not Genesis's compiler warnings
                    print(f"{task_name:9s} {setting_name:24s} failed: {tail}", flush=True)
                    continue
                result = json.loads(line[len("RESULT "):])
            except subprocess.TimeoutExpired:
                print(f"{task_name:9s} {setting_name:24s} timed out after {bench.timeout_s} s", flush=True)
                continue
            result["fd_horizon"] = bench.fd_horizon
            results.append(result)
            print(summary_line(result), flush=True)
            (out_dir / f"{bench.name}.json").write_text(json.dumps(dict(
                num_envs=bench.num_envs, seeds=bench.seeds, fd_eps=bench.fd_eps, checkpoints=bench.checkpoints,
                results=results), indent=1))
    if results:
        plot(results, out_dir / f"{bench.name}.png")
        print(f"written: {out_dir / bench.name}.json and .png")


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
