"""benchmarks/wallclock.py: the command each method runs per task, and the table and plot from a run's events."""

import json
import subprocess
import sys

import pytest

from benchmarks.wallclock import TASKS, at_minutes, command, marks
from script_helpers import ROOT


@pytest.mark.parametrize("task", list(TASKS))
def test_every_method_runs_its_script_on_the_task_at_its_cpu_size(task):
    for method, script in (("dva", "dva_cartpole.py" if task == "cartpole" else "dva_locomotion.py"),
                           ("s2v_dagger", "s2v_dagger.py"), ("drqv2", "drqv2.py")):
        cmd = command(method, task, seed=3, minutes=7.5)
        assert cmd[1] == str(ROOT / script)
        flags = " ".join(cmd[2:])
        assert ("--task" not in flags) if script == "dva_cartpole.py" else f"--task {task}" in flags
        assert "--num-envs 16" in flags and "--seed 3 --max-minutes 7.5" in flags
        assert ("--image-size 32 --image-width 64" if task == "cartpole" else "--image-size 48") in flags
    # on a locomotion task the budget ends S2V-DAgger's stage 2, not the script's 500 iterations
    assert ("--max-iters 10000" in " ".join(command("s2v_dagger", task, 1, 150.0))) == (task != "cartpole")
    # D.Va's hopper decays its learning rates over the 3500 iterations its 88 minutes hold, as docs/results.md's command
    dva = " ".join(command("dva", task, 1, 88.0))
    assert ("--eval-every 250 --max-iters 3500 --seed 1" in dva) == (task == "hopper")


def test_the_same_wall_clock_takes_the_last_evaluation_before_it_and_the_best_so_far():
    curve = [(2.0, 500.0, 0.5), (4.0, 2600.0, 2.6), (6.0, 1000.0, 1.0)]
    assert at_minutes(curve, 1.9) is None  # before the first evaluation
    assert at_minutes(curve, 4.0) == (2600.0, 2600.0) and at_minutes(curve, 5.9) == (2600.0, 2600.0)
    assert at_minutes(curve, 88.0) == (1000.0, 2600.0)  # a fall after the best keeps the best so far
    assert marks(88.0) == [15.0, 30.0, 45.0, 60.0, 75.0, 88.0] and marks(30.0) == [15.0, 30.0] and marks(5.0) == [5.0]


def test_table_and_plot_from_a_reused_run(tmp_path):
    """A hopper run folder with three evaluations (written here): minutes to 90 % of the reference, the best return's
    share of it, and the JSON and plot under the task's name."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "hopper__mine__1__0"
    writer = SummaryWriter(str(run))
    for step, (minutes, ret) in enumerate([(2.0, 500.0), (4.0, 2600.0), (6.0, 3100.0)]):
        writer.add_scalar("charts/wall_minutes", minutes, step)
        writer.add_scalar("charts/eval_return", ret, step)
        writer.add_scalar("charts/eval_forward_velocity", ret / 1000, step)
    writer.close()
    out = subprocess.run([sys.executable, "benchmarks/wallclock.py", "--task", "hopper", "--methods", "dva",
                          "--reuse", f"dva={run}", "--plot-only", "--reference-return", "3000", "--minutes", "5",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| D.Va | 1 | 6.0 | 3100 (6.0) | 103% | 3100 (6.0) |" in out.stdout, out.stdout  # 90 % of 3000 at 6.0
    # the budget's end, 5 minutes: the run's last evaluation, made as the cap stopped it (here after it, at 6)
    assert "| minutes | D.Va 1 |\n|---|---|\n| 5, the end | 3100 (3100) |" in out.stdout, out.stdout
    result = json.loads((tmp_path / "wallclock_hopper.json").read_text())
    assert result["task"] == "hopper" and result["threshold"] == pytest.approx(2700.0)
    run_result = result["runs"]["dva/1"]
    assert run_result["minutes_to_threshold"] == 6.0 and run_result["curve"][1] == pytest.approx([4.0, 2600.0, 2.6])
    assert run_result["command"].startswith("python dva_locomotion.py --task hopper --num-envs 16 --image-size 48")
    assert (tmp_path / "wallclock_hopper.png").stat().st_size > 0


@pytest.mark.parametrize("task, method", [("hopper", "s2v_dagger"), ("ant", "dva"), ("humanoid", "dva")])
def test_a_tiny_budget_runs_the_method_on_the_task(task, method, tmp_path):
    """The benchmark as a user runs it, one method per locomotion task, shrunk by --script-args to 2 envs and a
    few steps: the script runs in --workdir, stops at the budget after its first iteration and evaluates, and the
    table and JSON read that evaluation back."""
    shrink = "--num-envs 2 --eval-steps 3" + (" --expert-envs 2 --expert-iters 1 --segment-length 4"
                                              if method == "s2v_dagger" else " --horizon 4")
    out = subprocess.run([sys.executable, "benchmarks/wallclock.py", "--task", task, "--methods", method,
                          "--minutes", "0.001", f"--script-args={shrink}", "--workdir", str(tmp_path), "--out",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "exit code 0" in out.stdout, (tmp_path / "logs" / f"wallclock_{task}_{method}_1.log").read_text()[-3000:]
    (run,) = (tmp_path / "runs").glob(f"{task}__wallclock_{method}__1__*")
    result = json.loads((tmp_path / f"wallclock_{task}.json").read_text())["runs"][f"{method}/1"]
    assert result["run"] == run.name and len(result["curve"]) == 1  # the one evaluation, at the budget's end
    assert f"--task {task} --num-envs 16 --image-size 48" in result["command"] and shrink in result["command"]
    assert not (ROOT / "runs" / run.name).exists()
