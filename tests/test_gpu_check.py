"""benchmarks/gpu_check.py, the one command that checks the CUDA path, run on the CPU at its smallest sizes: the same
code paths (Rasterizer instead of the BatchRenderer), so that the script works the day a GPU is there."""

import json
import subprocess
import sys

from benchmarks.gpu_check import render_check
from script_helpers import ROOT


def test_gpu_check_runs_its_parts_on_the_cpu(tmp_path):
    """The per-task parts on the hopper (its tracking camera is the harder render check) and the learning run. The
    gradient part runs two tests that the suite runs anyway, and the 1-process vs 2-rank part the torchrun runs of
    test_distributed.py: both are left out."""
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--tasks", "hopper",
                           "--parts", "render", "iteration", "backward", "learn",
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    rows = {(r["part"], r.get("task")): r for r in report["rows"]}
    assert set(rows) == {("render", "hopper"), ("iteration", "hopper"), ("backward", "hopper"), ("learn", None)}
    failed = [r for r in report["rows"] if not r["passed"]]
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    render = rows[("render", "hopper")]
    assert render["renderer"] == "rasterizer" and render["min_iou"] >= 0.9 and render["max_centroid_offset"] <= 0.15
    assert rows[("iteration", "hopper")]["iteration_s"] > 0
    backward = rows[("backward", "hopper")]
    assert backward["dva"]["backward_s"] > 0 and backward["diffrender_store"]["backward_s"] > 0
    learn = rows[("learn", None)]
    assert learn["iterations"] >= 1 and -1e6 < learn["eval_return"] <= 2400.0  # a cart-pole return, finite
    assert "| render | hopper | yes |" in proc.stdout  # the printed table


def test_gpu_check_cartpole_render_at_its_quick_size():
    """The cart-pole's render check at the --quick size (the test above runs the hopper's), in this process: at too
    small a size its rail falls between pixel centres and the two masks part at every edge."""
    result = render_check("cartpole", "cpu", quick=True)
    assert result["passed"] and result["renderer"] == "rasterizer", result


def test_gpu_check_refuses_an_unknown_part(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--parts", "rendering",
                           "--out", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "rendering" in lines[0] and lines[0].startswith("error:")
