"""The gradient that the scripts' own functions produce: dva_cartpole.py's `rollout_window` loss against SHAC's loss
written out by hand and its gradient against finite differences (fp64, in the suite's fp64 process), zero gradient after an env
ended, the gradient after a mid-training evaluation, and the recovery of dva_locomotion.py and shac_diffrender.py
from a window that Genesis aborted (their window-boundary function in process, and dva_locomotion.py's real training
loop with an injected fault).

The fp32 tests use the session's 4-env cart-pole (conftest.py) and the set-up of fp64_dva_window.py: env 1 leaves
the track a few steps into the window, env 2 reaches its time limit at step 5, envs 0 and 3 run the whole window.
"""

import re
from types import SimpleNamespace

import pytest
import torch

import dva_cartpole as dc
import dva_locomotion as dl
import shac_diffrender as sd
from common.cartpole import CartpoleTask
from common.task import SimulationBlowUp
from common.utils import FrameStack
from fp64_dva_window import (ARGS, TERMINATE_ENV, TRUNCATE_AFTER, TRUNCATE_ENV, first_done, make_agent,
                             start_window, window)
from script_helpers import run_here, scalars

H = ARGS.horizon


def check_closing_steps(closed_at, track_x=None):
    """Env TERMINATE_ENV's return closes strictly inside the window, env TRUNCATE_ENV's at its time limit, the
    others' at the window's end. With `track_x` (H, N) (x before each step), the termination is the track's end."""
    k = closed_at[TERMINATE_ENV]
    assert 1 <= k <= H - 3, closed_at
    assert closed_at[TRUNCATE_ENV] == TRUNCATE_AFTER - 1, closed_at
    assert all(c == H - 1 for i, c in enumerate(closed_at) if i not in (TERMINATE_ENV, TRUNCATE_ENV)), closed_at
    if track_x is not None:
        limit = CartpoleTask.track_limit
        assert track_x[k, TERMINATE_ENV].abs() <= limit < track_x[k + 1, TERMINATE_ENV].abs()
    return k


# ------------------------------------------------------------------------------------------------------ (a) fp64
def test_window_loss_and_its_gradient_in_fp64(fp64_checks):
    """rollout_window's loss equals SHAC's loss computed by hand from a plain re-simulation of the same actions (so a
    missing bootstrap or a wrong mask fails), and its autograd gradient w.r.t. actor parameters (last layer, first
    and second hidden layers, logstd) equals central finite differences of that loss (so a cut gradient path fails).
    Measured: loss 1.5e-16 relative; gradient 1e-11 to 1.3e-10 relative on the last layer, <= 2.3e-8 (a first-layer
    weight whose entry is 1000x smaller) elsewhere; the bound is 1e-6."""
    result = fp64_checks["window"]  # fp64_dva_window.py's window_check, in the suite's fp64 process
    assert result["closed_at"] == result["hand_closed_at"]
    check_closing_steps(result["closed_at"])
    assert abs(result["loss"] - result["hand_loss"]) <= 1e-9 * abs(result["hand_loss"]), result
    autograd, fd = (torch.tensor(result[key], dtype=torch.float64) for key in ("autograd", "fd"))
    assert (autograd != 0).all()
    scale = torch.maximum(fd.abs(), 1e-3 * fd.abs().max())
    errors = ((autograd - fd).abs() / scale).tolist()
    assert max(errors) <= 1e-6, dict(zip(result["params"], errors))


# ------------------------------------------------------------------------------------------------------ (b) masks
def test_no_gradient_reaches_the_actions_after_an_env_ended(task):
    """d loss / d action of an env is zero at every step after its return closed (the termination inside the window,
    the time limit) and nonzero up to it: rollout_window's mask, not the simulator, cuts it."""
    actor, critic, obs_rms = make_agent(task)
    loss, (states, _, _, dones, _), actions, _ = window(task, actor, critic, obs_rms)
    task.backward(loss)
    closed_at = first_done(dones)
    check_closing_steps(closed_at, track_x=states[:, :, 0])
    grads = torch.stack([a.grad[:, 0] for a in actions])  # (H, N)
    for i, k in enumerate(closed_at):
        assert (grads[k + 1 :, i] == 0).all(), (i, k, grads[:, i])
        assert (grads[: k + 1, i] != 0).all(), (i, k, grads[:, i])
    task.reset()


# ------------------------------------------------------------------------------------------------------ (d) eval
def two_windows(task, actor, critic, obs_rms, evaluate: bool):
    """Two training windows of the script (rollout_window, task.backward, the boundary resets of its loop) with an
    evaluation between them or not. Env 0 reaches its time limit in the second window (the restored episode clocks
    matter). Returns the second window's actor gradient and loss."""
    task.generator.manual_seed(7)
    episode = start_window(task)
    task.progress[0] = task.max_episode_length - H - 4
    torch.manual_seed(1)
    loss, *_ = dc.rollout_window(task, actor, critic, obs_rms, FrameStack(3), ARGS, episode)
    actor.zero_grad()
    task.backward(loss)
    dc.window_boundary(task, episode)  # the loop's boundary
    if evaluate:
        dc.evaluate(task, actor, obs_rms, SimpleNamespace(**vars(ARGS), capture_video=False))
    torch.manual_seed(2)
    loss, *_ = dc.rollout_window(task, actor, critic, obs_rms, FrameStack(3), ARGS, episode)
    actor.zero_grad()
    task.backward(loss)
    assert episode.ended[0]
    return torch.cat([p.grad.flatten() for p in actor.parameters()]), loss.item()


def test_gradient_after_an_evaluation_equals_the_one_without(task):
    """evaluate() runs 240 no-grad steps in the training scene and puts the batch back (snapshot / restore): the next
    window's loss and gradient are those of a run that skipped the evaluation. Measured: equal to the last bit."""
    actor, critic, obs_rms = make_agent(task)
    with_eval, loss_with = two_windows(task, actor, critic, obs_rms, evaluate=True)
    without, loss_without = two_windows(task, actor, critic, obs_rms, evaluate=False)
    assert without.norm() > 0
    assert loss_with == pytest.approx(loss_without, rel=1e-6)
    assert torch.allclose(with_eval, without, rtol=1e-5, atol=1e-6 * without.abs().max())
    task.reset()


# ------------------------------------------------------------------------------------------------------ (c) blow-up
@pytest.mark.parametrize("script", [dl, sd], ids=["dva_locomotion", "shac_diffrender"])
def test_aborted_window_restarts_every_ended_env_and_refills_its_frames(task, monkeypatch, script):
    """Genesis aborts a window ("... 'nan'") after env 1 left the track and env 2 hit its time limit, with env 3
    flagged as blown up. The script's abort path (reset_broken_envs -> window_boundary, as its loop calls it)
    restarts envs 1, 2 and 3, refills their frame stacks, logs the two finished episodes and drops the broken one;
    env 0 goes on untouched, and the next window trains with a finite gradient. shac_diffrender.py's frames come
    from its torch renderer (an extra argument of its functions)."""
    args = SimpleNamespace(**{**vars(ARGS), "obs": "pixels", "recompute_renderer": False})
    renderer = (task.torch_renderer(),) if script is sd else ()

    @torch.no_grad()
    def render():
        return sd.render(task, *renderer) if renderer else task.render()

    torch.manual_seed(0)
    actor = script.Actor((3 * args.frame_stack, *task.image_size), task.act_dim, (32, 32))
    _, critic, obs_rms = make_agent(task)
    opt = torch.optim.Adam(actor.parameters(), lr=1e-3)
    episode = start_window(task)
    frames = FrameStack(args.frame_stack)
    frames.reset(render())

    abort_at = TRUNCATE_AFTER + 2  # the step at which Genesis raises: after both ends
    blown_up = torch.tensor([False, False, False, True])
    state = {"steps": 0, "aborted": False}
    real_step, real_mask = task.scene.step, task.rigid.get_error_envs_mask

    def step(*a, **kw):
        if state["steps"] == abort_at:
            state["aborted"] = True
            raise RuntimeError("Simulation became unstable, causing 'nan' in the state")
        state["steps"] += 1
        return real_step(*a, **kw)

    monkeypatch.setattr(task.scene, "step", step)
    monkeypatch.setattr(task.rigid, "get_error_envs_mask", lambda: blown_up.clone() if state["aborted"]
                        else real_mask())
    with pytest.raises(SimulationBlowUp, match="nan"):  # Genesis's NaN stop reaches the script as the task's type
        script.rollout_window(task, *renderer, actor, critic, obs_rms, frames, args, episode)
    assert episode.ended.tolist() == [False, True, True, False]
    length_1 = episode.lengths[1].item()
    qpos, frames_0 = task.qpos.detach().clone(), frames.frames[0].detach().clone()

    env_ids, finished = script.reset_broken_envs(task, *renderer, episode, frames)
    monkeypatch.undo()
    assert env_ids.tolist() == [1, 2, 3]
    assert task.progress.tolist() == [abort_at, 0, 0, 0]
    assert torch.equal(task.qpos[0], qpos[0]) and torch.equal(frames.frames[0], frames_0)
    image = render().permute(0, 3, 1, 2)
    for i in (1, 2, 3):  # a new start (env 1: back on the track), a stack of its first frame
        assert not torch.equal(task.qpos[i], qpos[i]) and task.qpos[i, 0].abs() < task.track_limit
        assert torch.equal(frames.frames[i], image[i].repeat(args.frame_stack, 1, 1)), f"env {i}: not refilled"
    assert [length for _, length in finished] == [length_1, TRUNCATE_AFTER]
    assert not episode.ended.any() and episode.lengths.tolist() == [abort_at, 0, 0, 0]

    before = torch.cat([p.detach().flatten() for p in actor.parameters()])
    args.horizon = 4
    loss, *_ = script.rollout_window(task, *renderer, actor, critic, obs_rms, frames, args, episode)
    grad_norm, skipped = script.actor_update(task, actor, opt, loss, 1.0)
    after = torch.cat([p.detach().flatten() for p in actor.parameters()])
    assert not skipped and 0 < grad_norm < float("inf")
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    task.reset()


def test_training_loop_recovers_from_an_aborted_window(tmp_path, monkeypatch):
    """dva_locomotion.py's own loop (hopper, state, 3 envs, H = 4) with a fault injected into the task's step: env 1
    terminates at the first step of iteration 2, Genesis aborts that window at its third step with env 0 blown up.
    The window is skipped and counted in charts/nan_skips, envs 0 and 1 start the next window at step 0 while env 2
    goes on, env 1's episode is logged once (5 steps), and training ends with finite parameters.

    Counting the step calls (the first is the warm-up step of the task's constructor, then 4 per window): call 6,
    the first step of iteration 2, ends env 1 (it reports a termination); call 8 raises as Genesis does when a
    simulation blows up ("... 'nan'"), with env 0's state non-finite; at call 9, the first step of the window after
    the aborted one, the envs' episode clocks are recorded."""
    from common.locomotion import LocomotionTask

    end_call, abort_call = 6, 8
    real_step, calls, seen = LocomotionTask.step, [0], {}

    def step(self, actions):
        calls[0] += 1
        if calls[0] == abort_call:
            self.finite = self.finite.clone()
            self.finite[0] = False
            raise SimulationBlowUp("Simulation became unstable, causing 'nan' in the state (injected)")
        if calls[0] == abort_call + 1:
            seen["progress_after_abort"] = self.progress.tolist()
        reward, terminated, truncated = real_step(self, actions)
        if calls[0] == end_call:
            terminated = terminated.clone()
            terminated[1] = True
            truncated = truncated & ~terminated
        return reward, terminated, truncated

    monkeypatch.setattr(LocomotionTask, "step", step)
    out = run_here("dva_locomotion.py", ["--task", "hopper", "--obs", "state", "--num-envs", "3", "--horizon", "4",
                                         "--max-iters", "3", "--eval-every", "0", "--eval-steps", "2", "--log-every",
                                         "1", "--actor-hidden", "16", "--critic-hidden", "16"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "the simulation blew up, window skipped (1 so far)" in out.stdout
    assert seen["progress_after_abort"] == [0, 0, 6], seen  # env 2: 4 + 2 steps, it did not end
    run_dir = next((tmp_path / "runs").iterdir())
    acc = scalars(run_dir)
    assert [e.value for e in acc.Scalars("charts/nan_skips")][-1] == 1
    assert [e.value for e in acc.Scalars("charts/episodic_length")][:1] == [5]
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert checkpoint["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint["actor"].values())
    assert re.search(r"iter 3/3", out.stdout)
