"""Helpers for the tests that run a training script as a user does: in a subprocess, reading its TensorBoard log."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, args, cwd, timeout=600, env=None):
    """`python NAME ARGS` in `cwd`; `env`: variables to set on top of this process's."""
    return subprocess.run([sys.executable, str(ROOT / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else {**os.environ, **env})


def scalars(run_dir):
    """The run's TensorBoard events (all scalars and images kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def failed_cleanly(out, cwd):
    """The run exited non-zero and created no run folder; returns its stderr lines."""
    assert out.returncode != 0
    assert not (cwd / "runs").exists()
    return out.stderr.strip().splitlines()


def assert_choice_refused(out, cwd, flag, value):
    """tyro refused a value outside a `Literal` flag's choices (exit 2, before anything was built), naming the flag,
    the value and the choices."""
    failed_cleanly(out, cwd)
    message = " ".join(re.sub(r"[\u2500-\u257f]", " ", out.stderr).split())  # without the box drawing
    assert out.returncode == 2 and f"invalid choice '{value}' for argument '{flag}'" in message, message
    assert "Expected one of" in message, message


def assert_one_clear_error(out, cwd, words):
    """The run failed cleanly with one line, "error: ...", that names `words`."""
    lines = failed_cleanly(out, cwd)
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], lines
