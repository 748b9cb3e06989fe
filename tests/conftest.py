"""One Genesis scene for the whole session: building one costs 10-30 s (kernels are cached on disk)."""

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
