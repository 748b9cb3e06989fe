"""The paper's Fig. 4 on this machine: eval return vs wall-clock minutes on visual cart-pole for D.Va, DrQ-v2, CURL,
S2V-DAgger and DreamerV3, each run as a user runs it, one after another, for the same budget and seeds.

    python benchmarks/wallclock.py                                   # all five, 30 minutes each, seed 1
    python benchmarks/wallclock.py --minutes 15 --methods dva drqv2  # a subset, a shorter budget
    python benchmarks/wallclock.py --plot-only                       # re-read the runs already made and re-plot
    python benchmarks/wallclock.py --reuse dva=runs/RUN_FOLDER       # D.Va's curve: a run of the README's command

Every method gets the CPU configuration of visual cart-pole (16 envs, 32 x 64 px, 3 frames; D.Va with H = 16, as in
the README's run command; DreamerV3 has no frame stack, its RSSM carries the history, and its train ratio, not the
env count, sets its updates per agent step) and `--max-minutes`; S2V-DAgger's minutes include stage 1 (its state
expert), DreamerV3's its prefill and pretraining (the reference's 2500 random agent steps, then 100 updates). A run's
curve is its `charts/eval_return` against its own `charts/wall_minutes` (time since the script started, evaluations
included). The table gives the minutes to the threshold: 90 % of state SHAC's eval return (--reference-return,
docs/results.md), measured at the evaluations.
Writes results/wallclock.json and results/wallclock.png; each run's console output goes to logs/wallclock_*.log.
"""

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ["--task", "cartpole", "--num-envs", "16", "--image-size", "32", "--image-width", "64"]
# Script and evaluation cadence per method: an evaluation about every 1-1.5 minutes of training.
METHODS = {
    "dva": ("dva_cartpole.py", ["--horizon", "16", "--eval-every", "200"]),  # the README's run command
    "drqv2": ("drqv2.py", ["--eval-every", "200"]),
    "curl": ("curl.py", ["--eval-every", "100"]),
    "s2v_dagger": ("s2v_dagger.py", ["--eval-every", "50", "--expert-envs", "32"]),
    "dreamerv3": ("dreamerv3.py", ["--eval-every", "2"]),  # 8 updates (measured 50 s) per iteration; evaluations
    # wait for the first update (157 iterations of prefill, then 100 pretraining updates, about 11 minutes)
}
LABELS = {"dva": "D.Va", "drqv2": "DrQ-v2", "curl": "CURL", "s2v_dagger": "S2V-DAgger", "dreamerv3": "DreamerV3"}


@dataclass
class BenchArgs:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """methods to run: dva, drqv2, curl, s2v_dagger, dreamerv3"""
    minutes: float = 30.0
    """wall-clock budget per run"""
    seeds: list[int] = field(default_factory=lambda: [1])
    """seeds (one run per method and seed)"""
    reference_return: float = 1821.0
    """state SHAC's eval return on cart-pole (docs/results.md; 2169 with the earlier cart-pole model); the
    threshold is 90 % of it"""
    reuse: list[str] = field(default_factory=list)
    """METHOD=RUN_FOLDER pairs: take that finished run (the same configuration and budget, run as the benchmark's
    command with another --exp-name, e.g. the README's D.Va command) instead of running the method again"""
    plot_only: bool = False
    """do not run anything: read the latest wallclock runs in runs/ and write the table and plot"""
    out: str = "results"
    """folder for the JSON and the plot"""


def command(method: str, seed: int, minutes: float, exp_name: str | None = None) -> list[str]:
    script, extra = METHODS[method]
    config = CPU_CONFIG[2:] if method == "dva" else CPU_CONFIG  # dva_cartpole.py has no --task
    return [sys.executable, str(ROOT / script), *config, *extra, "--seed", str(seed), "--max-minutes", str(minutes),
            "--exp-name", exp_name or f"wallclock_{method}"]


def latest_run(method: str, seed: int) -> Path | None:
    runs = sorted((ROOT / "runs").glob(f"cartpole__wallclock_{method}__{seed}__*"), key=lambda p: p.name)
    return runs[-1] if runs else None


def eval_curve(run_dir: Path) -> list[tuple[float, float, float]]:
    """(wall minutes, eval return, eval success) at every evaluation of a run, from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    minutes = {e.step: e.value for e in acc.Scalars("charts/wall_minutes")}
    success = {e.step: e.value for e in acc.Scalars("charts/eval_success")}
    return [(minutes[e.step], e.value, success.get(e.step, float("nan"))) for e in acc.Scalars("charts/eval_return")
            if e.step in minutes]


def minutes_to(curve, threshold: float) -> float | None:
    return next((m for m, ret, _ in curve if ret >= threshold), None)


if __name__ == "__main__":
    args = tyro.cli(BenchArgs)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        sys.exit(f"error: unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    reused = dict(pair.split("=", 1) if "=" in pair else (pair, "") for pair in args.reuse)
    bad = [f"{m}={folder}" for m, folder in reused.items() if m not in args.methods or not (ROOT / folder).is_dir()]
    if bad or (reused and len(args.seeds) > 1):
        sys.exit(f"error: --reuse takes METHOD=RUN_FOLDER with a method of --methods, an existing folder and one seed "
                 f"(got {bad or args.reuse} with seeds {args.seeds})")
    (ROOT / "logs").mkdir(exist_ok=True)
    if not args.plot_only:
        for seed in args.seeds:
            for method in args.methods:
                if method in reused:
                    print(f"{method} seed {seed}: reusing {reused[method]}")
                    continue
                cmd = command(method, seed, args.minutes)
                log = ROOT / "logs" / f"wallclock_{method}_{seed}.log"
                print(f"{method} seed {seed}: {' '.join(cmd[1:])}  (output: {log})", flush=True)
                start = time.time()
                with open(log, "w") as f:
                    code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
                print(f"  exit code {code} after {(time.time() - start) / 60:.1f} min", flush=True)

    threshold = 0.9 * args.reference_return
    results = {"minutes": args.minutes, "threshold": threshold, "runs": {}}
    for method in args.methods:
        for seed in args.seeds:
            run_dir = ROOT / reused[method] if method in reused else latest_run(method, seed)
            if run_dir is None:
                print(f"{method} seed {seed}: no run found in runs/")
                continue
            curve = eval_curve(run_dir)
            results["runs"][f"{method}/{seed}"] = {
                "run": run_dir.name, "curve": curve,
                "command": " ".join(["python", METHODS[method][0], *command(
                    method, seed, args.minutes, run_dir.name.split("__")[1] if method in reused else None)[2:]]),
                "minutes_to_threshold": minutes_to(curve, threshold),
                "best_return": max((ret for _, ret, _ in curve), default=None)}

    print(f"\nminutes to {threshold:.0f} (90 % of state SHAC's {args.reference_return:.0f}), budget {args.minutes} min")
    print("| method | seed | minutes to threshold | best eval return (at minutes) | last eval return (minutes) |")
    print("|---|---|---|---|---|")
    for key, run in results["runs"].items():
        method, seed = key.split("/")
        curve = run["curve"]
        if not curve:
            print(f"| {LABELS[method]} | {seed} | no evaluation | - | - |")
            continue
        best = max(curve, key=lambda c: c[1])
        reached = run["minutes_to_threshold"]
        print(f"| {LABELS[method]} | {seed} | {f'{reached:.1f}' if reached is not None else 'not reached'} | "
              f"{best[1]:.0f} ({best[0]:.1f}) | {curve[-1][1]:.0f} ({curve[-1][0]:.1f}) |")

    out = ROOT / args.out
    out.mkdir(exist_ok=True)
    (out / "wallclock.json").write_text(json.dumps(results, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, run in results["runs"].items():
        method, seed = key.split("/")
        if run["curve"]:
            m, ret, _ = np.array(run["curve"]).T
            ax.plot(m, ret, marker="o", ms=3, label=f"{LABELS[method]} (seed {seed})")
    ax.axhline(threshold, color="gray", ls="--", lw=1, label="90 % of state SHAC")
    ax.set_xlabel("wall-clock minutes (2-core CPU)")
    ax.set_ylabel("eval return")
    ax.set_title("Visual cart-pole swing-up: 16 envs, 32 x 64 px")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "wallclock.png", dpi=120)
    print(f"wrote {out / 'wallclock.json'} and {out / 'wallclock.png'}")
