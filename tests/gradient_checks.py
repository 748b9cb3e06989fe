"""The simulator's gradient against finite differences, for the task tests (fp32 here, fp64 in fp64_gradients.py)."""

import torch


def window_loss(task, qpos, qvel, actions):
    """Sum of rewards over a window of `actions` (T, N, act_dim) from (qpos, qvel), each env's stopping at its
    termination (the mask of the D.Va loss)."""
    task.set_state(qpos, qvel)
    alive = torch.ones(task.num_envs, dtype=torch.bool)
    loss = torch.zeros((), dtype=torch.float64)
    for t in range(actions.shape[0]):
        reward, terminated, _ = task.step(actions[t])
        loss = loss + torch.where(alive, reward, 0.0).double().sum()
        alive = alive & ~terminated
    return loss


def gradient_error(task, qpos, qvel, actions, eps, directions=4, seed=0):
    """d window_loss / d actions by autograd through Genesis, against central differences along `directions` random
    unit directions v: (L(a + eps v) - L(a - eps v)) / (2 eps) against grad . v, at 2 rollouts a direction; with
    `directions=None`, along every entry of the actions (2 rollouts an entry).

    Returns (||grad . V - fd|| / ||fd|| over the directions, the gradient (T, N, act_dim))."""
    actions = actions.to(task.float_dtype)  # fp64 scenes: perturb in fp64
    a = actions.clone().requires_grad_(True)
    task.backward(window_loss(task, qpos, qvel, a))
    grad = a.grad.clone().double()
    if directions is None:  # entry by entry
        v = torch.eye(actions.numel(), dtype=torch.float64).view(-1, *actions.shape)
    else:
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(directions, *actions.shape, generator=gen, dtype=torch.float64)
        v /= v.flatten(1).norm(dim=1).view(-1, *[1] * actions.dim())
    fd = torch.zeros(len(v), dtype=torch.float64)
    with torch.no_grad():
        for k in range(len(v)):
            step = (eps * v[k]).to(actions.dtype)
            fd[k] = (window_loss(task, qpos, qvel, actions + step) - window_loss(task, qpos, qvel, actions - step)) / (
                2 * eps)
    task.reset()
    along = (grad.unsqueeze(0) * v).flatten(1).sum(1)
    return ((along - fd).norm() / fd.norm()).item(), grad
