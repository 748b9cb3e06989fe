"""dreamerv3.py: symlog, the two-hot heads, KL balancing, lambda-returns and the return normalisation by hand; the
imagination's shapes and gradient routing; the replay's sequences; and the script end to end as a user runs it on all
four tasks (tags, checkpoint, resume, eval-only, bad input)."""

import math
import re
from copy import deepcopy

import numpy as np
import pytest
import torch

import dreamerv3
from script_helpers import assert_clock_went_on, assert_one_clear_error, run_here, run_script, scalars, stop_clock_at

# A model small enough for seconds per run: 16 px images (2 conv stages), 4 x 4 latents, widths 16, batches of 2 x 8.
TINY = ["--num-envs", "2", "--image-size", "16", "--batch-size", "2", "--batch-length", "8", "--buffer-size", "400",
        "--deter", "16", "--hidden", "16", "--stoch", "4", "--discrete", "4", "--units", "16", "--layers", "1",
        "--cnn-depth", "4", "--imag-horizon", "4", "--prefill", "16", "--pretrain", "2", "--train-ratio", "8",
        "--log-every", "1"]
TAGS = ["charts/SPS", "charts/eval_return", "charts/wall_minutes", "charts/updates", "losses/world_model_loss",
        "losses/image_loss", "losses/reward_loss", "losses/cont_loss", "losses/kl", "losses/dyn_loss",
        "losses/rep_loss", "losses/actor_loss", "losses/critic_loss", "losses/return_scale", "time/env_s",
        "time/policy_s", "time/update_s", "time/model_update_s", "time/behaviour_update_s", "time/iteration_s"]
CHECKPOINT_KEYS = ("world_model", "actor", "critic", "slow_critic", "return_norm", "model_opt", "actor_opt",
                   "critic_opt", "iteration", "global_step", "agent_steps", "num_updates", "update_credit", "rng",
                   "task_rng", "args")
BINS = torch.linspace(-20.0, 20.0, 255)


def run(args, cwd, timeout=600):
    return run_script("dreamerv3.py", args, cwd, timeout)


def run_in_process(args, cwd, timeout=600, episode_length=None):
    return run_here("dreamerv3.py", args, cwd, timeout, episode_length)


# ------------------------------------------------------------------------------------------------------ symlog, two-hot
def test_symlog_and_symexp_are_inverse():
    x = torch.tensor([-1e6, -50.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 3.0, 1e6], dtype=torch.float64)
    assert torch.allclose(dreamerv3.symexp(dreamerv3.symlog(x)), x, rtol=1e-12, atol=0)
    y = torch.linspace(-14, 14, 57, dtype=torch.float64)
    assert torch.allclose(dreamerv3.symlog(dreamerv3.symexp(y)), y, rtol=1e-12, atol=1e-12)
    by_hand = dreamerv3.symlog(torch.tensor([math.e - 1, -(math.e**2 - 1), 0.0], dtype=torch.float64))
    assert by_hand.tolist() == pytest.approx([1.0, -2.0, 0.0])


def test_two_hot_encoding_and_decoding_by_hand():
    step = 40 / 254
    # A quarter of the way from bin 10 to bin 11: 3/4 on bin 10, 1/4 on bin 11.
    code = dreamerv3.two_hot(torch.tensor([-20 + 10.25 * step]), BINS)
    assert code.shape == (1, 255) and code.sum().item() == pytest.approx(1.0)
    assert code[0, 10].item() == pytest.approx(0.75, abs=1e-4) and code[0, 11].item() == pytest.approx(0.25, abs=1e-4)
    assert code[0, :10].abs().sum() == 0 and code[0, 12:].abs().sum() == 0
    # On a bin, on the end bins and beyond them: all weight on one bin.
    values = torch.tensor([BINS[100].item(), -20.0, 20.0, 25.0, -1e3, 1e30])
    code = dreamerv3.two_hot(values, BINS)
    for row, bin_ in enumerate([100, 0, 254, 254, 0, 254]):
        assert code[row, bin_].item() == pytest.approx(1.0) and code[row].sum().item() == pytest.approx(1.0), row
    # Inside the range the code reproduces the value: sum(code * bins) = x.
    inside = torch.linspace(-19.9, 19.9, 101)
    assert torch.allclose((dreamerv3.two_hot(inside, BINS) * BINS).sum(-1), inside, atol=1e-4)

    # Decoding: symexp of the expected bin.
    logits = torch.full((255,), -1e9)
    logits[[10, 11]] = torch.tensor([0.75, 0.25]).log()
    expected = dreamerv3.symexp(torch.tensor(0.75 * (-20 + 10 * step) + 0.25 * (-20 + 11 * step)))
    assert dreamerv3.two_hot_mean(logits, BINS).item() == pytest.approx(expected.item(), rel=1e-4)
    # The loss: cross-entropy against the two-hot code of symlog(target); a raw target symexp(bin 10.25).
    torch.manual_seed(0)
    logits = torch.randn(255)
    target = dreamerv3.symexp(torch.tensor(-20 + 10.25 * step))
    log_p = torch.log_softmax(logits, -1)
    by_hand = -(0.75 * log_p[10] + 0.25 * log_p[11])
    assert dreamerv3.two_hot_loss(logits, target, BINS).item() == pytest.approx(by_hand.item(), rel=1e-4)


# ------------------------------------------------------------------------------------------------------ world model
def test_kl_balancing_with_free_bits_by_hand():
    torch.manual_seed(0)
    post = (2 * torch.randn(6, 2, 3, dtype=torch.float64)).requires_grad_()
    prior = (2 * torch.randn(6, 2, 3, dtype=torch.float64)).requires_grad_()

    def probs(logits):  # 1 % unimix
        return 0.99 * np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) + 0.01 / 3

    p, q = probs(post.detach().numpy()), probs(prior.detach().numpy())
    kl = (p * np.log(p / q)).sum((-2, -1))
    free = float(np.sort(kl)[2:4].mean())  # three steps below the free bits, three above
    loss, value, dyn, rep = dreamerv3.kl_balance_loss(post, prior, free, dyn_scale=0.5, rep_scale=0.1)
    assert np.allclose(value.numpy(), kl) and np.allclose(dyn.detach().numpy(), np.maximum(kl, free))
    assert np.allclose(loss.detach().numpy(), 0.6 * np.maximum(kl, free))

    # Gradients: the dynamics term (0.5) reaches only the prior, the representation term (0.1) only the posterior,
    # and neither below the free bits.
    loss.sum().backward()
    post2, prior2 = post.detach().clone().requires_grad_(), prior.detach().clone().requires_grad_()
    p2 = 0.99 * torch.softmax(post2, -1) + 0.01 / 3
    q2 = 0.99 * torch.softmax(prior2, -1) + 0.01 / 3
    d_post, d_prior = torch.autograd.grad((p2 * (p2 / q2).log()).sum(), (post2, prior2))
    above = torch.tensor(kl > free)[:, None, None]
    assert torch.allclose(post.grad, 0.1 * d_post * above) and torch.allclose(prior.grad, 0.5 * d_prior * above)
    assert above.sum() == 3 and post.grad[~above.squeeze()].abs().sum() == 0


def tiny_args(**kwargs):
    return dreamerv3.Args(deter=8, hidden=8, stoch=3, discrete=4, units=8, layers=1, cnn_depth=2, imag_horizon=5,
                          image_size=16, **kwargs)


def tiny_batch(b=3, t=4, act_dim=2):
    is_first = torch.zeros(b, t, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[1, 2] = True
    is_terminal = torch.zeros(b, t, dtype=torch.bool)
    is_terminal[1, 1] = True
    colours = torch.randint(0, 256, (b, t, 1, 1, 3), dtype=torch.uint8)  # one colour per frame: learnable
    return (colours.expand(b, t, 16, 16, 3), torch.rand(b, t, act_dim) * 2 - 1,
            torch.randn(b, t) * 5, is_first, is_terminal)


def test_world_model_update_fits_a_batch():
    torch.manual_seed(0)
    args = tiny_args(model_lr=3e-3)
    world_model = dreamerv3.WorldModel((16, 16), 2, args)
    opt = torch.optim.Adam(world_model.parameters(), lr=args.model_lr, eps=args.model_eps)
    batch = tiny_batch()
    first, _ = dreamerv3.update_world_model(world_model, opt, batch, BINS, args)
    for _ in range(40):
        metrics, post = dreamerv3.update_world_model(world_model, opt, batch, BINS, args)
    assert metrics["losses/image_loss"] < 0.7 * first["losses/image_loss"]
    assert metrics["losses/reward_loss"] < first["losses/reward_loss"]
    assert post["stoch"].shape == (12, 3, 4) and post["deter"].shape == (12, 8) and not post["deter"].requires_grad


# ------------------------------------------------------------------------------------------------------ behaviour
def test_lambda_returns_against_their_definition():
    rng = np.random.default_rng(0)
    h, n, lam = 6, 3, 0.9
    reward, value = rng.normal(size=(h, n)), rng.normal(size=(h, n))
    discount = 0.99 * rng.uniform(0.3, 1.0, size=(h, n))
    discount[3, 1] = 0.0  # env 1 terminates on arriving at state 3: nothing after it counts

    def n_step(t, k, i):  # G_t^(k): k rewards, then the value of state t + k, discounted by the continues on the way
        g, d = 0.0, 1.0
        for j in range(1, k + 1):
            g += d * reward[t + j, i]
            d *= discount[t + j, i]
        return g + d * value[t + k, i]

    expected = np.zeros((h - 1, n))
    for t in range(h - 1):
        m = h - 1 - t  # the longest return reaches the last state
        for i in range(n):
            expected[t, i] = (1 - lam) * sum(lam ** (k - 1) * n_step(t, k, i) for k in range(1, m)) \
                + lam ** (m - 1) * n_step(t, m, i)
    got = dreamerv3.lambda_returns(*(torch.tensor(x) for x in (reward, value, discount)), lam)
    assert got.shape == (h - 1, n) and np.allclose(got.numpy(), expected)
    assert np.isclose(got[2, 1].item(), reward[3, 1])  # the step into the terminal state: its reward only


def test_return_normalisation_matches_numpy_percentiles_with_the_ema():
    rng = np.random.default_rng(0)
    norm = dreamerv3.ReturnNorm(0.99)
    ema = np.zeros(2)
    batches = [0.1 * rng.normal(size=(14, 64)), 300 * rng.normal(size=(14, 64)) + 50,
               rng.uniform(-1000, 3000, size=(14, 64))]
    for i, returns in enumerate(batches):
        offset, scale = norm(torch.tensor(returns, dtype=torch.float32))
        ema = 0.99 * ema + 0.01 * np.percentile(returns, [5, 95])
        assert offset.item() == pytest.approx(ema[0], rel=1e-5, abs=1e-7), i
        assert scale.item() == pytest.approx(max(ema[1] - ema[0], 1.0), rel=1e-5), i
        assert (scale.item() == 1.0) == (i == 0)  # small returns are not scaled up
    assert list(norm.state_dict()) == ["ema"]  # the EMA is checkpointed


def test_imagination_shapes_and_the_world_model_gets_no_actor_gradient():
    torch.manual_seed(0)
    args = tiny_args(actor_entropy=0.0)  # the actor learns from the returns alone
    world_model = dreamerv3.WorldModel((16, 16), 2, args)
    actor = dreamerv3.Actor(world_model.feat_dim, 2, args.units, args.layers)
    critic = dreamerv3.mlp(world_model.feat_dim, args.units, args.layers, dreamerv3.BINS, out_scale=0.0)
    slow_critic = deepcopy(critic).requires_grad_(False)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (world_model, actor, critic)]
    _, post = dreamerv3.update_world_model(world_model, opts[0], tiny_batch(), BINS, args)
    torch.nn.init.normal_(world_model.reward[-1].weight)  # rewards that depend on the state

    feats, actions, entropy = dreamerv3.imagine(world_model.rssm, actor, post, args.imag_horizon)
    assert feats.shape == (5, 12, 3 * 4 + 8) and actions.shape == (5, 12, 2) and entropy.shape == (5, 12)
    assert actions.abs().max() <= 1.0
    assert torch.equal(feats[0], dreamerv3.RSSM.feature(post))
    assert torch.allclose(feats[1:, :, :12].detach().reshape(4, 12, 3, 4).sum(-1), torch.ones(4, 12, 3))  # one-hot
    # State t + 1 follows from state t and the action drawn there (the GRU's part is deterministic).
    for t in range(4):
        state = {"stoch": feats[t, :, :12].reshape(12, 3, 4), "deter": feats[t, :, 12:]}
        assert torch.allclose(world_model.rssm.img_step(state, actions[t])["deter"], feats[t + 1, :, 12:], atol=1e-6)
    # Later states depend on earlier actions (through the dynamics); the first one does not.
    grad = torch.autograd.grad(feats[-1].sum(), actor.mean.weight, retain_graph=True)[0]
    assert grad.abs().sum() > 0
    grad = torch.autograd.grad(feats[0].sum(), actor.mean.weight, retain_graph=True, allow_unused=True)[0]
    assert grad is None or grad.abs().sum() == 0

    before = {m: [p.detach().clone() for p in m.parameters()] for m in (world_model, actor, critic)}
    world_model.zero_grad(set_to_none=True)
    metrics, feats, actions = dreamerv3.update_behaviour(world_model, actor, critic, slow_critic,
                                                         dreamerv3.ReturnNorm(0.99), opts[1], opts[2], post, BINS,
                                                         args)
    assert feats.shape == (5, 12, 20) and actions.shape == (5, 12, 2)
    assert all(p.grad is None for p in world_model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before[world_model], world_model.parameters()))
    for module in (actor, critic):
        assert not all(torch.equal(a, b) for a, b in zip(before[module], module.parameters()))
    assert {"losses/actor_loss", "losses/critic_loss", "losses/return_scale"} <= set(metrics)
    assert math.isfinite(metrics["losses/actor_grad_norm"]) and metrics["losses/actor_grad_norm"] > 0


# ------------------------------------------------------------------------------------------------------ replay
def test_replay_sequences_never_cross_an_episode_unmarked():
    """Two envs write episodes of 1-9 agent steps through rings of 13 slots (wrapping several times). Every frame's
    pixels encode (env, episode, step); each slot's action and reward encode the frame before it. Every sampled
    sequence must be a run of consecutive frames among its env's last 13 written, enter a new episode only at a slot
    marked is_first (step 0), and carry the action and reward that led to each frame."""
    buf = dreamerv3.ReplayBuffer(26, 2, (2, 2), 1, torch.device("cpu"))
    lengths = {0: [5, 2, 9, 1, 7, 4, 6, 3], 1: [3, 8, 2, 6, 1, 9, 4, 5]}
    written = {0: [], 1: []}

    def write(env, episode):
        length = lengths[env][episode]
        for step in range(length + 1):  # L agent steps fill L + 1 slots, the final frame included
            code = 100 * env + 10 * episode + step
            prev = code - 1 if step else 0
            buf.add(torch.full((1, 2, 2, 3), code, dtype=torch.uint8), torch.tensor([[float(prev)]]),
                    torch.tensor([0.5 * prev]), torch.tensor([step == 0]),
                    torch.tensor([step == length and episode % 2 == 0]), torch.tensor([env]))
            written[env].append(code)

    def check(length):
        """Returns how many sampled steps entered a new episode."""
        crossed = 0
        images, actions, rewards, is_first, is_terminal = buf.sample(300, length)
        assert images.shape == (300, length, 2, 2, 3) and is_first[:, 0].all()
        for b, row in enumerate(images[:, :, 0, 0, 0].long().tolist()):
            recent = written[row[0] // 100][-13:]
            assert any(recent[i: i + length] == row for i in range(len(recent) - length + 1)), row
            for t in range(1, length):
                episode, step = divmod(row[t] % 100, 10)
                new_episode = row[t] // 10 != row[t - 1] // 10
                assert is_first[b, t] == (step == 0) and (not new_episode or step == 0), row
                crossed += new_episode
                assert actions[b, t, 0] == (row[t] - 1 if step else 0) and rewards[b, t] == 0.5 * actions[b, t, 0]
                assert is_terminal[b, t] == (step == lengths[row[t] // 100][episode] and episode % 2 == 0)
        return crossed

    torch.manual_seed(0)
    write(0, 0)  # 6 frames of env 0, none of env 1: only they can be sampled
    check(4)
    for episode in range(1, 8):
        write(0, episode)
    for episode in range(8):
        write(1, episode)
    crossed = sum(check(length) for length in (4, 6, 13))
    assert crossed > 50  # the check is not empty: many sequences ran into a next episode, marked
    assert not buf.valid_starts(14).any()  # longer than the ring: nothing to sample


# ------------------------------------------------------------------------------------------------------ the script
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """10 iterations of cart-pole: 8 of uniform actions (16 agent steps), then 2 pretraining updates and 1 update
    per iteration; checkpoints at 5 and 10, evaluations (with video) at 10 and at 4 and 8 once updates have begun:
    only at 8."""
    cwd = tmp_path_factory.mktemp("smoke")
    out = run_in_process([*TINY, "--max-iters", "10", "--eval-every", "4", "--save-every", "5", "--capture-video"],
                         cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return cwd, run_dir, out


def test_smoke_run_writes_tags_checkpoint_and_video(trained):
    cwd, run_dir, out = trained
    acc = scalars(run_dir)
    missing = [t for t in [*TAGS, "charts/eval_success"] if t not in acc.Tags()["scalars"]]
    assert not missing, missing
    assert len(acc.Scalars("losses/world_model_loss")) == 3 and len(acc.Scalars("charts/eval_return")) == 2
    assert "videos/eval" in acc.Tags()["images"]
    assert (run_dir / "eval_000010.mp4").stat().st_size > 1000 and not (run_dir / "eval_000004.mp4").exists()
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert all(key in ckpt for key in CHECKPOINT_KEYS), set(CHECKPOINT_KEYS) - set(ckpt)
    assert ckpt["iteration"] == 10 and ckpt["global_step"] == 10 * 2 * 2 and ckpt["agent_steps"] == 20
    assert ckpt["num_updates"] == 2 + 1 + 1
    assert re.search(r"iter 10/10 +return", out.stdout)


@pytest.mark.parametrize("task_name", ["hopper", "ant", "humanoid"])
def test_smoke_run_on_the_locomotion_tasks(tmp_path, task_name):
    out = run_in_process([*TINY, "--task", task_name, "--max-iters", "9", "--eval-every", "0", "--eval-steps", "6"],
                         tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    acc = scalars(run_dir)
    missing = [t for t in [*TAGS, "charts/eval_forward_velocity"] if t not in acc.Tags()["scalars"]]
    assert not missing, missing
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] == 9 and ckpt["num_updates"] == 2 + 1 and ckpt["args"]["task"] == task_name


def test_resume_continues_the_count_and_eval_only_loads(trained):
    cwd, run_dir, _ = trained
    ckpt = run_dir / "checkpoint.pt"
    step = stop_clock_at(ckpt)
    before = torch.load(ckpt, weights_only=False)
    # The replay is refilled by 16 agent steps (8 iterations) of the loaded policy, then 1 update per iteration, no
    # pretraining; episodes of 20 sim steps here (10 agent steps): past iteration 20 every env has finished the
    # episode it began at 11.
    out = run_in_process(["--max-iters", "24", "--eval-every", "0", "--resume", str(ckpt)], cwd, episode_length=20)
    assert out.returncode == 0, out.stderr[-3000:]
    after = torch.load(ckpt, weights_only=False)
    assert after["args"] == {**before["args"], "max_iters": 24, "eval_every": 0, "resume": str(ckpt)}
    assert after["iteration"] == 24 and after["global_step"] == 24 * 2 * 2 and after["agent_steps"] == 48
    assert after["num_updates"] == 4 + (24 - 18 + 1)  # from iteration 18 (agent_steps 20 + 16 refilled)
    assert not torch.equal(after["actor"]["mean.weight"], before["actor"]["mean.weight"])
    assert_clock_went_on(run_dir, ckpt, step)
    assert "iter 11/24" in out.stdout and "iter 1/" not in out.stdout
    acc = scalars(run_dir)
    lengths = [e.value for e in acc.Scalars("charts/episodic_length")]
    assert lengths and max(lengths) <= 20 and len(acc.Scalars("charts/episodic_return")) == len(lengths)

    out = run_in_process(["--eval-only", str(ckpt)], cwd, episode_length=20)  # with the saved settings
    assert out.returncode == 0, out.stderr[-3000:]
    match = re.search(r"eval over 2 episodes: mean return (-?[\d.]+), success ([\d.]+)", out.stdout)
    assert match and -1e5 < float(match.group(1)) < 200, out.stdout  # at most 10 per step
    assert (run_dir / "eval_only.mp4").stat().st_size > 1000


@pytest.mark.parametrize("flags, words", [
    (["--num-envs", "0"], "--num-envs must be >= 1"),
    (["--resume", "no/such/checkpoint.pt"], "--resume"),
])
def test_bad_input_fails_with_one_clear_line(tmp_path, flags, words):
    assert_one_clear_error(run(flags, tmp_path, timeout=120), tmp_path, words)
