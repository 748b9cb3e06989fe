"""curl.py: the contrastive loss, the crops and the replay buffer checked exactly; end to end as a user runs it."""

import re
from copy import deepcopy

import pytest
import torch

import curl  # the script (conftest puts the repository on sys.path); __main__ is guarded
from script_helpers import assert_clock_went_on, assert_one_clear_error, run_here, run_script, scalars, stop_clock_at

TINY = ["--num-envs", "2", "--image-size", "32", "--image-width", "64", "--batch-size", "8", "--seed-steps", "0",
        "--buffer-size", "400", "--log-every", "1"]
TAGS = ["losses/critic_loss", "losses/actor_loss", "losses/alpha_loss", "losses/curl_loss", "charts/alpha",
        "charts/SPS", "charts/wall_minutes", "charts/eval_return", "charts/eval_success", "time/env_s",
        "time/update_s", "time/iteration_s"]


def run(args, cwd, timeout=600):
    return run_script("curl.py", args, cwd, timeout)


def run_in_process(args, cwd, timeout=600, episode_length=None):
    return run_here("curl.py", args, cwd, timeout, episode_length)


def small_args(**overrides):
    return curl.finalize_args(curl.Args(image_size=16, feature_dim=8, hidden_dim=16, batch_size=6, **overrides))


# ------------------------------------------------------------------------------------------------ contrastive loss
def test_logits_are_bilinear_row_shifted_and_the_labels_are_the_diagonal():
    torch.manual_seed(0)
    z_anchor, z_positive, W = torch.randn(5, 4), torch.randn(5, 4), torch.randn(4, 4)
    logits = curl.curl_logits(z_anchor, z_positive, W)
    assert logits.shape == (5, 5)
    raw = torch.tensor([[float(z_anchor[i] @ W @ z_positive[j]) for j in range(5)] for i in range(5)])
    assert torch.allclose(logits, raw - raw.max(1, keepdim=True).values, atol=1e-5)
    assert torch.equal(logits.max(1).values, torch.zeros(5))
    # cross-entropy with the positive of row i in column i, by hand
    by_hand = torch.stack([torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(5)]).mean()
    assert torch.allclose(curl.info_nce_loss(logits), by_hand, atol=1e-6)
    # moving the positives to another column changes the loss: the labels are arange(B), nothing else
    assert not torch.allclose(curl.info_nce_loss(logits.roll(1, dims=1)), by_hand)


def test_identical_query_and_key_encoders_with_identity_W_rank_the_positive_first():
    """At initialisation the trunk's LayerNorm (weight 1, bias 0) gives every embedding the same norm, sqrt(D) up to
    its eps, so with W = I and key encoder = query encoder, Cauchy-Schwarz makes q_i . k_i = |q_i|^2 the largest
    logit of row i for distinct images: after the row shift the diagonal is exactly 0 and the rest negative."""
    torch.manual_seed(0)
    critic = curl.Critic((9, 16, 16), 1, feature_dim=8, hidden_dim=16)
    critic.apply(curl.weight_init)
    key_critic = deepcopy(critic)
    images = torch.randint(0, 256, (6, 9, 16, 16), dtype=torch.uint8)
    anchor, positive = curl.random_crop(images, (16, 16)), curl.random_crop(images, (16, 16))  # margin 0: the same
    with torch.no_grad():
        logits = curl.curl_logits(critic.embed(anchor), key_critic.embed(positive), torch.eye(8))
    assert torch.equal(logits.diagonal(), torch.zeros(6))
    assert (logits[~torch.eye(6, dtype=torch.bool)] < 0).all()
    assert curl.info_nce_loss(logits) < torch.log(torch.tensor(6.0))


def test_curl_update_trains_query_encoder_and_W_but_not_the_key_encoder():
    torch.manual_seed(0)
    agent = curl.CurlSacAgent((9, 16, 16), 1, small_args(), torch.device("cpu"))
    before = deepcopy(agent.state_dict())
    images = torch.randint(0, 256, (6, 9, 16, 16), dtype=torch.uint8)
    metrics = agent.update_curl(images, images.flip(-1))
    after = agent.state_dict()
    assert metrics["losses/curl_loss"] > 0
    assert not torch.equal(before["curl_W"], after["curl_W"])
    for name in ("encoder.convs.0.weight", "trunk.0.weight"):
        assert not torch.equal(before["critic"][name], after["critic"][name])
    for key in ("critic_target", "actor"):
        for name, value in before[key].items():
            assert torch.equal(value, after[key][name]), (key, name)
    assert torch.equal(before["critic"]["q1.0.weight"], after["critic"]["q1.0.weight"])


# ------------------------------------------------------------------------------------------------ crops
def test_random_crop_with_margin_0_is_the_identity_and_centre_crop_takes_the_middle():
    x = torch.randint(0, 256, (4, 9, 10, 12), dtype=torch.uint8)
    assert torch.equal(curl.random_crop(x, (10, 12)), x)
    assert torch.equal(curl.center_crop(x, (10, 12)), x)
    y = torch.arange(2 * 3 * 10 * 9).reshape(2, 3, 10, 9)
    # top = (10 - 6) // 2 = 2, left = (9 - 4) // 2 = 2
    assert torch.equal(curl.center_crop(y, (6, 4)), y[:, :, 2:8, 2:6])
    assert curl.center_crop(y, (6, 4))[0, 0, 0, 0] == 2 * 9 + 2


def test_random_crop_is_one_window_per_sample_with_offsets_in_range():
    torch.manual_seed(0)
    x = torch.arange(64 * 6 * 12 * 14).reshape(64, 6, 12, 14)
    crops = curl.random_crop(x, (8, 8))
    offsets = set()
    for b in range(64):
        # the values encode positions: the top-left pixel of channel 0 gives the window, the same for every channel
        top, left = divmod(int(crops[b, 0, 0, 0] - x[b, 0, 0, 0]), 14)
        assert 0 <= top <= 4 and 0 <= left <= 6
        assert torch.equal(crops[b], x[b, :, top : top + 8, left : left + 8])
        offsets.add((top, left))
    assert len(offsets) > 20  # independent per sample


# ------------------------------------------------------------------------------------------------ replay buffer
def test_replay_buffer_rebuilds_stacks_and_next_observations_exactly():
    """Two envs with episodes of 4 and 5 steps, an evaluation-style restart of both, and a ring of 12 slots per env
    that wraps many times: every valid transition must match the reference log, and every transition whose frames
    are all still in the ring must be valid."""
    k, slots, n = 3, 12, 2
    buffer = curl.ReplayBuffer(slots * n, n, (3, 1, 1), 1, k, torch.device("cpu"))
    log = [[], []]  # per env, every slot written: dict(frame id, episode, step, reward or None, terminal)
    next_id, episode = [1, 1], [0, 0]

    def frame(e):
        value = next_id[e]
        next_id[e] += 1
        assert value < 256
        return value

    def add(env_ids, first):
        ids = [frame(e) for e in env_ids]
        images = torch.tensor(ids, dtype=torch.uint8)[:, None, None, None].expand(len(ids), 1, 1, 3)
        buffer.add_frames(images, torch.tensor(env_ids), first=first)
        for e, f in zip(env_ids, ids):
            if first:
                episode[e] += 1
            step = 0 if first else log[e][-1]["step"] + 1
            log[e].append(dict(id=f, episode=episode[e], step=step, reward=None, terminal=False))

    add([0, 1], first=True)
    for it in range(1, 61):
        rewards = torch.tensor([float(log[0][-1]["id"]), 1000.0 + log[1][-1]["id"]])
        ends = [log[0][-1]["step"] == 3, log[1][-1]["step"] == 4]
        terminal = torch.tensor([ends[0] and it % 2 == 0, False])
        buffer.add_action(torch.zeros(2, 1), rewards, terminal)
        for e in range(n):
            log[e][-1]["reward"], log[e][-1]["terminal"] = float(rewards[e]), bool(terminal[e])
        add([0, 1], first=False)
        if it == 33:  # an evaluation: both envs restart, the in-flight episodes are dropped
            add([0, 1], first=True)
        elif any(ends):
            add([e for e in range(n) if ends[e]], first=True)

    valid = buffer.valid()
    expected = 0
    for e in range(n):
        kept = log[e][-slots:]  # what the ring still holds, oldest first
        for j, entry in enumerate(kept[:-1]):
            nxt = kept[j + 1]
            history_kept = j >= min(entry["step"], k - 1)
            ok = entry["reward"] is not None and nxt["step"] == entry["step"] + 1 and history_kept
            t = [s for s in range(slots) if int(buffer.frames[s, e, 0, 0, 0]) == entry["id"] % 256][0]
            assert bool(valid[t, e]) == ok, (e, entry)
            if not ok:
                continue
            expected += 1
            same_episode = [x for x in kept if x["episode"] == entry["episode"]]
            by_step = {x["step"]: x["id"] for x in same_episode}
            want_obs = [by_step[max(entry["step"] - d, 0)] for d in (2, 1, 0)]
            want_next = [by_step[max(entry["step"] + 1 - d, 0)] for d in (2, 1, 0)]
            obs = buffer.stack(torch.tensor([t]), torch.tensor([e]))[0, ::3, 0, 0].tolist()
            nxt_obs = buffer.stack(torch.tensor([(t + 1) % slots]), torch.tensor([e]))[0, ::3, 0, 0].tolist()
            assert obs == want_obs and nxt_obs == want_next, (e, entry, obs, nxt_obs)
            assert float(buffer.rewards[t, e]) == entry["reward"] and bool(buffer.terminal[t, e]) == entry["terminal"]
    assert len(buffer) == expected > 10

    obs, action, reward, not_done, next_obs = buffer.sample(64)
    assert obs.shape == next_obs.shape == (64, 9, 1, 1) and action.shape == (64, 1)
    for b in range(64):  # the newest frame of obs gives the transition: reward and next frame must match it
        env = 0 if reward[b] < 1000 else 1
        entry = [x for x in log[env] if x["id"] == int(obs[b, 6, 0, 0])][-1]
        assert reward[b] == entry["reward"] and not_done[b] == (not entry["terminal"])
        assert int(next_obs[b, 6, 0, 0]) == entry["id"] + 1 and torch.equal(next_obs[b, :6], obs[b, 3:])


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-iteration run, 8 updates after each step from the start (no seed steps), evaluating and saving every
    iteration, with video."""
    cwd = tmp_path_factory.mktemp("smoke")
    out = run_in_process([*TINY, "--max-iters", "2", "--eval-every", "1", "--save-every", "1", "--capture-video"],
                         cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return cwd, run_dir, out


def test_smoke_run_writes_tags_checkpoint_and_video(trained):
    cwd, run_dir, out = trained
    acc = scalars(run_dir)
    missing = [t for t in TAGS if t not in acc.Tags()["scalars"]]
    assert not missing, missing
    assert len(acc.Scalars("charts/eval_return")) == 2
    assert (run_dir / "eval_000002.mp4").stat().st_size > 1000
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    for key in ("actor", "critic", "critic_target", "curl_W", "log_alpha", "actor_opt", "critic_opt", "alpha_opt",
                "curl_opt", "rng", "task_rng", "args"):
        assert key in ckpt, key
    assert ckpt["iteration"] == 2 and ckpt["global_step"] == 2 * 2 * 2  # iterations x envs x action repeat
    assert ckpt["num_updates"] == 2 * 8
    assert ckpt["args"]["crop_margin"] == 8  # 32 x 64 renders 40 x 72
    assert "renders 40x72 px, crops 32x64" in out.stdout
    assert re.search(r"iter 2/2 +return", out.stdout)


def test_resume_continues_the_count_and_eval_only_loads(trained):
    cwd, run_dir, _ = trained
    ckpt = run_dir / "checkpoint.pt"
    step = stop_clock_at(ckpt)
    before = torch.load(ckpt, weights_only=False)
    # Episodes of 16 steps here, action repeat 8: 2 iterations make one, so the episodic tags appear. The other
    # settings (2 envs, batch 8, ...) are the saved ones, not given again.
    out = run_in_process(["--max-iters", "6", "--action-repeat", "8", "--updates-per-step", "2", "--eval-every", "0",
                          "--resume", str(ckpt)], cwd, episode_length=16)
    assert out.returncode == 0, out.stderr[-3000:]
    after = torch.load(ckpt, weights_only=False)
    assert after["args"] == {**before["args"], "max_iters": 6, "action_repeat": 8, "updates_per_step": 2,
                             "eval_every": 0, "resume": str(ckpt)}
    assert after["iteration"] == 6 and after["global_step"] == 8 + 4 * 2 * 8
    assert after["num_updates"] == 16 + 4 * 2
    assert not torch.equal(after["actor"]["policy.0.weight"], before["actor"]["policy.0.weight"])
    assert "iter 3/6" in out.stdout and "iter 1/" not in out.stdout
    assert_clock_went_on(run_dir, ckpt, step)
    acc = scalars(run_dir)
    lengths = [e.value for e in acc.Scalars("charts/episodic_length")]
    assert lengths and max(lengths) <= 16

    out = run_in_process(["--eval-only", str(ckpt)], cwd, episode_length=16)  # with the saved settings
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval over 2 episodes" in out.stdout
    match = re.search(r"mean return (-?[\d.]+), success ([\d.]+)", out.stdout)
    assert match and -1e5 < float(match.group(1)) < 160  # at most 10 per step
    assert (run_dir / "eval_only.mp4").stat().st_size > 1000


@pytest.mark.parametrize("flags, words", [
    (["--num-envs", "0"], "--num-envs"),
    (["--resume", "no/such/checkpoint.pt"], "--resume"),
])
def test_bad_input_fails_with_one_clear_line(tmp_path, flags, words):
    assert_one_clear_error(run(flags, tmp_path, timeout=120), tmp_path, words)


def test_default_crop_margin_scales_with_the_image_and_keeps_the_width_a_multiple_of_4():
    assert curl.finalize_args(curl.Args()).crop_margin == 16  # CURL: 100 -> 84
    args = curl.finalize_args(curl.Args(image_size=32, image_width=64))
    assert args.crop_margin == 8 and (64 + 8) % 4 == 0  # round(16 * 32 / 84) = 6, raised to 8
