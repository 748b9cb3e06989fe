"""drqv2.py: the random shift and the replay's n-step returns by hand, the update's gradient routing, and the script
end to end as a user runs it (tags, checkpoint, resume, eval-only, bad input)."""

import copy
import re

import pytest
import torch

import drqv2
from script_helpers import assert_clock_went_on, assert_one_clear_error, run_here, run_script, scalars, stop_clock_at

TINY = ["--num-envs", "2", "--image-size", "32", "--image-width", "64", "--batch-size", "8", "--buffer-size", "600",
        "--hidden-dim", "32", "--log-every", "1"]
TAGS = ["charts/SPS", "charts/eval_return", "charts/eval_success", "charts/wall_minutes", "charts/exploration_std",
        "losses/critic_loss", "losses/actor_loss", "losses/critic_q1", "losses/critic_target_q", "time/env_s",
        "time/sample_s", "time/update_s", "time/iteration_s"]
CHECKPOINT_KEYS = ("encoder", "actor", "critic", "critic_target", "encoder_opt", "actor_opt", "critic_opt",
                   "iteration", "global_step", "agent_steps", "num_updates", "rng", "task_rng", "args")


def run(args, cwd, timeout=600):
    return run_script("drqv2.py", args, cwd, timeout)


def run_in_process(args, cwd, timeout=600, episode_length=None):
    return run_here("drqv2.py", args, cwd, timeout, episode_length)


# ------------------------------------------------------------------------------------------------------ augmentation
def test_random_shift_zero_is_identity_and_a_shift_moves_content_exactly():
    torch.manual_seed(0)
    aug = drqv2.RandomShift(pad=4)
    x = torch.randint(0, 256, (3, 9, 32, 64), dtype=torch.uint8)
    assert torch.equal(aug(x, torch.zeros(3, 2, dtype=torch.long)), x)
    assert torch.equal(aug(x.float(), torch.zeros(3, 2, dtype=torch.long)), x.float())

    # (dy, dx) = (2, -3): content moves 2 px down and 3 px left; the uncovered border repeats the edge (replicate).
    out = aug(x, torch.tensor([[2, -3]] * 3))
    assert torch.equal(out[:, :, 2:, :-3], x[:, :, :-2, 3:])
    assert torch.equal(out[:, :, :2, :-3], x[:, :, :1, 3:].expand(-1, -1, 2, -1))
    assert torch.equal(out[:, :, 2:, -3:], x[:, :, :-2, -1:].expand(-1, -1, -1, 3))
    dot = torch.zeros(1, 3, 32, 64, dtype=torch.uint8)
    dot[0, :, 10, 20] = 255
    moved = aug(dot, torch.tensor([[-4, 4]]))
    assert moved.nonzero()[:, 2:].unique(dim=0).tolist() == [[6, 24]]

    # Random shifts: each sample is one of the (2 pad + 1)^2 shifted images, and both extremes occur.
    x = torch.randint(0, 256, (400, 3, 16, 16), dtype=torch.uint8)
    out = aug(x)
    seen = set()
    for b in range(len(x)):
        hits = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                if torch.equal(out[b], aug(x[b : b + 1], torch.tensor([[dy, dx]]))[0])]
        assert len(hits) == 1
        seen.add(hits[0])
    assert (-4, -4) in seen and (4, 4) in seen and len(seen) > 60


# ------------------------------------------------------------------------------------------------------ n-step replay
def test_nstep_return_by_hand():
    g = 0.9
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    terminated = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    ended = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    ret, discount, steps = drqv2.nstep_return(rewards, terminated, ended, g)
    # full window; terminal after step 2; time limit after step 2 (bootstraps); terminal at once
    assert torch.allclose(ret, torch.tensor([1 + g * 2 + g * g * 3, 1 + g * 2, 1 + g * 2, 1.0]))
    assert torch.allclose(discount, torch.tensor([g**3, 0.0, g**2, 0.0]))
    assert steps.tolist() == [3, 2, 2, 1]


def _frame(ids):
    """Tiny frames (len(ids), 4, 4, 3) whose pixels all equal the frame's id."""
    return torch.tensor(ids, dtype=torch.uint8)[:, None, None, None].expand(-1, 4, 4, 3)


def test_replay_buffer_nstep_windows_by_hand():
    """One hand-made stream, written for two envs (env 1: ids + 100, rewards negated), with gamma 0.5, n 3, 2 frames:

    abs slot  0   1   2   3   4   5   6   7   8   9   10
    frame     10  11  12  13  20  21  22  30  31  32  33      (13, 22: an episode's final frame, never acted from)
    reward    1   2   4   -   8   16  -   32  64  128
    flags             trunc       term
    The ring has 8 slots: absolute slot a lives at a % 8.
    """
    buf = drqv2.ReplayBuffer(16, 2, (4, 4), 1, frame_stack=2, n_step=3, gamma=0.5, device=torch.device("cpu"))
    steps = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3])
    stream = {0: (1.0, 0, 0), 1: (2.0, 0, 0), 2: (4.0, 0, 1), 4: (8.0, 0, 0), 5: (16.0, 1, 1), 7: (32.0, 0, 0),
              8: (64.0, 0, 0), 9: (128.0, 0, 0)}
    ids = [10, 11, 12, 13, 20, 21, 22, 30, 31, 32, 33]

    def write(a):
        buf.add_frames(_frame([ids[a], ids[a] + 100]), steps[a].repeat(2))
        if a in stream:
            r, term, end = stream[a]
            buf.add_transitions(torch.full((2, 1), a / 10), torch.tensor([r, -r]), torch.tensor([term, term]).bool(),
                                torch.tensor([end, end]).bool())

    def check(a, ret, discount, obs_ids, next_ids):
        slot = torch.tensor([a % 8, a % 8])
        obs, action, r, d, next_obs = buf.gather(slot, torch.tensor([0, 1]))
        assert r.tolist() == [ret, -ret] and d.tolist() == [discount, discount], a
        assert action[:, 0].tolist() == pytest.approx([a / 10, a / 10])
        assert obs[:, ::3, 0, 0].tolist() == [obs_ids, [i + 100 for i in obs_ids]], a
        assert next_obs[:, ::3, 0, 0].tolist() == [next_ids, [i + 100 for i in next_ids]], a

    def valid_abs(count):
        valid = buf.valid_starts()
        assert torch.equal(valid[:, 0], valid[:, 1])
        return sorted(a for a in range(count) if valid[a % 8, 0] and a >= count - 8)

    for a in range(8):  # up to frame 30, before the ring wraps
        write(a)
    assert valid_abs(8) == [0, 1, 2, 4, 5]
    check(0, 1 + 0.5 * 2 + 0.25 * 4, 0.125, [10, 10], [12, 13])  # 3 steps, the last ends by time limit: bootstrap
    check(1, 2 + 0.5 * 4, 0.25, [10, 11], [12, 13])  # stops at the time limit after 2 steps
    check(2, 4.0, 0.5, [11, 12], [12, 13])
    check(4, 8 + 0.5 * 16, 0.0, [20, 20], [21, 22])  # terminal: no bootstrap; the stack repeats the first frame
    check(5, 16.0, 0.0, [20, 21], [21, 22])

    for a in range(8, 10):  # wraps: slots 0 and 1 now hold absolute 8 and 9
        write(a)
    assert valid_abs(10) == [4, 5]  # 2's stack needs 1 (overwritten); 7 and 8 lack their third step
    write(10)
    assert valid_abs(11) == [4, 5, 7]
    check(7, 32 + 0.5 * 64 + 0.25 * 128, 0.125, [30, 30], [32, 33])

    # A uniform sample draws only valid starts.
    torch.manual_seed(0)
    obs, _, ret, _, _ = buf.sample(64, buf.valid_starts())
    assert set(obs[:, 3, 0, 0].tolist()) == {20, 21, 30, 120, 121, 130}
    assert set(ret.tolist()) <= {16.0, 96.0, -16.0, -96.0}


def test_updates_route_gradients_as_drqv2():
    """The critic loss trains encoder + critic (not the actor); the actor loss trains only the actor."""
    torch.manual_seed(0)
    args = drqv2.Args(hidden_dim=16, feature_dim=8)
    encoder = drqv2.Encoder((6, 16, 16))
    actor, critic = (cls(encoder.repr_dim, 2, 8, 16) for cls in (drqv2.Actor, drqv2.Critic))
    target = copy.deepcopy(critic).requires_grad_(False)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (encoder, actor, critic)]
    obs = torch.randint(0, 256, (4, 6, 16, 16), dtype=torch.uint8)
    batch = (obs, torch.rand(4, 2) * 2 - 1, torch.rand(4), torch.full((4,), 0.9), obs.flip(0))

    def snapshot():
        return [torch.cat([p.detach().flatten().clone() for p in m.parameters()]) for m in (encoder, actor, critic)]

    before = snapshot()
    metrics, features = drqv2.update_critic(encoder, critic, target, actor, opts[0], opts[2], *batch, 0.5, args)
    after = snapshot()
    assert not features.requires_grad and {"losses/critic_loss", "losses/critic_q1"} <= set(metrics)
    assert not torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert not torch.equal(before[2], after[2])
    metrics = drqv2.update_actor(actor, critic, opts[1], features, 0.5, args)
    final = snapshot()
    assert "losses/actor_loss" in metrics
    assert torch.equal(after[0], final[0]) and torch.equal(after[2], final[2]) and not torch.equal(after[1], final[1])
    t_before, c = next(target.parameters()).detach().clone(), next(critic.parameters()).detach()
    assert not torch.allclose(t_before, c)
    drqv2.soft_update(target, critic, 0.01)  # tau of the way toward the critic: 0.99 target + 0.01 critic
    assert torch.allclose(next(target.parameters()), 0.99 * t_before + 0.01 * c, atol=1e-7)


def test_exploration_std_schedule():
    args = drqv2.finalize_args(drqv2.Args(std_schedule_steps=1000))
    assert [drqv2.exploration_std(args, s) for s in (0, 500, 1000, 5000)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    assert (args.num_envs, args.updates_per_step, args.feature_dim) == (16, 8, 50)
    args = drqv2.finalize_args(drqv2.Args(task="humanoid"))
    assert (args.num_envs, args.updates_per_step, args.feature_dim) == (32, 16, 100)


# ------------------------------------------------------------------------------------------------------ the script
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2 iterations that update at once (no seed steps, 1-step returns), evaluating and saving each, with video."""
    cwd = tmp_path_factory.mktemp("smoke")
    out = run_in_process([*TINY, "--max-iters", "2", "--seed-steps", "0", "--n-step", "1", "--updates-per-step", "2",
               "--eval-every", "1", "--save-every", "1", "--capture-video"], cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return cwd, run_dir, out


def test_smoke_run_writes_tags_checkpoint_and_video(trained):
    cwd, run_dir, out = trained
    acc = scalars(run_dir)
    missing = [t for t in TAGS if t not in acc.Tags()["scalars"]]
    assert not missing, missing
    assert len(acc.Scalars("losses/critic_loss")) == 2 and len(acc.Scalars("charts/eval_return")) == 2
    assert "videos/eval" in acc.Tags()["images"]
    assert (run_dir / "eval_000002.mp4").stat().st_size > 1000
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert all(key in ckpt for key in CHECKPOINT_KEYS), set(CHECKPOINT_KEYS) - set(ckpt)
    assert ckpt["iteration"] == 2 and ckpt["global_step"] == 2 * 2 * 2 and ckpt["agent_steps"] == 4
    assert ckpt["num_updates"] == 4
    assert re.search(r"iter 2/2 +return", out.stdout)


def test_resume_continues_the_count_and_eval_only_loads(trained):
    cwd, run_dir, _ = trained
    ckpt = run_dir / "checkpoint.pt"
    step = stop_clock_at(ckpt)
    before = torch.load(ckpt, weights_only=False)
    # 3-step returns, the buffer refilled by 8 agent steps of the loaded policy, then 1 update per step; episodes of
    # 20 sim steps here (10 agent steps): past iteration 12 every env has finished one. The other settings (2 envs,
    # batch 8, ...) are the saved ones, not given again.
    flags = ["--max-iters", "14", "--n-step", "3", "--seed-steps", "8", "--updates-per-step", "1", "--eval-every", "0"]
    out = run_in_process([*flags, "--resume", str(ckpt)], cwd, episode_length=20)
    assert out.returncode == 0, out.stderr[-3000:]
    after = torch.load(ckpt, weights_only=False)
    assert after["args"] == {**before["args"], "max_iters": 14, "n_step": 3, "seed_steps": 8, "updates_per_step": 1,
                             "eval_every": 0, "resume": str(ckpt)}
    assert after["iteration"] == 14 and after["global_step"] == 14 * 2 * 2 and after["agent_steps"] == 28
    assert after["num_updates"] == 4 + (14 - 2) - 3  # none in the first 3 of the 4 refill iterations (8 steps)
    assert not torch.equal(after["actor"]["policy.4.weight"], before["actor"]["policy.4.weight"])
    assert "iter 3/14" in out.stdout and "iter 1/" not in out.stdout
    assert_clock_went_on(run_dir, ckpt, step)
    acc = scalars(run_dir)
    lengths = [e.value for e in acc.Scalars("charts/episodic_length")]
    assert lengths and max(lengths) <= 20 and len(acc.Scalars("charts/episodic_return")) == len(lengths)

    out = run_in_process(["--eval-only", str(ckpt)], cwd, episode_length=20)  # with the saved settings
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval over 2 episodes" in out.stdout
    match = re.search(r"mean return (-?[\d.]+), success ([\d.]+)", out.stdout)
    assert match and -1e5 < float(match.group(1)) < 200  # at most 10 per step
    assert (run_dir / "eval_only.mp4").stat().st_size > 1000


@pytest.mark.parametrize("flags, words", [
    (["--num-envs", "0"], "--num-envs"),
    (["--resume", "no/such/checkpoint.pt"], "--resume"),
])
def test_bad_input_fails_with_one_clear_line(tmp_path, flags, words):
    assert_one_clear_error(run(flags, tmp_path, timeout=120), tmp_path, words)
