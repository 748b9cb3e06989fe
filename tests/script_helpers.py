"""Helpers for the tests that run a training script as a user does (in a subprocess, or inside the test's process
where the process itself is not what is tested), reading its TensorBoard log."""

import contextlib
import gc
import io
import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, args, cwd, timeout=600, env=None):
    """`python NAME ARGS` in `cwd`; `env`: variables to set on top of this process's."""
    return subprocess.run([sys.executable, str(ROOT / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else {**os.environ, **env})


def run_here(name, args, cwd, timeout=600, episode_length=None):
    """`python NAME ARGS` in `cwd`, run inside this process: the same exit code, printed lines and files as
    `run_script`, without a process's start-up (the imports, the scene's first compilation of Genesis's kernels).
    `episode_length`: the tasks' episodes end after this many steps (a test's runs need not last 240 or 1000 steps
    for one to end). For what a process alone shows (a signal, one error line from tyro), use `run_script`."""
    from common.task import Task

    tasks = [cls for cls in _subclasses(Task) if "max_episode_length" in vars(cls)]

    def out_of_time(signum, frame):
        raise subprocess.TimeoutExpired([name, *args], timeout)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)
    saved = (sys.argv, os.getcwd(), {s: signal.getsignal(s) for s in signals},
             {cls: cls.max_episode_length for cls in tasks})
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    try:
        os.chdir(cwd)
        sys.argv = [str(ROOT / name), *map(str, args)]
        if episode_length is not None:
            for cls in tasks:
                cls.max_episode_length = episode_length
        signal.signal(signal.SIGALRM, out_of_time)
        signal.alarm(timeout)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(str(ROOT / name), run_name="__main__")
    except SystemExit as exit_:  # as Python ends a process: a message goes to stderr with status 1
        if isinstance(exit_.code, int) or exit_.code is None:
            code = exit_.code or 0
        else:
            print(exit_.code, file=stderr)
            code = 1
    finally:
        signal.alarm(0)
        sys.argv, cwd_before, handlers, lengths = saved
        os.chdir(cwd_before)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for cls, length in lengths.items():
            cls.max_episode_length = length
        gc.collect()  # the run's scene, as its process's end would
    return subprocess.CompletedProcess([name, *args], code, stdout.getvalue(), stderr.getvalue())


def _subclasses(cls):
    import common.cartpole, common.locomotion  # noqa: F401, E401  (every task class)

    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


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


def stop_clock_at(ckpt, minutes=50.0):
    """Set the checkpoint's run wall clock to `minutes`, as if the run had been stopped there; returns the global
    step it was saved at."""
    import torch

    state = torch.load(ckpt, weights_only=False)
    state["wall_minutes"] = minutes
    torch.save(state, ckpt)
    return state["global_step"]


def assert_clock_went_on(run_dir, ckpt, step, minutes=50.0):
    """The resumed run's charts/wall_minutes (logged after `step`) and its new checkpoint go on from `minutes`."""
    import torch

    resumed = [e.value for e in scalars(run_dir).Scalars("charts/wall_minutes") if e.step > step]
    assert resumed and minutes <= min(resumed) <= max(resumed) < minutes + 30, resumed
    assert torch.load(ckpt, weights_only=False)["wall_minutes"] >= max(resumed)


def assert_orthogonal_init(layer, gain):
    """An orthogonal weight times `gain` (gain^2 I on the smaller side of the flattened weight, in fp64) and a zero
    bias: PyTorch's default (uniform, non-zero bias) fails both."""
    import torch

    w = layer.weight.detach().double().flatten(1)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    torch.testing.assert_close(gram, gain ** 2 * torch.eye(len(gram), dtype=torch.float64), atol=1e-5, rtol=1e-5)
    assert not layer.bias.any()


def assert_authors_pixel_init(encoder, trunk_linear):
    """D.Va's models/encoder.py: every convolution orthogonal with gain sqrt 2, the trunk's linear layer with gain 1,
    zero biases (each of these layers has fewer outputs than inputs: orthonormal rows times its gain)."""
    import torch

    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4
    for layer, gain in [(conv, 2 ** 0.5) for conv in convs] + [(trunk_linear, 1.0)]:
        assert layer.weight.flatten(1).shape[0] < layer.weight.flatten(1).shape[1]
        assert_orthogonal_init(layer, gain)
