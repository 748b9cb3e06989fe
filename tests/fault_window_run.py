"""Run dva_locomotion.py's training loop exactly as `python dva_locomotion.py ARGS` does, with a fault injected
into the task's step (test_dva_gradients.py runs it in a subprocess, in a scratch folder). Needs --horizon 4.

Counting the task's step calls (the first is the warm-up step of the task's constructor, then 4 per window):
call 6, the first step of iteration 2, ends env 1 (it reports a termination); call 8 raises as Genesis does when a
simulation blows up ("... 'nan'"), with env 0's state non-finite. At call 9, the first step of the window after the
aborted one, the envs' episode clocks are recorded. Prints them as the last line, in JSON.
"""

import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.locomotion import LocomotionTask  # noqa: E402
from common.task import SimulationBlowUp  # noqa: E402

END_CALL, ABORT_CALL = 6, 8
real_step = LocomotionTask.step
calls, seen = 0, {}


def step(self, actions):
    global calls
    calls += 1
    if calls == ABORT_CALL:
        self.finite = self.finite.clone()
        self.finite[0] = False
        raise SimulationBlowUp("Simulation became unstable, causing 'nan' in the state (injected)")
    if calls == ABORT_CALL + 1:
        seen["progress_after_abort"] = self.progress.tolist()
    reward, terminated, truncated = real_step(self, actions)
    if calls == END_CALL:
        terminated = terminated.clone()
        terminated[1] = True
        truncated = truncated & ~terminated
    return reward, terminated, truncated


LocomotionTask.step = step
sys.argv = [str(ROOT / "dva_locomotion.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "dva_locomotion.py"), run_name="__main__")
print(json.dumps(seen))
