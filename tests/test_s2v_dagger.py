"""s2v_dagger.py: the DAgger labels, stage 1 + stage 2 end to end, resume, eval-only and bad input."""

import pytest
import torch

import s2v_dagger as s2v
from common.utils import Episodes
from script_helpers import (assert_authors_pixel_init, assert_clock_went_on, assert_one_clear_error, run_here,
                            run_script, scalars, stop_clock_at)

TINY = ["--num-envs", "2", "--segment-length", "4", "--image-size", "32", "--image-width", "64", "--batch-size", "4",
        "--max-updates", "3", "--log-every", "1"]


def run(args, cwd, timeout=600):
    return run_script("s2v_dagger.py", args, cwd, timeout)


def run_in_process(args, cwd, timeout=600):
    return run_here("s2v_dagger.py", args, cwd, timeout)


class Constant(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, obs):
        return torch.full((len(obs), 1), self.value)


@pytest.mark.parametrize("expert_drives", [False, True])
def test_labels_are_the_experts_actions_on_the_visited_states(task, expert_drives):
    """Replaying the segment by hand, with the policy that should have driven, visits the same states, and the expert
    applied to them gives the stored labels; frames are those rendered at those states."""
    from common.utils import FrameStack

    torch.manual_seed(0)
    linear = torch.nn.Linear(task.critic_obs_dim, 1)

    def expert(state):  # gentle enough that no cart leaves the track within the segment (no resets to replay)
        return 0.3 * torch.tanh(linear(state))

    student = Constant(0.3)
    n, steps = task.num_envs, 20
    qpos0 = torch.tensor([[0.1, -3.0], [-0.2, -2.5], [0.0, 0.4], [0.3, 3.1]])[:n]
    qvel0 = torch.tensor([[0.5, 1.0], [0.0, -2.0], [-0.3, 0.0], [0.1, 0.2]])[:n]
    episode = Episodes.zeros(n)

    task.set_state(qpos0, qvel0)
    frames = FrameStack(1)
    with torch.no_grad():
        frames.reset(task.render())
    drives = torch.full((n,), expert_drives)
    seen, labels, finished = s2v.collect_segment(task, student, expert, frames, steps, drives, episode)
    assert seen.shape == (steps * n, 3, 32, 64) and labels.shape == (steps * n, 1)

    task.set_state(qpos0, qvel0)
    expected_labels, expected_frames = [], []
    with torch.no_grad():
        for _ in range(steps):
            state = task.critic_obs()
            expected_labels.append(expert(state))
            expected_frames.append(task.render().permute(0, 3, 1, 2))
            task.step(expert(state) if expert_drives else torch.full((n, 1), 0.3))
    assert torch.equal(labels, torch.cat(expected_labels))
    assert torch.equal(seen, torch.cat(expected_frames))
    assert labels.std() > 0.05  # the states differ, so a wrong driver would give other labels
    assert episode.lengths.tolist() == [steps] * n and not finished
    task.reset()  # leave the shared scene at a fresh start (in grad mode) for the other tests


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Stage 1 (a 2-iteration state-SHAC expert) and 2 stage-2 iterations that evaluate and save each time."""
    cwd = tmp_path_factory.mktemp("s2v")
    out = run_in_process([*TINY, "--expert-envs", "2", "--expert-iters", "2", "--max-iters", "2", "--eval-every", "1",
                          "--save-every", "1", "--capture-video"], cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = next(p for p in (cwd / "runs").iterdir() if "__s2v_dagger__" in p.name)
    return cwd, run_dir, out


def test_two_stages_write_tags_checkpoint_and_video(trained):
    cwd, run_dir, out = trained
    assert "stage 1, the state expert:" in out.stdout and "stage 1 done" in out.stdout
    acc = scalars(run_dir)
    present = set(acc.Tags()["scalars"])
    for tag in ("charts/eval_return", "charts/eval_success", "charts/SPS", "charts/wall_minutes", "losses/bc_loss",
                "time/env_s", "time/update_s", "time/iteration_s"):
        assert tag in present, tag
    assert len(acc.Scalars("charts/eval_return")) == 2
    assert [e.value for e in acc.Scalars("charts/buffer_size")] == [8, 16]  # 2 envs x 4 steps per iteration
    # the first segment is the expert's (beta = 1), the second's beta is 0.5
    assert [e.value for e in acc.Scalars("charts/beta")] == [1.0, 0.5]
    assert (run_dir / "eval_000002.mp4").stat().st_size > 1000
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] == 2 and ckpt["global_step"] == 2 * 2 * 4
    expert = torch.load(ckpt["expert"], weights_only=False)
    assert expert["args"]["obs"] == "state" and expert["iteration"] == 2


def test_resume_continues_and_eval_only_loads(trained):
    cwd, run_dir, _ = trained
    ckpt = run_dir / "checkpoint.pt"
    step = stop_clock_at(ckpt)
    before = torch.load(ckpt, weights_only=False)
    # the saved settings (2 envs, 4-step segments, ...), not given again, except the flags given with --resume
    out = run_in_process(["--max-iters", "4", "--eval-every", "0", "--resume", str(ckpt)], cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stage 1" not in out.stdout and "iter 3/4" in out.stdout and "iter 1/" not in out.stdout
    after = torch.load(ckpt, weights_only=False)
    assert after["iteration"] == 4 and after["expert"] == before["expert"]
    assert after["global_step"] == 4 * 2 * 4
    assert after["args"] == {**before["args"], "max_iters": 4, "eval_every": 0, "resume": str(ckpt)}
    assert not torch.equal(after["student"]["mu.weight"], before["student"]["mu.weight"])
    assert_clock_went_on(run_dir, ckpt, step)

    out = run_in_process(["--eval-only", str(ckpt)], cwd)  # with the saved settings
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval over 2 episodes" in out.stdout
    assert "mean return" in out.stdout and (run_dir / "eval_only.mp4").exists()


def test_the_student_has_the_authors_initialisation():
    student = s2v.Student((9, 48, 48), 8, (128, 64, 32))
    assert_authors_pixel_init(student.encoder, student.trunk[0])


def test_a_given_experts_minutes_count_as_stage_1s(tmp_path, trained):
    """--expert-minutes 40: the wall clock starts at 40 and --max-minutes 30 includes them, so the run stops (and
    evaluates) after its first iteration."""
    expert = torch.load(trained[1] / "checkpoint.pt", weights_only=False)["expert"]
    out = run_in_process([*TINY, "--expert", expert, "--expert-minutes", "40", "--max-minutes", "30", "--max-iters",
                          "5", "--eval-every", "0", "--eval-steps", "3"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stage 1" not in out.stdout and "--max-minutes 30.0 reached" in out.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["iteration"] == 1
    minutes = [e.value for e in scalars(run_dir).Scalars("charts/wall_minutes")]
    assert len(minutes) == 1 and 40 <= minutes[0] < 45
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert_one_clear_error(run_in_process(["--expert-minutes", "5"], elsewhere), elsewhere,
                           "--expert-minutes counts a given expert's training: it needs --expert")


def test_bad_input_gives_one_clear_error(tmp_path, trained):
    assert_one_clear_error(run(["--num-envs", "0"], tmp_path), tmp_path, "--num-envs must be >= 1")
    assert_one_clear_error(run_in_process(["--expert", "missing.pt"], tmp_path), tmp_path,
                           "--expert: no checkpoint file")
    # a cart-pole expert cannot teach a hopper: refused before any scene is built
    expert = torch.load(trained[1] / "checkpoint.pt", weights_only=False)["expert"]
    assert_one_clear_error(run_in_process(["--task", "hopper", "--expert", expert], tmp_path), tmp_path,
                           "was trained on cartpole, not --task hopper")
