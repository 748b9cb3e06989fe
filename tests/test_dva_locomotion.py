"""dva_locomotion.py: recovery from non-finite windows (in process), and the script end to end per task."""

import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import dva_locomotion as dl
from common.task import SimulationBlowUp
from script_helpers import (ROOT, assert_authors_pixel_init, assert_choice_refused, assert_clock_went_on,
                            assert_one_clear_error, assert_orthogonal_init, failed_cleanly, run_here, run_script,
                            scalars, stop_clock_at)

SCRIPT = str(ROOT / "dva_locomotion.py")
TINY = ["--num-envs", "2", "--horizon", "4", "--image-size", "32", "--eval-steps", "5", "--log-every", "1"]
TAGS = ["charts/SPS", "charts/eval_return", "charts/eval_forward_velocity", "charts/nan_skips", "losses/actor_loss",
        "losses/critic_loss", "grads/actor_grad_norm", "time/render_s", "time/forward_s", "time/backward_s",
        "time/critic_s", "time/iteration_s"]


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: makes Genesis's backward pass meet a NaN gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


@pytest.fixture
def agent(hopper):
    """State SHAC on the session's 2-env hopper, H = 8."""
    args = dl.finalize_args(dl.Args(task="hopper", obs="state", num_envs=2, horizon=8, max_iters=10))
    torch.manual_seed(0)
    actor = dl.Actor((hopper.critic_obs_dim,), hopper.act_dim, (32, 32))
    critic = dl.Critic(hopper.critic_obs_dim, (32,))
    from common.utils import Episodes, RunningMeanStd

    obs_rms = RunningMeanStd((hopper.critic_obs_dim,))
    opt = torch.optim.Adam(actor.parameters(), lr=1e-3)
    episode = Episodes.zeros(2)
    hopper.reset()
    return hopper, args, actor, critic, obs_rms, opt, episode


def window(agent):
    task, args, actor, critic, obs_rms, opt, episode = agent
    return dl.rollout_window(task, actor, critic, obs_rms, None, args, episode)[0]


def params(actor):
    return torch.cat([p.detach().flatten() for p in actor.parameters()])


def test_nan_gradient_in_the_simulator_is_skipped(agent):
    task, args, actor, *_, opt, _ = agent
    before = params(actor)
    loss = NanGrad.apply(window(agent))
    end_qpos = task.qpos.detach().clone()
    grad_norm, skipped = dl.actor_update(task, actor, opt, loss, args.max_grad_norm)
    assert skipped and not torch.isfinite(torch.tensor(grad_norm))
    assert torch.equal(params(actor), before)
    assert torch.allclose(task.qpos, end_qpos, atol=1e-6)  # the scene is back at the window's end
    # ... and training goes on: the next window updates the actor with a finite gradient.
    grad_norm, skipped = dl.actor_update(task, actor, opt, window(agent), args.max_grad_norm)
    assert not skipped and 0 < grad_norm < float("inf")
    assert torch.isfinite(params(actor)).all() and not torch.equal(params(actor), before)


def test_non_finite_actor_gradient_is_skipped(agent):
    task, args, actor, *_, opt, _ = agent
    before = params(actor)
    handle = actor.mu.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    grad_norm, skipped = dl.actor_update(task, actor, opt, window(agent), args.max_grad_norm)
    handle.remove()
    assert skipped and torch.equal(params(actor), before)
    grad_norm, skipped = dl.actor_update(task, actor, opt, window(agent), args.max_grad_norm)
    assert not skipped and torch.isfinite(params(actor)).all()


def test_blown_up_env_is_reset_and_training_continues(agent):
    task, args, actor, *_, opt, episode = agent
    with torch.no_grad():  # inject a blow-up into env 0: Genesis flags it and stops the next window
        qvel = task.qvel.detach().clone()
        qvel[0, 3] = 1e30
        task.robot.set_dofs_velocity(qvel, envs_idx=torch.arange(2))
    task.cut_graph()
    with pytest.raises(SimulationBlowUp, match="nan"):  # Genesis's NaN stop, as the task reports it
        window(agent)
    assert dl.reset_broken_envs(task, episode)[0].tolist() == [0]  # env 0 alone restarts
    assert not task.rigid.get_error_envs_mask().any() and task.progress[0] == 0
    grad_norm, skipped = dl.actor_update(task, actor, opt, window(agent), args.max_grad_norm)
    assert not skipped and torch.isfinite(params(actor)).all()
    task.reset()


def test_detach_state_gives_the_decoupled_gradient(agent):
    """--detach-state (the paper's Fig. 13): the actor sees the state without its gradient, so the window's gradient
    drops SHAC's path through the actor's inputs and differs from the full one, from the same start and noise."""
    task, args, actor, critic, obs_rms, _, episode = agent
    inputs_need_grad = []
    hook = actor.register_forward_pre_hook(lambda module, inputs: inputs_need_grad.append(inputs[0].requires_grad))
    start, grads = task.snapshot(), {}
    for detach in (False, True):
        task.restore(start)
        task.cut_graph()
        inputs_need_grad.clear()
        torch.manual_seed(0)
        loss = dl.rollout_window(task, actor, critic, obs_rms, None, replace(args, detach_state=detach), episode)[0]
        actor.zero_grad()
        task.backward(loss)
        grads[detach] = torch.cat([p.grad.flatten() for p in actor.parameters()])
        assert any(inputs_need_grad) != detach, (detach, inputs_need_grad)
    hook.remove()
    assert torch.isfinite(grads[True]).all() and grads[True].norm() > 0
    assert not torch.allclose(grads[True], grads[False], rtol=1e-3, atol=1e-6)
    task.reset()


# ------------------------------------------------------------------------------------------------------ the script
def run(args, cwd, timeout=600):
    return run_script("dva_locomotion.py", args, cwd, timeout)


def run_in_process(args, cwd, timeout=600):
    return run_here("dva_locomotion.py", args, cwd, timeout)


@pytest.mark.parametrize("task", ["hopper", "ant", "humanoid"])
def test_two_iteration_smoke_run_writes_tags_and_checkpoint(task, tmp_path):
    out = run_in_process(["--task", task, *TINY, "--max-iters", "2", "--eval-every", "1", "--save-every", "1"],
                         tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith(f"{task}__dva_locomotion__1__")
    acc = scalars(run_dir)
    missing = [t for t in TAGS if t not in acc.Tags()["scalars"]]
    assert not missing, missing
    assert len(acc.Scalars("charts/eval_forward_velocity")) == 2
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] == 2 and ckpt["global_step"] == 2 * 2 * 4 and ckpt["args"]["task"] == task
    # best.pt: the checkpoint of the best evaluation so far
    evals = [e.value for e in acc.Scalars("charts/eval_return")]
    best = torch.load(run_dir / "best.pt", weights_only=False)
    assert best["iteration"] == 1 + evals.index(max(evals)) and best["best_return"] == pytest.approx(max(evals))
    assert ckpt["best_return"] == best["best_return"]
    assert re.search(r"iter 2/\d+ +return", out.stdout)
    if task == "hopper":
        # Resume continues the count with the saved settings (2 envs, H = 4, 5 eval steps: none of them given
        # again), except the flags given with it; its wall clock goes on from the checkpoint's.
        step = stop_clock_at(run_dir / "checkpoint.pt")
        out = run_in_process(["--max-iters", "3", "--eval-every", "0", "--resume", str(run_dir / "checkpoint.pt")],
                             tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        after = torch.load(run_dir / "checkpoint.pt", weights_only=False)
        assert after["iteration"] == 3 and after["global_step"] == 3 * 2 * 4
        assert_clock_went_on(run_dir, run_dir / "checkpoint.pt", step)
        assert after["best_return"] >= ckpt["best_return"]  # the best so far carries over
        assert after["args"] == {**ckpt["args"], "max_iters": 3, "eval_every": 0,
                                 "resume": str(run_dir / "checkpoint.pt")}
        lr = scalars(run_dir).Scalars("charts/learning_rate")[-1]
        assert lr.step == 3 * 2 * 4 and lr.value == pytest.approx(dl.linear_lr(2e-3, 1e-5, 2, 3), rel=1e-6)
        # eval-only takes the task and the shapes from the checkpoint; another task given with it is refused
        out = run_in_process(["--task", "ant", "--eval-only", str(run_dir / "checkpoint.pt")], tmp_path)
        assert out.returncode == 1 and out.stderr.strip().splitlines() == [
            "error: --task ant: the checkpoint was saved with --task hopper, which its networks need; leave --task out"]
        out = run_in_process(["--eval-only", str(run_dir / "checkpoint.pt")], tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "eval over 2 episodes" in out.stdout
        assert re.search(r"mean return -?[\d.]+, forward velocity -?[\d.]+ m/s", out.stdout)
        assert (run_dir / "eval_only.mp4").stat().st_size > 1000


@pytest.mark.parametrize("flags, words", [
    (["--num-envs", "0"], "--num-envs"),
    (["--resume", "no/such/checkpoint.pt"], "--resume"),
])
def test_bad_input_fails_with_one_clear_line(tmp_path, flags, words):
    assert_one_clear_error(run(flags, tmp_path, timeout=120), tmp_path, words)


def test_unknown_task_and_unreadable_checkpoint(tmp_path):
    assert_choice_refused(run(["--task", "walker"], tmp_path, timeout=120), tmp_path, "--task", "walker")
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    lines = failed_cleanly(run_in_process(["--eval-only", str(bad)], tmp_path, timeout=120), tmp_path)
    assert len(lines) == 1 and lines[0].startswith("error: cannot read the checkpoint"), lines


def test_kill_saves_a_checkpoint(tmp_path):
    """`kill` (SIGTERM) of a running job ends it with a checkpoint, like Ctrl-C."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, SCRIPT, "--task", "hopper", "--obs", "state", *TINY, "--max-iters",
                             "100000", "--eval-every", "0", "--save-every", "100000"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while "iter 1/" not in proc.stdout.readline():
            assert time.time() < deadline and proc.poll() is None, "the run did not start"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "interrupted: saving the checkpoint" in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["iteration"] >= 1


def test_critic_has_shac_initialisation():
    """SHAC's CriticMLP (DiffRL models/critic.py): every linear layer orthogonal with gain sqrt(2), zero bias.
    PyTorch's default (uniform, non-zero bias) fails both checks."""
    critic = dl.Critic(11, (64, 64))
    layers = [m for m in critic.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 3
    for layer in layers:
        assert_orthogonal_init(layer, 2 ** 0.5)


def test_the_pixel_actor_has_the_authors_initialisation():
    actor = dl.Actor((9, 48, 48), 8, (128, 64, 32))
    assert_authors_pixel_init(actor.encoder, actor.trunk[0])
