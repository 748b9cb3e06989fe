"""benchmarks/contact_gradients.py at its smallest: one task, two settings, one process each."""

import json
import subprocess
import sys

from script_helpers import ROOT


def test_contact_gradients_measures_each_setting(tmp_path):
    """The hopper at 2 envs: the gradient norm per horizon and seed, the finite-difference agreement (a short
    window from the start is smooth: the gradient must agree), the cost, and a setting's substeps reaching the task."""
    proc = subprocess.run([sys.executable, "benchmarks/contact_gradients.py", "--tasks", "hopper", "--settings", "base",
                           "substeps4", "--horizons", "4", "--seeds", "2", "--num-envs", "2", "--fd-horizon", "6",
                           "--out", str(tmp_path), "--name", "cg"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "cg.json").read_text())["results"]
    assert [(r["setting"], r["substeps"]) for r in results] == [("base", 2), ("substeps4", 4)]
    for r in results:
        assert len(r["norms"]["4"]) == 2 and all(n > 0 for n in r["norms"]["4"])
        assert len(r["directions"]) == 3 and r["agreement"] > 0.95, r["directions"]
        assert r["forward_s"] > 0 and r["backward_s"] > 0
    assert (tmp_path / "cg.png").stat().st_size > 0


def test_contact_gradients_refuses_bad_input():
    proc = subprocess.run([sys.executable, "benchmarks/contact_gradients.py", "--settings", "soft"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown setting 'soft'" in proc.stderr and "Traceback" not in proc.stderr
