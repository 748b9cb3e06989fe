"""What the benchmarks share: a task's D.Va script (dva_cartpole.py or dva_locomotion.py), its finalised Args and,
if asked, the task built as that script builds it."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def dva_setup(task_name: str, num_envs: int, size: tuple[int, int], device, renderer: str = "auto",
              build_task: bool = True, camera: bool = True, **overrides):
    """Returns (script module, Args with the script's per-task defaults filled in, task or None).

    `size` is (height, width); locomotion images are square (its scripts have no --image-width); `camera=False`
    builds the task without one (state SHAC)."""
    from common.genesis_setup import resolve_renderer

    if task_name == "cartpole":
        import dva_cartpole as dva

        args = dva.Args(num_envs=num_envs, image_size=size[0], image_width=size[1], **overrides)
    else:
        import dva_locomotion as dva

        args = dva.Args(task=task_name, num_envs=num_envs, image_size=size[0], **overrides)
    args = dva.finalize_args(args)
    task = None
    if build_task:
        renderer = resolve_renderer(renderer, device)
        from common.tasks import make_task

        image_size = size if task_name == "cartpole" else (size[0], size[0])  # dva_locomotion.py: square images
        task = make_task(task_name, num_envs, device, image_size=image_size if camera else None, renderer=renderer)
    return dva, args, task
