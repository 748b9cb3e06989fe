"""The four tasks behind one call (the tasks themselves: common/cartpole.py, common/locomotion.py; their base:
common/task.py).

    task = make_task("hopper", num_envs, device, image_size=(64, 64), renderer="rasterizer", seed=1)
    reward, terminated, truncated = task.step(actions)   # actions (N, act_dim) in [-1, 1], differentiable
    task.critic_obs(); task.render(); task.backward(loss); task.reset(ended_env_ids)
"""

from typing import Literal

import torch

TaskName = Literal["cartpole", "hopper", "ant", "humanoid"]
TASK_NAMES: tuple[str, ...] = TaskName.__args__


def make_task(name: str, num_envs: int, device: torch.device, image_size: tuple[int, int] | None = (84, 84),
              renderer: str = "rasterizer", seed: int = 0, requires_grad: bool = True, precision: str = "32"):
    """Build task `name` with `num_envs` envs in one Genesis scene on `device`.

    image_size: (height, width) of the camera, or None for no camera; renderer: "rasterizer" or "batch" (Genesis's)
    or "torch" (common/diff_render.py); requires_grad=False builds no gradient tape (faster; resets at any step).
    Only the chosen task's module is imported, so a script copied with the cart-pole's files needs no other task.
    """
    if name == "cartpole":
        from common.cartpole import CartpoleTask as task_class
    elif name in TASK_NAMES:
        from common import locomotion

        task_class = {"hopper": locomotion.HopperTask, "ant": locomotion.AntTask,
                      "humanoid": locomotion.HumanoidTask}[name]
    else:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASK_NAMES)}")
    return task_class(num_envs, device, image_size=image_size, renderer=renderer, requires_grad=requires_grad,
                      seed=seed, precision=precision)
