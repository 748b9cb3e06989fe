"""Return curves of state-SHAC runs on the 3-D tasks from their console output, beside the paper's SHAC expert.

    python dva_locomotion.py --task hopper --obs state --max-minutes 35 --eval-every 100 > hopper.log
    python benchmarks/shac_curves.py "hopper=hopper.log=<the command>" "ant=ant.log=<the command>"

Each argument is NAME=LOG=COMMAND, NAME a task or a task and a label (hopper_timeconst0.1). Reads the script's "eval at iter ..." and "iter ..." lines and writes
results/state_shac_3d_cpu.json (evaluations, the median seconds per iteration from iteration 20 on, the mean idle
fraction, the command) and .png (eval return against iterations and minutes). The experts' returns are read off the
paper's distillation figure. Runs already in the JSON file and not given again are kept.
"""
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"hopper": 4900, "ant": 6700, "humanoid": 8200}
EVAL = re.compile(r"eval at iter (\d+) \(([\d.]+) min\): return (-?[\d.]+), forward velocity (-?[\d.]+) m/s")
ITER = re.compile(r"^iter (\d+)/\d+ .*idle ([\d.]+)\s+([\d.]+) s/iter", re.M)


def read_log(path: str, command: str, task: str) -> dict:
    text = Path(path).read_text()
    evals = [dict(iteration=int(i), minutes=float(m), eval_return=float(r), forward_velocity=float(v))
             for i, m, r, v in EVAL.findall(text)]
    iters = [(int(i), float(s), float(idle)) for i, idle, s in ITER.findall(text)]
    steady = [s for i, s, _ in iters if i >= 20]  # after the first iterations' kernel compilation
    return dict(command=command, evals=evals,
                seconds_per_iteration_median=float(np.median(steady)) if steady else None,
                idle_fraction_mean=float(np.mean([f for _, _, f in iters])) if iters else None,
                paper_expert=PAPER[task.split("_")[0]])


def plot(out: dict, path: Path):
    """One column per task (every run of it overlaid), eval return against iterations (top) and minutes (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [task for task in PAPER if any(name.split("_")[0] == task for name in out)]
    fig, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 8), squeeze=False)
    for col, task in enumerate(tasks):
        for row, key in enumerate(("iteration", "minutes")):
            ax = axes[row, col]
            for name, d in out.items():
                if name.split("_")[0] == task:
                    ax.plot([e[key] for e in d["evals"]], [e["eval_return"] for e in d["evals"]], "o-", ms=3,
                            label=name)
            ax.axhline(PAPER[task], color="k", ls="--", label="paper's SHAC expert")
            ax.set_xlabel(key)
            ax.set_ylabel("eval return")
            ax.set_title(f"{task}: state SHAC (2-core CPU)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if not sys.argv[1:] or any(arg.count("=") < 2 or arg.split("=")[0].split("_")[0] not in PAPER
                               for arg in sys.argv[1:]):
        sys.exit("error: give NAME=LOG=COMMAND arguments, NAME hopper, ant or humanoid, or one of them _label")
    json_path = ROOT / "results/state_shac_3d_cpu.json"
    out = json.loads(json_path.read_text()) if json_path.exists() else {}
    for arg in sys.argv[1:]:
        task, path, command = arg.split("=", 2)
        out[task] = read_log(path, command, task)
    json_path.write_text(json.dumps(out, indent=1))
    plot(out, ROOT / "results/state_shac_3d_cpu.png")
    for task, d in out.items():
        best = max(d["evals"], key=lambda e: e["eval_return"], default=None)
        print(f"{task}: last {d['evals'][-1] if d['evals'] else None}, best {best}, "
              f"{d['seconds_per_iteration_median']} s per iteration, idle {d['idle_fraction_mean']}")
