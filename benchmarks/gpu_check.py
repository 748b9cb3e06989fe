"""The GPU path in one command: gradients, the BatchRenderer, iteration costs, backward cost and a short learning run.

    python benchmarks/gpu_check.py                            # on a CUDA machine: every part, about 10 minutes
    python benchmarks/gpu_check.py --parts grads render       # some parts (see PARTS)
    python benchmarks/gpu_check.py --device cpu --quick       # the same code paths on a CPU at the smallest sizes

Parts, most important first (a machine that is lent briefly reports the important ones even if it is cut off):
  grads      the cart-pole's and the hopper's gradient tests (autograd vs central differences, the tests' own bounds)
             run on the device (tests/conftest.py builds its scenes on DVA_TEST_DEVICE)
  render     per task, a batch of envs rendered by the device's renderer (BatchRenderer on CUDA, Rasterizer on a CPU)
             against the torch renderer's image of the same state: robot-mask IoU >= 0.9 per env, and for the
             locomotion tasks the robot at the image's centre env by env (each env's camera follows its own torso)
  iteration  per task, benchmarks/iteration_time.py at the paper's configuration (64 envs, 84 x 84 px, 3 frames,
             each task's horizon): seconds per D.Va iteration split into render, encoder + actor, simulation
             forward, backward and critic, and the GPU memory
  backward   the paper's Table 1 / Fig. 10: benchmarks/backward_cost.py, D.Va against SHAC-diffrender at the
             baseline's settings (its Table 10 envs and horizons), backward seconds and peak memory
  learn      visual D.Va cart-pole at the paper's settings for --learn-minutes; its last evaluation return must
             beat the return of a policy that does nothing
  ranks      visual D.Va cart-pole, the same global batch (64 envs) as 1 process and as 2 torchrun ranks sharing the
             device: seconds per iteration after the first (the median of the logged ones) and samples per second

Every part runs in subprocesses (Genesis takes one device and precision per process, and a crash or a hang in one
part cannot take the others down), under a time limit; a part that fails records its error and the rest still run.
results/gpu_check.json is rewritten after every part, and a table is printed at the end.
"""

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("grads", "render", "iteration", "backward", "learn", "ranks")
TASKS = ("cartpole", "hopper", "humanoid", "ant")  # the order of importance
GRADIENT_TESTS = ["tests/test_cartpole_task.py::test_gradient_matches_finite_differences_with_a_termination",
                  "tests/test_locomotion_task.py::test_hopper_gradient_with_ground_contact"]
PAPER_ITERATION_S = {"hopper": 0.5, "humanoid": 1.5}  # the paper's seconds per iteration on an RTX 4080


@dataclass
class Args:
    device: Literal["cuda", "cpu"] = "cuda"
    """where to run: cuda (the real check) or cpu (the same code paths, to keep this script working)"""
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    """parts to run, in this order"""
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """tasks for the per-task parts"""
    quick: bool = False
    """every part at its smallest size (a few envs, small images, one timed iteration, a short learning run)"""
    learn_minutes: float = 3.0
    """wall clock of the learning run (--quick: 0.3)"""
    out: str = "results/gpu_check.json"
    """the JSON written after every part"""
    one: str = ""
    """internal: 'render:<task>' or 'idle:<num_envs>' runs that check in this process and prints its JSON"""


def run(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = ROOT) -> tuple[int, str]:
    """Run a command (in the repository by default); returns (exit code, the last 4000 characters of its output)."""
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, **(env or {})})
        return out.returncode, (out.stdout + out.stderr)[-4000:]
    except subprocess.TimeoutExpired as error:
        text = (error.stdout or b"").decode(errors="replace") + (error.stderr or b"").decode(errors="replace")
        return 124, f"timed out after {timeout:.0f} s\n" + text[-4000:]


def result_line(output: str) -> dict:
    line = next((x for x in reversed(output.splitlines()) if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError("no RESULT line in its output")
    return json.loads(line[len("RESULT "):])


def scratch(args: Args) -> Path:
    """Where the parts' own JSON files and runs go: a folder beside --out."""
    folder = (ROOT / args.out).parent / "gpu_check"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def last_error(output: str) -> str:
    lines = [x for x in output.strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else "no output"


# ------------------------------------------------------------------------------------------------- in-process checks
def render_check(task_name: str, device_name: str, quick: bool) -> dict:
    """The device's renderer against the torch renderer, env by env, in a state away from the start pose."""
    import numpy as np
    import torch

    from common.genesis_setup import resolve_device, resolve_renderer
    from common.tasks import make_task

    device = resolve_device(device_name)
    renderer = resolve_renderer("auto", device)
    num_envs = 4 if quick else 64
    size = (64, 64) if quick else (84, 84)  # at 48 px the cart-pole's rail falls between pixel centres
    if task_name in ("ant", "humanoid") and quick:
        size = (96, 96)  # thin limbs: a mask comparison needs a few pixels per limb
    task = make_task(task_name, num_envs, device, image_size=size, renderer=renderer, seed=0)
    task.reset()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(10):
            task.step(0.6 * (2 * torch.rand(num_envs, task.act_dim, generator=generator) - 1))
        task.render()  # places each env's camera (camera_pose)
        seg = task.camera.render(rgb=False, segmentation=True, force_render=True)[2]
        seg = torch.as_tensor(np.ascontiguousarray(seg.cpu() if torch.is_tensor(seg) else seg))
        if seg.dim() == 2:
            seg = seg[None]
        first = task.robot.link_start + 1  # link index + 1 (0 is the background)
        genesis = ((seg >= first) & (seg < first + task.robot.n_links)).to(device)
        _, coverage = task.torch_renderer().render(*task.link_poses(), *task.camera_pose(), return_alpha=True)
        ours = coverage > 0.5
    ious, offsets = [], []
    for env in range(num_envs):
        union = (ours[env] | genesis[env]).sum().item()
        ious.append((ours[env] & genesis[env]).sum().item() / max(union, 1))
        if task_name != "cartpole":  # the robot's centroid in the Genesis image, as a fraction of the width
            cols = genesis[env].nonzero()[:, 1].float()
            offsets.append(abs(cols.mean().item() / size[1] - 0.5) if len(cols) else 1.0)
    passed = min(ious) >= 0.9 and (not offsets or max(offsets) <= 0.15)
    return {"passed": passed, "renderer": renderer, "num_envs": num_envs, "image": list(size),
            "min_iou": min(ious), "mean_iou": sum(ious) / len(ious),
            "max_centroid_offset": max(offsets) if offsets else None}


def idle_return(num_envs: int, device_name: str) -> float:
    """The cart-pole's mean return over one episode of a policy that does nothing (zero force)."""
    import torch

    from common.genesis_setup import resolve_device
    from common.tasks import make_task

    task = make_task("cartpole", num_envs, resolve_device(device_name), image_size=None, seed=0)
    returns = torch.zeros(num_envs, device=task.device)
    alive = torch.ones(num_envs, dtype=torch.bool, device=task.device)
    with torch.no_grad():
        task.reset()
        for _ in range(task.max_episode_length):
            reward, terminated, _ = task.step(torch.zeros(num_envs, 1))
            returns += torch.where(alive, reward, 0.0)
            alive &= ~terminated
    return returns.mean().item()


# ---------------------------------------------------------------------------------------------------------- the parts
def part_grads(args: Args) -> list[dict]:
    start = time.time()
    code, output = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GRADIENT_TESTS],
                       timeout=300, env={"DVA_TEST_DEVICE": args.device})
    passed = re.search(r"(\d+) passed", output)
    return [{"part": "grads", "passed": code == 0, "seconds": time.time() - start,
             "tests_passed": int(passed.group(1)) if passed else 0, "error": None if code == 0 else last_error(output)}]


def part_render(args: Args) -> list[dict]:
    rows = []
    for task_name in args.tasks:
        start = time.time()
        cmd = [sys.executable, __file__, "--device", args.device, "--one", f"render:{task_name}"]
        code, output = run(cmd + (["--quick"] if args.quick else []), timeout=300)
        row = {"part": "render", "task": task_name, "passed": False, "seconds": time.time() - start, "error": None}
        try:
            row.update(result_line(output))
        except (RuntimeError, ValueError):
            row["error"] = last_error(output)
        rows.append(row)
    return rows


def part_iteration(args: Args) -> list[dict]:
    rows = []
    for task_name in args.tasks:
        start = time.time()
        name = f"gpu_check_{task_name}"
        size = ["--config", "cpu", "--num-envs", "2", "--image-size", "32", "--horizon", "4", "--iters", "1"] \
            if args.quick else ["--config", "paper"]
        cmd = [sys.executable, "benchmarks/iteration_time.py", "--task", task_name, *size, "--device", args.device,
               "--name", name, "--out", str(scratch(args))]
        code, output = run(cmd, timeout=420)
        row = {"part": "iteration", "task": task_name, "passed": code == 0, "seconds": time.time() - start,
               "error": None if code == 0 else last_error(output)}
        result = scratch(args) / f"iteration_time_{name}.json"
        if code == 0 and result.is_file():
            data = json.loads(result.read_text())
            row.update(num_envs=data["num_envs"], horizon=data["horizon"], image=data["image"], **data["mean"])
            if task_name in PAPER_ITERATION_S:
                row["paper_rtx4080_iteration_s"] = PAPER_ITERATION_S[task_name]
        rows.append(row)
    return rows


def part_backward(args: Args) -> list[dict]:
    import shac_diffrender as sd

    rows = []
    for task_name in args.tasks:
        start = time.time()
        baseline = sd.TASK_DEFAULTS[task_name]  # the paper's Table 10: envs and horizon of SHAC-diffrender
        size = ["--config", "cpu", "--num-envs", "2", "--image-size", "16", "--horizon", "4", "--iters", "1"] \
            if args.quick else ["--config", "paper", "--num-envs", str(baseline["num_envs"]), "--horizon",
                                str(baseline["horizon"])]
        cmd = [sys.executable, "benchmarks/backward_cost.py", *size, "--device", args.device, "--tasks", task_name,
               "--methods", "dva", "diffrender_store", "--out", str(scratch(args))]
        code, output = run(cmd, timeout=600)
        row = {"part": "backward", "task": task_name, "passed": code == 0, "seconds": time.time() - start,
               "error": None if code == 0 else last_error(output)}
        result = scratch(args) / f"backward_cost_{'cpu' if args.quick else 'paper'}.json"
        if code == 0 and result.is_file():
            for r in json.loads(result.read_text()):
                row[r["method"]] = {k: r[k] for k in ("num_envs", "horizon", "backward_s", "peak_mb")}
        rows.append(row)
    return rows


def part_learn(args: Args) -> list[dict]:
    start = time.time()
    minutes = 0.3 if args.quick else args.learn_minutes
    num_envs = 4 if args.quick else 64
    code, output = run([sys.executable, __file__, "--device", args.device, "--one", f"idle:{num_envs}"], timeout=300)
    try:
        idle = result_line(output)["idle_return"]
    except (RuntimeError, ValueError):
        return [{"part": "learn", "passed": False, "seconds": time.time() - start, "error": last_error(output)}]
    cmd = [sys.executable, str(ROOT / "dva_cartpole.py"), "--device", args.device, "--num-envs", str(num_envs),
           "--max-minutes", str(minutes), "--eval-every", "0", "--exp-name", "gpu_check"]
    if args.quick:
        cmd += ["--image-size", "32", "--image-width", "64", "--horizon", "8"]
    code, output = run(cmd, timeout=minutes * 60 + 300, cwd=scratch(args))  # its run folder goes there
    evals = re.findall(r"eval at iter (\d+) \(([\d.]+) min\): return (-?[\d.]+), success ([\d.]+)", output)
    row = {"part": "learn", "passed": False, "seconds": time.time() - start, "idle_return": idle,
           "error": None if code == 0 else last_error(output)}
    if code == 0 and evals:
        iteration, minutes_run, ret, success = evals[-1]
        beats_idle = float(ret) > idle
        # --quick checks the code path only (a few seconds of 4 envs need not learn anything yet): the run trained
        # and its return is one the cart-pole can give (at most 10 per step over its 240 steps)
        possible = math.isfinite(float(ret)) and float(ret) <= 2400.0 and int(iteration) >= 1
        row.update(iterations=int(iteration), minutes=float(minutes_run), eval_return=float(ret),
                   eval_success=float(success), beats_idle=beats_idle,
                   passed=possible and (beats_idle or args.quick))
        if not possible:
            row["error"] = f"eval return {float(ret):.1f} after {iteration} iterations is not a cart-pole return"
        elif not row["passed"]:
            row["error"] = f"eval return {float(ret):.1f} is not above the idle policy's {idle:.1f}"
    return [row]


def part_ranks(args: Args) -> list[dict]:
    start = time.time()
    num_envs, iters, horizon = (4, 6, 4) if args.quick else (64, 40, 32)
    config = ["--device", args.device, "--num-envs", str(num_envs), "--max-iters", str(iters), "--eval-every", "0",
              "--horizon", str(horizon), "--log-every", "2" if args.quick else "5", "--exp-name", "gpu_check_ranks"]
    if args.quick:
        config += ["--image-size", "16", "--image-width", "32"]
    row = {"part": "ranks", "passed": True, "seconds": 0.0, "num_envs": num_envs, "error": None}
    for ranks in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] \
            if ranks > 1 else [sys.executable]
        code, output = run([*launcher, str(ROOT / "dva_cartpole.py"), *config, "--torch-threads", "1"], timeout=420,
                           cwd=scratch(args), env={"OMP_NUM_THREADS": "1"})
        times = [float(t) for t in re.findall(r"iter (?:[2-9]|\d\d+)/\d+ .* ([\d.]+) s/iter", output)]
        if code != 0 or not times:
            row.update(passed=False, error=f"{ranks} rank(s): " + last_error(output))
            break
        iteration_s = sorted(times)[len(times) // 2]
        row[f"ranks_{ranks}"] = {"iteration_s": iteration_s, "sps": num_envs * horizon / iteration_s}
    if row["passed"]:
        row["speedup_2_ranks"] = row["ranks_2"]["sps"] / row["ranks_1"]["sps"]
    row["seconds"] = time.time() - start
    return [row]


def table(rows: list[dict]) -> str:
    lines = ["| part | task | passed | seconds | figures |", "|---|---|---|---|---|"]
    keys = ("tests_passed", "min_iou", "max_centroid_offset", "iteration_s", "render_s", "encoder_actor_forward_s",
            "sim_forward_s", "backward_s", "critic_s", "torch_peak_gpu_mb", "eval_return", "idle_return",
            "speedup_2_ranks")
    for r in rows:
        figures = [f"{k} {r[k]:.3g}" for k in keys if isinstance(r.get(k), (int, float))]
        figures += [f"{method} backward {r[method]['backward_s']:.3g} s / {r[method]['peak_mb']:.0f} MB"
                    for method in ("dva", "diffrender_store") if method in r]
        figures += [f"{ranks[-1]} rank(s) {r[ranks]['iteration_s']:.3g} s/iter, {r[ranks]['sps']:.0f} SPS"
                    for ranks in ("ranks_1", "ranks_2") if ranks in r]
        figures = ", ".join(figures) + (f" | error: {r['error']}" if r.get("error") else "")
        lines.append(f"| {r['part']} | {r.get('task', '')} | {'yes' if r['passed'] else 'NO'} | "
                     f"{r['seconds']:.0f} | {figures} |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.one:  # a check inside this process (called by the parts above)
        kind, value = args.one.split(":")
        if kind == "render":
            print("RESULT " + json.dumps(render_check(value, args.device, args.quick)), flush=True)
        else:
            print("RESULT " + json.dumps({"idle_return": idle_return(int(value), args.device)}), flush=True)
        sys.exit(0)
    bad = [p for p in args.parts if p not in PARTS] + [t for t in args.tasks if t not in TASKS]
    if bad:
        sys.exit(f"error: unknown parts or tasks {bad}: parts {', '.join(PARTS)}; tasks {', '.join(TASKS)}")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": args.device, "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    try:
        import torch

        report["torch"] = torch.__version__
        report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as error:  # a broken torch install is itself a finding
        report["torch"] = f"import failed: {error!r}"
    for part in args.parts:
        start = time.time()
        try:
            rows = globals()[f"part_{part}"](args)
        except Exception as error:  # a part's own failure is recorded; the others still run
            rows = [{"part": part, "passed": False, "seconds": time.time() - start, "error": repr(error)[:300]}]
        report["rows"] += rows
        for r in rows:
            print(f"{part:9s} {r.get('task', ''):9s} {'passed' if r['passed'] else 'FAILED'} "
                  f"({r['seconds']:.0f} s){'  ' + r['error'] if r.get('error') else ''}", flush=True)
        out.write_text(json.dumps(report, indent=2))
    report["all_passed"] = all(r["passed"] for r in report["rows"])
    out.write_text(json.dumps(report, indent=2))
    print(table(report["rows"]))
    print(f"written: {out}")
    sys.exit(0 if report["all_passed"] else 1)
