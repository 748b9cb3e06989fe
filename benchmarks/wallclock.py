"""The paper's Fig. 4 on this machine: eval return vs wall-clock minutes for D.Va, DrQ-v2, CURL, S2V-DAgger and
DreamerV3 on a visual task, each run as a user runs it, one after another, for the same budget and seeds.

    python benchmarks/wallclock.py                                   # cart-pole: all five, 30 minutes each, seed 1
    python benchmarks/wallclock.py --minutes 15 --methods dva drqv2  # a subset, a shorter budget
    python benchmarks/wallclock.py --plot-only                       # re-read the runs already made and re-plot
    python benchmarks/wallclock.py --reuse dva=runs/RUN_FOLDER       # D.Va's curve: a run of the README's command
    python benchmarks/wallclock.py --task ant --methods dva s2v_dagger --minutes 150   # the distillation comparison
    python benchmarks/wallclock.py --task hopper --methods dva s2v_dagger --minutes 88 # and the hopper's
    python benchmarks/wallclock.py --task ant --methods dva --minutes 0.01 --workdir /tmp/check \
        --script-args="--num-envs 2 --eval-steps 5"                  # a check that the command runs, in seconds

Every method gets the task's CPU configuration (`TASKS`: cart-pole 16 envs at 32 x 64 px; hopper, ant and humanoid
16 envs at 48 x 48 px, the scale of docs/results.md's visual locomotion runs, about 1-2 s per D.Va iteration on 2
cores; 3 frames; D.Va on cart-pole with H = 16, as in the README's run command, on hopper with its learning rates
decaying over 3500 iterations, as in docs/results.md's; DreamerV3 has no frame stack, its RSSM carries the history,
and its train ratio, not the env count, sets its updates per agent step) and
`--max-minutes`; S2V-DAgger's minutes include stage 1 (its state expert: the state SHAC of the D.Va script with its
defaults), DreamerV3's its prefill and pretraining (the reference's 2500 random agent steps, then 100 updates). A
run's curve is its `charts/eval_return` against its own `charts/wall_minutes` (time since its training loop
started, evaluations included; S2V-DAgger's since the script started, stage 1 included; a run made in parts with
`--resume` goes on from its checkpoint's clock). The table gives the minutes to the threshold, 90 % of the task's
state-SHAC eval return (--reference-return, default the task's in docs/results.md), measured at the evaluations, and
each run's best return as a share of that reference; a second table gives every run at the same wall clock (every 15
minutes, and the budget's end, whose evaluation the cap makes a little after it): its last evaluation at or before it
and its best so far.
Writes results/wallclock[_TASK].json and .png; each run's console output goes to logs/wallclock_[TASK_]*.log.
"""

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
# Per task: the CPU configuration every method gets, state SHAC's eval return there (docs/results.md: cart-pole's
# 500-iteration reference; the 3-D tasks' best evaluation of their state-SHAC runs), and the plot's title.
TASKS = {
    "cartpole": dict(config=["--num-envs", "16", "--image-size", "32", "--image-width", "64"], reference=1821.0,
                     title="Visual cart-pole swing-up: 16 envs, 32 x 64 px"),
    "hopper": dict(config=["--num-envs", "16", "--image-size", "48"], reference=4102.0,
                   title="Visual hopper: 16 envs, 48 x 48 px",
                   method_flags={"dva": ["--max-iters", "3500"]}),  # docs/results.md's visual hopper command: its
    # learning rates decay over the 3500 iterations that about 88 minutes hold, not over the paper's 30000
    "ant": dict(config=["--num-envs", "16", "--image-size", "48"], reference=10367.0,
                title="Visual ant: 16 envs, 48 x 48 px"),
    "humanoid": dict(config=["--num-envs", "16", "--image-size", "48"], reference=10245.0,
                     title="Visual humanoid: 16 envs, 48 x 48 px"),
}
# Script and evaluation cadence per method (cart-pole; locomotion): an evaluation about every 1-3 minutes of training.
METHODS = {
    "dva": (("dva_cartpole.py", ["--horizon", "16", "--eval-every", "200"]),  # the README's run command
            ("dva_locomotion.py", ["--eval-every", "250"])),  # docs/results.md's visual locomotion command
    "drqv2": (("drqv2.py", ["--eval-every", "200"]), ("drqv2.py", ["--eval-every", "200"])),
    "curl": (("curl.py", ["--eval-every", "100"]), ("curl.py", ["--eval-every", "100"])),
    "s2v_dagger": (("s2v_dagger.py", ["--eval-every", "50", "--expert-envs", "32"]),
                   ("s2v_dagger.py", ["--eval-every", "50", "--max-iters", "10000"])),  # its expert: the script's
    # state defaults; 10000 iterations (the authors' max_epochs) so that the budget ends it, not the script's 500
    "dreamerv3": (("dreamerv3.py", ["--eval-every", "2"]), ("dreamerv3.py", ["--eval-every", "2"])),
    # DreamerV3: 8 updates (measured 50 s) per iteration; evaluations wait for the first update (157 iterations of
    # prefill, then 100 pretraining updates, about 11 minutes)
}
LABELS = {"dva": "D.Va", "drqv2": "DrQ-v2", "curl": "CURL", "s2v_dagger": "S2V-DAgger", "dreamerv3": "DreamerV3"}


@dataclass
class BenchArgs:
    task: Literal["cartpole", "hopper", "ant", "humanoid"] = "cartpole"
    """the visual task every method runs on"""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """methods to run: dva, drqv2, curl, s2v_dagger, dreamerv3"""
    minutes: float = 30.0
    """wall-clock budget per run"""
    seeds: list[int] = field(default_factory=lambda: [1])
    """seeds (one run per method and seed)"""
    reference_return: float = 0.0
    """state SHAC's eval return on the task (0 = the task's in TASKS, from docs/results.md); the threshold is 90 % of
    it"""
    reuse: list[str] = field(default_factory=list)
    """METHOD=RUN_FOLDER pairs: take that finished run (the same configuration and budget, run as the benchmark's
    command with another --exp-name, e.g. the README's D.Va command) instead of running the method again"""
    plot_only: bool = False
    """do not run anything: read the latest wallclock runs in runs/ and write the table and plot"""
    script_args: str = ""
    """more flags for every run's script, after the task's configuration (a flag given again wins there), given
    with "=" since they start with "--" (e.g. --script-args="--device cuda")"""
    workdir: str = ""
    """folder the runs are made in and read from: its runs/ and logs/ (default: the repository's)"""
    out: str = "results"
    """folder for the JSON and the plot"""


def script_and_flags(method: str, task: str) -> tuple[str, list[str]]:
    script, extra = METHODS[method][task != "cartpole"]
    task_flag = [] if script == "dva_cartpole.py" else ["--task", task]  # dva_cartpole.py has no --task
    return script, [*task_flag, *TASKS[task]["config"], *extra, *TASKS[task].get("method_flags", {}).get(method, [])]


def command(method: str, task: str, seed: int, minutes: float, exp_name: str | None = None,
            script_args: str = "") -> list[str]:
    script, flags = script_and_flags(method, task)
    return [sys.executable, str(ROOT / script), *flags, *shlex.split(script_args), "--seed", str(seed), "--max-minutes",
            str(minutes), "--exp-name", exp_name or f"wallclock_{method}"]


def latest_run(workdir: Path, method: str, task: str, seed: int) -> Path | None:
    runs = sorted((workdir / "runs").glob(f"{task}__wallclock_{method}__{seed}__*"), key=lambda p: p.name)
    return runs[-1] if runs else None


def eval_curve(run_dir: Path, task: str) -> list[tuple[float, float, float]]:
    """(wall minutes, eval return, eval score) at every evaluation of a run, from its TensorBoard events; the score is
    the cart-pole's success rate or the locomotion's forward velocity."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    minutes = {e.step: e.value for e in acc.Scalars("charts/wall_minutes")}
    tag = "charts/eval_success" if task == "cartpole" else "charts/eval_forward_velocity"
    score = {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}
    return [(minutes[e.step], e.value, score.get(e.step, float("nan"))) for e in acc.Scalars("charts/eval_return")
            if e.step in minutes]


def minutes_to(curve, threshold: float) -> float | None:
    return next((m for m, ret, _ in curve if ret >= threshold), None)


def at_minutes(curve, minutes: float) -> tuple[float, float] | None:
    """The run at a wall clock: its last evaluation at or before it and the best evaluation so far (None before its
    first evaluation)."""
    so_far = [ret for m, ret, _ in curve if m <= minutes]
    return (so_far[-1], max(so_far)) if so_far else None


def marks(budget: float, every: float = 15.0) -> list[float]:
    """The wall clocks of the same-time table: every 15 minutes, and the budget's end."""
    return [*np.arange(every, budget, every).tolist(), budget]


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
    reference = args.reference_return or TASKS[args.task]["reference"]
    suffix = "" if args.task == "cartpole" else f"_{args.task}"  # cart-pole's files keep their names
    workdir = Path(args.workdir).resolve() if args.workdir else ROOT
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        for seed in args.seeds:
            for method in args.methods:
                if method in reused:
                    print(f"{method} seed {seed}: reusing {reused[method]}")
                    continue
                cmd = command(method, args.task, seed, args.minutes, script_args=args.script_args)
                log = workdir / "logs" / f"wallclock{suffix}_{method}_{seed}.log"
                print(f"{method} seed {seed}: {' '.join(cmd[1:])}  (output: {log})", flush=True)
                start = time.time()
                with open(log, "w") as f:
                    code = subprocess.run(cmd, cwd=workdir, stdout=f, stderr=subprocess.STDOUT).returncode
                print(f"  exit code {code} after {(time.time() - start) / 60:.1f} min", flush=True)

    threshold = 0.9 * reference
    results = {"task": args.task, "minutes": args.minutes, "reference_return": reference, "threshold": threshold,
               "runs": {}}
    for method in args.methods:
        for seed in args.seeds:
            run_dir = ROOT / reused[method] if method in reused else latest_run(workdir, method, args.task, seed)
            if run_dir is None:
                print(f"{method} seed {seed}: no run found in runs/")
                continue
            curve = eval_curve(run_dir, args.task)
            best = max((ret for _, ret, _ in curve), default=None)
            results["runs"][f"{method}/{seed}"] = {
                "run": run_dir.name, "curve": curve,
                "command": " ".join(["python", script_and_flags(method, args.task)[0], *command(
                    method, args.task, seed, args.minutes,
                    run_dir.name.split("__")[1] if method in reused else None, args.script_args)[2:]]),
                "minutes_to_threshold": minutes_to(curve, threshold), "best_return": best,
                "best_share_of_reference": None if best is None else best / reference}

    print(f"\n{args.task}: minutes to {threshold:.0f} (90 % of state SHAC's {reference:.0f}), budget {args.minutes} min")
    print("| method | seed | minutes to threshold | best eval return (at minutes) | share of state SHAC "
          "| last eval return (minutes) |")
    print("|---|---|---|---|---|---|")
    for key, run in results["runs"].items():
        method, seed = key.split("/")
        curve = run["curve"]
        if not curve:
            print(f"| {LABELS[method]} | {seed} | no evaluation | - | - | - |")
            continue
        best = max(curve, key=lambda c: c[1])
        reached = run["minutes_to_threshold"]
        print(f"| {LABELS[method]} | {seed} | {f'{reached:.1f}' if reached is not None else 'not reached'} | "
              f"{best[1]:.0f} ({best[0]:.1f}) | {best[1] / reference:.0%} | {curve[-1][1]:.0f} ({curve[-1][0]:.1f}) |")

    runs = {key: run["curve"] for key, run in results["runs"].items()}
    print("\nat the same wall clock: the last eval return at or before it (the best so far)")
    print("| minutes | " + " | ".join(f"{LABELS[k.split('/')[0]]} {k.split('/')[1]}" for k in runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for mark in marks(args.minutes):
        end = mark == args.minutes  # the budget's end: the run's last evaluation, made as its cap stops it
        cells = [at_minutes(curve, float("inf") if end else mark) for curve in runs.values()]
        print(f"| {mark:g}{', the end' if end else ''} | "
              + " | ".join("-" if c is None else f"{c[0]:.0f} ({c[1]:.0f})" for c in cells) + " |")

    out = ROOT / args.out
    out.mkdir(exist_ok=True)
    (out / f"wallclock{suffix}.json").write_text(json.dumps(results, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {method: f"C{i}" for i, method in enumerate(args.methods)}  # a colour per method, a line style per seed
    for key, run in results["runs"].items():
        method, seed = key.split("/")
        if run["curve"]:
            m, ret, _ = np.array(run["curve"]).T
            ax.plot(m, ret, marker="o", ms=3, color=colours[method], ls=["-", "--", ":", "-."][args.seeds.index(
                int(seed)) % 4], label=f"{LABELS[method]} (seed {seed})")
    ax.axhline(threshold, color="gray", ls="--", lw=1, label="90 % of state SHAC")
    ax.set_xlabel("wall-clock minutes (2-core CPU)")
    ax.set_ylabel("eval return")
    ax.set_title(TASKS[args.task]["title"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"wallclock{suffix}.png", dpi=120)
    print(f"wrote {out / f'wallclock{suffix}.json'} and {out / f'wallclock{suffix}.png'}")
