"""One Genesis scene per task for the whole session: building one costs 10-40 s (kernels are cached on disk)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def task():
    from common.cartpole import CartpoleTask

    return CartpoleTask(4, torch.device("cpu"), image_size=(32, 64), seed=0)


def _locomotion(name):
    from common.tasks import make_task

    return make_task(name, 2, torch.device("cpu"), image_size=(64, 64), seed=0)


@pytest.fixture(scope="session")
def hopper():
    return _locomotion("hopper")


@pytest.fixture(scope="session")
def ant():
    return _locomotion("ant")


@pytest.fixture(scope="session")
def humanoid():
    return _locomotion("humanoid")
