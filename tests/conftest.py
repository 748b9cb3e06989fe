"""One Genesis scene per task for the whole session: building one costs 10-40 s (kernels are cached on disk).

The scenes are built on the CPU, or on the device named by DVA_TEST_DEVICE: benchmarks/gpu_check.py runs the
gradient tests on CUDA that way, with no camera (those tests render nothing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Static arrays compile per scene size, and the suite builds many sizes: test with Genesis's dynamic arrays (the
# scripts' subprocesses inherit this).
os.environ.setdefault("DVA_PERFORMANCE_MODE", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEVICE = torch.device(os.environ.get("DVA_TEST_DEVICE", "cpu"))
CAMERAS = DEVICE.type == "cpu"


@pytest.fixture(scope="session")
def task():
    from common.cartpole import CartpoleTask

    return CartpoleTask(4, DEVICE, image_size=(32, 64) if CAMERAS else None, seed=0)


def _locomotion(name):
    from common.tasks import make_task

    return make_task(name, 2, DEVICE, image_size=(64, 64) if CAMERAS else None, seed=0)


@pytest.fixture(scope="session")
def hopper():
    return _locomotion("hopper")


@pytest.fixture(scope="session")
def ant():
    return _locomotion("ant")


@pytest.fixture(scope="session")
def humanoid():
    return _locomotion("humanoid")


@pytest.fixture(scope="session")
def fp64_checks():
    """The fp64 gradient checks, run once in a process of their own (tests/fp64_gradients.py): their JSON."""
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "fp64_gradients.py")], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
