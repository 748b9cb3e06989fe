"""The gradient checks that need fp64 (Genesis runs one precision per process, the pytest process fp32), all in one
process: conftest.py's `fp64_checks` runs this file once per session. Prints one JSON line: the ant's and the
humanoid's relative errors against finite differences ("locomotion", for test_gradients_fp64.py) and the cart-pole
window's loss and gradient ("window", fp64_dva_window.py's, for test_dva_gradients.py)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.tasks import make_task  # noqa: E402
from fp64_dva_window import window_check  # noqa: E402
from test_locomotion_task import ant_on_its_feet, check_gradient, humanoid_in_the_air  # noqa: E402

ant = make_task("ant", 2, torch.device("cpu"), image_size=None, precision="64")
humanoid = make_task("humanoid", 2, torch.device("cpu"), image_size=None, precision="64")
errors = {
    # eps 1e-5: with the floor under every geom, a contact of the settled ant is made or broken within +-1e-4 of the
    # actions (finite differences at 1e-4 are off by 100 %, at 1e-5 they agree with autograd to 1e-7)
    "ant_contact_8_steps": check_gradient(ant, 8, *ant_on_its_feet(ant), eps=1e-5),
    "humanoid_3_steps": check_gradient(humanoid, 3, *humanoid_in_the_air(humanoid), eps=1e-4),
}
print(json.dumps({"locomotion": errors, "window": window_check()}))  # the window last: it sets fp64 as torch's default
