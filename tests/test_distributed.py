"""Data-parallel D.Va under torchrun (common/distributed.py), on the CPU with gloo and 2 ranks.

- Equivalence: one iteration of dva_cartpole.py's own functions (rollout_window, actor_update, train_critic) on
  2 ranks x 4 envs ends with the actor, critic, target critic and normaliser of 1 process with 8 envs, in state and
  pixel mode, from the same start states and without action noise (logstd = -inf). The critic takes one full-batch
  minibatch per pass, so its step is the mean over all 8 envs' samples in both cases.
- The same launch checks the agreements: a NaN loss on rank 1 alone makes both ranks skip, and the debug check of
  the checkpoints notices one rank's drifted parameter.
- The real script under torchrun: one run folder, the tags, one checkpoint, rank 0 alone prints; resumed by 1 process.
- Bad input: --num-envs 3 on 2 ranks gives one error line and every rank exits non-zero.

Run as a script under torchrun (`python -m torch.distributed.run --nproc-per-node 2 tests/test_distributed.py OUT`),
this file is the 2-rank side of the equivalence test: each rank writes its results to OUT/rank<r>.pt.
"""

import math
import os
import re
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import dva_cartpole as dc  # noqa: E402
from common import distributed  # noqa: E402
from common.utils import Episodes, FrameStack, RunningMeanStd  # noqa: E402

NUM_ENVS, HORIZON, IMAGE = 8, 8, (32, 64)
TINY = ["--horizon", "4", "--image-size", "32", "--image-width", "64", "--log-every", "1"]


def start_states() -> tuple[torch.Tensor, torch.Tensor]:
    """One start per env of the 8 ([x, theta], [xdot, thetadot]): the pole near hanging, the cart near the centre,
    so that no env ends within the window."""
    gen = torch.Generator().manual_seed(7)
    qpos = (torch.rand(NUM_ENVS, 2, generator=gen) - 0.5) * torch.tensor([1.0, 0.5]) + torch.tensor([0.0, -math.pi])
    return qpos, (torch.rand(NUM_ENVS, 2, generator=gen) - 0.5) * 0.2


def one_iteration(task, obs: str, rank: int = 0) -> dict:
    """dva_cartpole.py's iteration on `task`'s envs, which are the envs [rank * n, (rank + 1) * n) of the 8.

    Rank r builds its networks from seed r, so that only the broadcast makes them equal to rank 0's (= the 1-process
    run's, seed 0)."""
    args = dc.finalize_args(dc.Args(obs=obs, num_envs=NUM_ENVS, horizon=HORIZON, image_size=IMAGE[0],
                                    image_width=IMAGE[1], critic_minibatches=1, critic_iterations=3, max_iters=10),
                            distributed.world_size())
    n = task.num_envs
    qpos, qvel = start_states()
    task.set_state(qpos[rank * n:(rank + 1) * n], qvel[rank * n:(rank + 1) * n])
    torch.manual_seed(rank)
    obs_shape = (3 * args.frame_stack, *IMAGE) if obs == "pixels" else (task.critic_obs_dim,)
    actor = dc.Actor(obs_shape, task.act_dim, args.actor_hidden)
    critic = dc.Critic(task.critic_obs_dim, args.critic_hidden)
    distributed.broadcast_from_rank0(actor, critic)
    with torch.no_grad():
        actor.logstd.fill_(-math.inf)  # no action noise: the envs' actions depend on their states only
    target_critic = deepcopy(critic).requires_grad_(False)
    start = deepcopy(actor.state_dict())
    obs_rms = RunningMeanStd((task.critic_obs_dim,))
    # Plain SGD with lr 1, not the script's Adam: Adam's first step, lr g / (|g| + 1e-8), turns the round-off of a
    # gradient entry near 1e-8 into a step of up to lr (measured: 1.2e-5 on one entry of 4096 at lr 1e-2). With SGD
    # each step is the clipped gradient itself, so the parameters compare the ranks' averaged gradient with the
    # 1-process gradient entry by entry; Adam (scale-invariant) would also hide a sum in place of a mean.
    actor_opt, critic_opt = torch.optim.SGD(actor.parameters(), lr=1.0), torch.optim.SGD(critic.parameters(), lr=1.0)
    frames = FrameStack(args.frame_stack)
    if obs == "pixels":
        frames.reset(task.render())
    episode = Episodes.zeros(n)
    loss, window, _ = dc.rollout_window(task, actor, target_critic, obs_rms, frames, args, episode)
    grad_norm, skipped = dc.actor_update(task, actor, actor_opt, loss, args.max_grad_norm)
    critic_loss = dc.train_critic(critic, target_critic, critic_opt, obs_rms, window, args)
    return {"start": start, "actor": deepcopy(actor.state_dict()), "critic": deepcopy(critic.state_dict()),
            "target_critic": deepcopy(target_critic.state_dict()), "obs_rms": deepcopy(obs_rms.state_dict()),
            "frames": frames.frames, "ended": episode.ended.any().item(), "skipped": skipped,
            "grad_norm": grad_norm, "critic_loss": critic_loss, "agent": (actor, critic, actor_opt, args)}


def agreements(task, rank: int, agent) -> dict:
    """A NaN loss on rank 1 only: every rank skips its step. One rank's parameter moved: check_in_sync raises."""
    actor, critic, actor_opt, args = agent
    before = torch.cat([p.detach().flatten() for p in actor.parameters()])
    loss = dc.rollout_window(task, actor, critic, RunningMeanStd((task.critic_obs_dim,)), FrameStack(1), args,
                             Episodes.zeros(task.num_envs))[0]
    _, skipped = dc.actor_update(task, actor, actor_opt, loss * (math.nan if rank == 1 else 1.0), 1.0)
    unchanged = torch.equal(before, torch.cat([p.detach().flatten() for p in actor.parameters()]))

    def drift():
        try:
            distributed.check_in_sync(actor, critic)
        except RuntimeError as error:
            return str(error)

    in_sync = drift()  # None: the iteration left the ranks in sync
    with torch.no_grad():
        critic.net[-1].bias.add_(1e-3 if rank == 1 else 0.0)
    return {"nan_skipped": skipped, "nan_unchanged": unchanged, "in_sync": in_sync, "drift": drift()}


if __name__ == "__main__":  # one rank of the equivalence test
    from common.cartpole import CartpoleTask

    rank, world_size = distributed.setup("cpu")
    task = CartpoleTask(NUM_ENVS // world_size, torch.device("cpu"), image_size=IMAGE, seed=rank)
    results = {obs: one_iteration(task, obs, rank) for obs in ("state", "pixels")}
    results["agreements"] = agreements(task, rank, results["state"].pop("agent"))
    results["pixels"].pop("agent")
    torch.save(results, Path(sys.argv[1]) / f"rank{rank}.pt")
    sys.exit(0)


# ---------------------------------------------------------------------------------------------------------- the tests
import pytest  # noqa: E402

from script_helpers import run_here, scalars  # noqa: E402


def torchrun(args: list[str], cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGS`, on the CPU (gloo), one torch thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    out = torchrun([__file__, str(out_dir)], out_dir)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def one_process():
    from common.cartpole import CartpoleTask

    task = CartpoleTask(NUM_ENVS, torch.device("cpu"), image_size=IMAGE, seed=0)
    return {obs: one_iteration(task, obs) for obs in ("state", "pixels")}


@pytest.mark.parametrize("obs", ["state", "pixels"])
def test_two_ranks_take_the_step_of_one_process(two_ranks, one_process, obs):
    reference = one_process[obs]
    assert not reference["ended"] and not reference["skipped"]
    for rank, results in enumerate(two_ranks):
        mine = results[obs]
        assert not mine["ended"] and not mine["skipped"]
        if obs == "pixels":  # the same frames: the rank's envs are the reference's slice
            assert torch.equal(mine["frames"], reference["frames"][4 * rank:4 * (rank + 1)])
        assert mine["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)
        for part in ("actor", "critic", "target_critic", "obs_rms"):
            for name, value in reference[part].items():
                # every rank equal to the other bit for bit, and to the 1-process run within 1e-5
                assert torch.equal(mine[part][name], two_ranks[0][obs][part][name]), (rank, part, name)
                assert torch.allclose(mine[part][name], value, rtol=0, atol=1e-5, equal_nan=True), \
                    (rank, part, name, (mine[part][name] - value).abs().max().item())
    # the ranks started from rank 0's networks, which are the 1-process run's (seed 0), and the step moved them
    for results in two_ranks:
        assert all(torch.equal(v, reference["start"][k]) for k, v in results[obs]["start"].items())
    assert not torch.equal(reference["actor"]["mu.weight"], reference["start"]["mu.weight"])
    assert reference["critic_loss"] > 0


def test_a_nan_on_one_rank_skips_every_rank_and_drift_is_caught(two_ranks):
    for results in two_ranks:
        agreed = results["agreements"]
        assert agreed["nan_skipped"] and agreed["nan_unchanged"]
        assert agreed["in_sync"] is None
        assert agreed["drift"] and "drifted apart: 1 tensors differ" in agreed["drift"]


def test_two_rank_run_then_resumed_by_one_process(tmp_path):
    """dva_cartpole.py under torchrun, 2 ranks x 2 envs, pixels, 2 iterations with an evaluation and a video."""
    out = torchrun([str(ROOT / "dva_cartpole.py"), *TINY, "--num-envs", "4", "--max-iters", "2", "--eval-every", "2",
                    "--save-every", "1", "--capture-video"], tmp_path)  # (each save checks that the ranks agree)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    (run_dir,) = (tmp_path / "runs").iterdir()  # one run folder, written by rank 0
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("events")) == [
        "best.pt", "checkpoint.pt", "eval_000002.mp4"]
    assert len(list(run_dir.glob("events*"))) == 1
    assert out.stdout.count("run folder:") == 1 and "2 ranks x 2 envs" in out.stdout  # rank 0 alone prints
    assert out.stdout.count("iter 2/2") == 1
    acc = scalars(run_dir)
    for tag in ("charts/SPS", "charts/eval_return", "charts/eval_success", "losses/actor_loss", "losses/critic_loss",
                "grads/actor_grad_norm", "time/backward_s"):
        assert len(acc.Scalars(tag)) == (1 if tag.startswith("charts/eval") else 2), tag
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and ckpt["iteration"] == 2 and ckpt["global_step"] == 2 * 4 * 4

    out = run_here("dva_cartpole.py", [*TINY, "--max-iters", "3", "--eval-every", "0", "--resume",
                                       str(run_dir / "checkpoint.pt")], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert resumed["world_size"] == 1 and resumed["iteration"] == 3 and resumed["global_step"] == 3 * 4 * 4
    assert resumed["args"]["num_envs"] == 4 and "iter 3/3" in out.stdout
    assert not torch.equal(resumed["actor"]["mu.weight"], ckpt["actor"]["mu.weight"])


def test_num_envs_not_divisible_by_the_ranks_is_one_clear_error(tmp_path):
    # (the other flags make a run that slipped through short)
    out = torchrun([str(ROOT / "dva_cartpole.py"), "--num-envs", "3", "--obs", "state", "--horizon", "2",
                    "--max-iters", "1"], tmp_path, timeout=300)
    assert out.returncode != 0
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error:")]
    assert errors == ["error: --num-envs 3 must be divisible by the number of ranks, 2: every rank simulates "
                      "num_envs / world_size envs"], errors
    assert not (tmp_path / "runs").exists()
    # torchrun's summary: both ranks ended non-zero, with status 1 or, the one still tearing down when torchrun saw
    # the other's exit, by torchrun's SIGTERM (-15); the error line was printed before either left the barrier
    codes = dict(re.findall(r"rank\s*: (\d) .*\n\s*exitcode\s*: (-?\d+)", out.stderr))
    assert sorted(codes) == ["0", "1"] and set(codes.values()) <= {"1", "-15"}, out.stderr[-2000:]
