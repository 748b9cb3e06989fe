"""Data parallelism under `torchrun`: one process (rank) per GPU, or per share of a CPU, each with its own envs.

    torchrun --nproc-per-node 2 dva_cartpole.py --num-envs 64     # 2 ranks x 32 envs, gradients averaged

A script calls `setup` once, before Genesis or CUDA starts, and then the helpers below at the points where the ranks
must agree. Started as one plain process (no torchrun), `setup` returns (0, 1) and every helper is the identity: the
script computes exactly what it computed before. No algorithm lives here, only the communication:
- `average_gradients`: a module's gradients replaced by their (weighted) mean over ranks, as one flat all-reduce;
- `update_normaliser`: a running mean/std updated with the union of every rank's batch (count-weighted);
- `all_ranks`, `any_rank`, `mean`: the ranks agree on a flag (skip a non-finite update) or average a number;
- `broadcast_from_rank0`, `check_in_sync`: identical networks at the start, and a check that they never drift.
A rank that dies or hangs makes the others' next collective fail after `TIMEOUT` instead of waiting forever
(torchrun also stops the other ranks of a job once one of them exits with an error).
"""

import atexit
import os
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=15)
"""How long a collective waits for a missing rank; long enough for a slow first Genesis build (kernel compilation)."""

_device = torch.device("cpu")  # where the collectives' own small tensors live: CUDA for NCCL, the CPU for gloo


def _gpu_ids() -> list[str]:
    """The GPUs this process may use, read without starting CUDA: CUDA_VISIBLE_DEVICES if set, else nvidia-smi."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu for gpu in visible.split(",") if gpu.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return out.stdout.split() if out.returncode == 0 else []


def setup(device: str) -> tuple[int, int]:
    """Join torchrun's process group; returns (rank, world_size), (0, 1) without torchrun.

    Call before Genesis or CUDA starts: Quadrants (Genesis's compiler) honours only CUDA_VISIBLE_DEVICES, so each
    rank is shown one GPU, number LOCAL_RANK of those visible (round robin when there are more ranks on a node than
    GPUs: ranks then share a GPU). NCCL needs a GPU per rank, so ranks on the CPU, or sharing a GPU, talk through
    gloo. The stdout of every rank but 0 is silenced: rank 0 alone prints (errors still reach stderr).
    """
    global _device
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = _gpu_ids() if device != "cpu" else []
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[local_rank % len(gpus)]
    if gpus and local_world <= len(gpus) and torch.cuda.is_available():  # (after the pinning: it starts CUDA)
        backend, _device = "nccl", torch.device("cuda", 0)
        torch.cuda.set_device(0)
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    atexit.register(dist.destroy_process_group)
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")
    return dist.get_rank(), world_size


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def exit_with_error(message: str):
    """Every rank met the same bad input: rank 0 prints `message` once, then all ranks exit with status 1 together
    (after a barrier, so that torchrun cannot stop rank 0 before it has printed). One process: sys.exit(message)."""
    if world_size() == 1:
        sys.exit(message)
    if rank() == 0:
        print(message, file=sys.stderr, flush=True)
    dist.barrier()
    sys.exit(1)


def _all_reduce(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a copy of `values` on the backend's device; returns it on `values`' device."""
    out = values.detach().to(_device, copy=True)
    dist.all_reduce(out, op=op)
    return out.to(values.device)


def _reduce_number(value: float, op) -> float:
    """`value` reduced over ranks with `op` (MIN or MAX); the value itself in one process."""
    if world_size() == 1:
        return value
    return _all_reduce(torch.tensor(float(value)), op).item()


def all_ranks(flag) -> bool:
    """True on every rank if `flag` is true on every rank (e.g. "my loss is finite")."""
    return bool(_reduce_number(float(bool(flag)), dist.ReduceOp.MIN))


def any_rank(flag) -> bool:
    """True on every rank if `flag` is true on any rank (e.g. "my clock says: out of time")."""
    return bool(_reduce_number(float(bool(flag)), dist.ReduceOp.MAX))


def max_over_ranks(value: int) -> int:
    return int(_reduce_number(value, dist.ReduceOp.MAX))


def mean(*values: float) -> tuple[float, ...]:
    """The mean over ranks of each value (every rank has as many envs, so a mean of means is the global mean)."""
    if world_size() == 1:
        return values
    return tuple((_all_reduce(torch.tensor(values, dtype=torch.float64)) / world_size()).tolist())


def average_gradients(module: torch.nn.Module, weight: float = 1.0):
    """Replace the gradient of every parameter of `module` by the weighted mean over ranks, sum_r w_r g_r / sum_r w_r,
    in one flat all-reduce. `weight` is this rank's share: 1 for equal shares (the actor: as many envs per rank),
    the number of samples behind the gradient for a minibatch (the critic), 0 for none (its gradient is ignored,
    even if it is NaN or missing). A non-finite gradient on any other rank makes every rank's mean non-finite, so
    every rank then skips the step. Call before clipping: the clip then sees the global gradient."""
    if world_size() == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad.flatten() * weight if (p.grad is not None and weight > 0) else torch.zeros_like(p).flatten()
             for p in params]
    flat = _all_reduce(torch.cat([*grads, torch.tensor([float(weight)], device=params[0].device)]))
    total = flat[-1]
    for p, g in zip(params, torch.split(flat[:-1], [p.numel() for p in params])):
        p.grad = (g / total).view_as(p) if total > 0 else torch.zeros_like(p)


@torch.no_grad()
def update_normaliser(rms, x: torch.Tensor):
    """`rms.update(x)` (a common.utils.RunningMeanStd) with x the union of every rank's batch: the batch mean and
    variance are merged across ranks weighted by each rank's count (two all-reduces: sums, then squared deviations
    from the global mean), then folded into the running statistics by RunningMeanStd's own parallel-merge formula.
    Every rank ends with the same statistics."""
    if world_size() == 1:
        rms.update(x)
        return
    x = x.reshape(-1, *rms.mean.shape).to(rms.mean).double()
    sums = _all_reduce(torch.cat([torch.tensor([len(x)], dtype=torch.float64, device=x.device), x.sum(0).flatten()]))
    count = sums[0]
    if count == 0:  # every env of every rank masked: nothing to learn from
        return
    batch_mean = (sums[1:] / count).view_as(rms.mean)
    batch_var = (_all_reduce(((x - batch_mean) ** 2).sum(0)) / count).to(rms.var)
    rms.update_from_moments(batch_mean.to(rms.mean), batch_var, count.item())


@torch.no_grad()
def broadcast_from_rank0(*modules: torch.nn.Module):
    """Copy rank 0's parameters and buffers to every rank: all ranks start from the same networks."""
    if world_size() == 1:
        return
    for module in modules:
        for tensor in module.state_dict().values():
            if torch.is_tensor(tensor):
                value = tensor.to(_device, copy=True)
                dist.broadcast(value, src=0)
                tensor.copy_(value)


@torch.no_grad()
def check_in_sync(*modules: torch.nn.Module):
    """Debug check (the scripts run it at every checkpoint): every rank holds the same parameters and buffers.
    Compares a checksum per tensor (its sum in fp64, infinities and NaN made finite) by all-reducing its maximum and
    minimum; raises on every rank if any differ, which only a bug can cause (every rank takes the same averaged step
    from the same start)."""
    if world_size() == 1:
        return
    sums = torch.stack([t.double().nan_to_num(0.0, 1e30, -1e30).sum().to(_device) for m in modules
                        for t in m.state_dict().values() if torch.is_tensor(t)])
    extremes = _all_reduce(torch.cat([sums, -sums]), dist.ReduceOp.MAX)
    spread = extremes[: len(sums)] + extremes[len(sums):]
    if (spread != 0).any():
        raise RuntimeError(f"the ranks' networks drifted apart: {int((spread > 0).sum())} tensors differ, checksum "
                           f"spread up to {spread.max().item():.3g}")


class NullWriter:
    """What the ranks other than 0 log to: nothing (rank 0 alone writes TensorBoard)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
