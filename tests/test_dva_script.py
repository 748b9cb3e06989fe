"""dva_cartpole.py end to end, as a user runs it: logging, checkpoints, resume, eval-only, bad input, learning."""

import re
import subprocess

import pytest
import torch
from dva_cartpole import linear_lr
from script_helpers import (assert_clock_went_on, assert_one_clear_error, failed_cleanly, run_here, run_script, scalars,
                            stop_clock_at)

TINY = ["--num-envs", "2", "--horizon", "4", "--image-size", "32", "--image-width", "64", "--log-every", "1"]
TAGS = ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/eval_return", "charts/eval_success",
        "losses/actor_loss", "losses/critic_loss", "grads/actor_grad_norm", "time/render_s", "time/forward_s",
        "time/backward_s", "time/critic_s", "time/iteration_s"]


def run(args, cwd, timeout=600, env=None):
    return run_script("dva_cartpole.py", args, cwd, timeout, env)


def run_in_process(args, cwd, timeout=600, episode_length=None):
    return run_here("dva_cartpole.py", args, cwd, timeout, episode_length)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-iteration run with tiny settings (2 envs, H = 4) that evaluates and saves every iteration, with video."""
    cwd = tmp_path_factory.mktemp("smoke")
    out = run_in_process([*TINY, "--max-iters", "2", "--eval-every", "1", "--save-every", "1", "--capture-video"], cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return cwd, run_dir, out


def test_smoke_run_writes_tags_checkpoint_and_video(trained):
    cwd, run_dir, out = trained
    acc = scalars(run_dir)
    present = set(acc.Tags()["scalars"])
    # Episodes are 240 steps: a 2 x 4-step run ends none unless the cart leaves the track, so the episodic tags
    # are checked in the resume test below, which runs past an episode's end.
    missing = [t for t in TAGS if t not in present and not t.startswith("charts/episodic")]
    assert not missing, missing
    assert "videos/eval" in acc.Tags()["images"]
    assert len(acc.Scalars("charts/eval_return")) == 2
    assert (run_dir / "eval_000002.mp4").stat().st_size > 1000
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] == 2 and ckpt["global_step"] == 2 * 2 * 4
    for key in ("actor", "critic", "target_critic", "obs_rms", "actor_opt", "critic_opt", "rng", "task_rng"):
        assert key in ckpt
    evals = [e.value for e in acc.Scalars("charts/eval_return")]  # best.pt: the best evaluation's checkpoint
    best = torch.load(run_dir / "best.pt", weights_only=False)
    assert best["iteration"] == 1 + evals.index(max(evals)) and best["best_return"] == pytest.approx(max(evals))
    assert re.search(r"iter 2/2 +return", out.stdout)


def test_resume_continues_the_count_and_eval_only_loads(trained):
    cwd, run_dir, _ = trained
    ckpt = run_dir / "checkpoint.pt"
    step = stop_clock_at(ckpt)
    before = torch.load(ckpt, weights_only=False)
    # Episodes of 20 steps here: 8 more iterations x 4 steps end one in every env, so episodic tags appear. The
    # resumed run draws its frames with the torch ray caster (the renderer is not part of the checkpoint's shapes).
    out = run_in_process([*TINY, "--max-iters", "10", "--eval-every", "0", "--renderer", "torch", "--resume",
                          str(ckpt)], cwd, episode_length=20)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "renderer torch" in out.stdout
    after = torch.load(ckpt, weights_only=False)
    assert after["iteration"] == 10 and after["global_step"] == 10 * 2 * 4
    assert not torch.equal(after["actor"]["mu.weight"], before["actor"]["mu.weight"])
    assert "iter 3/10" in out.stdout and "iter 1/" not in out.stdout
    assert_clock_went_on(run_dir, ckpt, step)
    acc = scalars(run_dir)
    assert set(TAGS) <= set(acc.Tags()["scalars"])
    lengths = [e.value for e in acc.Scalars("charts/episodic_length")]
    assert lengths and max(lengths) <= 20

    out = run_in_process([*TINY, "--eval-only", str(ckpt)], cwd, episode_length=20)
    assert out.returncode == 0, out.stderr[-3000:]
    match = re.search(r"mean return (-?[\d.]+)", out.stdout)
    assert match and -1e5 < float(match.group(1)) < 200  # at most 10 per step
    assert (run_dir / "eval_only.mp4").stat().st_size > 1000


def test_resume_keeps_the_saved_settings_unless_a_flag_is_given(tmp_path):
    """A resumed --obs state run trains on with its saved settings (not a bare command line's defaults: 64 envs,
    H = 32, the pixel learning rates, 4000 iterations), and a flag given with --resume changes its setting."""
    out = run_in_process(["--obs", "state", "--num-envs", "2", "--horizon", "4", "--actor-lr", "3e-3", "--max-iters",
                          "4", "--eval-every", "0"], tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (first,) = (tmp_path / "runs").iterdir()
    stopped = torch.load(first / "checkpoint.pt", weights_only=False)
    stopped["iteration"], stopped["global_step"] = 2, 2 * 2 * 4  # as if stopped (Ctrl-C) after iteration 2
    saved = stopped["args"]
    assert (saved["actor_lr"], saved["critic_lr"], saved["max_iters"]) == (3e-3, 1e-3, 4)  # 1e-3: state's default

    def resume(name, flags):
        """Resume the stopped run in a folder of its own; returns the new checkpoint and the resumed iterations'
        learning rates."""
        ckpt = tmp_path / name / "checkpoint.pt"
        ckpt.parent.mkdir()
        torch.save(stopped, ckpt)
        try:
            out = run_in_process([*flags, "--resume", str(ckpt)], tmp_path, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name}: the resumed run did not stop at 2 envs x H 4 x 4 or 6 iterations")
        assert out.returncode == 0, out.stderr[-3000:]
        after = torch.load(ckpt, weights_only=False)
        assert after["args"]["resume"] == str(ckpt)
        return after, [e.value for e in scalars(ckpt.parent).Scalars("charts/learning_rate")]

    # A flag given on purpose: 4 more iterations, the saved lr now decaying over 6; every other setting as saved.
    after, lrs = resume("longer", ["--max-iters", "6"])
    assert after["args"] == {**saved, "max_iters": 6, "resume": after["args"]["resume"]}
    assert after["iteration"] == 6 and after["global_step"] == 6 * 2 * 4
    assert lrs == pytest.approx([linear_lr(3e-3, 1e-5, i - 1, 6) for i in (3, 4, 5, 6)], rel=1e-6)

    # No flag: iterations 3 and 4 of the saved run, exactly as saved.
    after, lrs = resume("as_saved", [])
    assert after["args"] == {**saved, "resume": after["args"]["resume"]}
    assert after["iteration"] == 4 and after["global_step"] == 4 * 2 * 4
    assert lrs == pytest.approx([linear_lr(3e-3, 1e-5, i - 1, 4) for i in (3, 4)], rel=1e-6)


@pytest.mark.parametrize("flags, words", [
    (["--resume", "no/such/checkpoint.pt"], "--resume"),
    # Genesis's Rasterizer aborts the process on widths that are not a multiple of 4: refused up front
    (["--renderer", "rasterizer", "--image-size", "32", "--image-width", "70"], "not a multiple of 4"),
])
def test_bad_input_fails_with_one_clear_line(tmp_path, flags, words):
    assert_one_clear_error(run(flags, tmp_path, timeout=120), tmp_path, words)


def test_state_shac_learns_swing_up(tmp_path):
    """Learning, not just running: state SHAC swings the pole up within 250 iterations (about 3 minutes here;
    measured 1824 / success 1.00 with seed 1). A policy that does nothing scores about 30; balancing from the start
    would score 2400; the bound is 90 % of the 500-iteration reference, 1821. In Genesis's performance mode, as a
    user runs it (one scene size: its compilation pays)."""
    out = run(["--obs", "state", "--num-envs", "32", "--max-iters", "250", "--eval-every", "0"], tmp_path,
              env={"DVA_PERFORMANCE_MODE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    ret, success = map(float, re.findall(r"return (-?[\d.]+), success ([\d.]+)", out.stdout)[-1])
    assert ret > 1639 and success >= 0.9, out.stdout[-2000:]


def test_unreadable_checkpoint_fails_with_one_clear_line(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    lines = failed_cleanly(run_in_process(["--eval-only", str(bad)], tmp_path, timeout=300), tmp_path)
    assert lines[-1].startswith("error: cannot read the checkpoint"), lines[-5:]
