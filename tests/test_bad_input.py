"""Bad settings are refused by each script's own checks (`finalize_args`, in process) with a message that names the
flag; each script's test file keeps one run as a user does, in a subprocess, for the one-line-error contract."""

import importlib
import re

import pytest

from common.utils import load_checkpoint

CASES = {
    "dva_cartpole": [
        (dict(num_envs=0), "--num-envs"), (dict(horizon=0), "--horizon"), (dict(image_size=7), "--image-size"),
        (dict(gamma=1.5), "--gamma must be in [0, 1]"), (dict(lam=-0.1), "--lam must be in [0, 1]"),
        (dict(actor_lr=-1e-3), "--actor-lr must be > 0"), (dict(max_grad_norm=0), "--max-grad-norm must be > 0"),
        (dict(betas=(0.9, 1.5)), "--betas must be in [0, 1]"),
        (dict(critic_minibatches=0), "--critic-minibatches must be >= 1"),
        (dict(actor_hidden=(64, 0)), "--actor-hidden must be >= 1"), (dict(max_minutes=-5), "--max-minutes must be >= 0"),
        (dict(detach_state=True), "--detach-state is for --obs state"),
    ],
    "dva_locomotion": [(dict(num_envs=0), "--num-envs"), (dict(target_alpha=1.5), "--target-alpha"),
                       (dict(detach_state=True), "--detach-state is for --obs state")],
    "shac_diffrender": [(dict(num_envs=0), "--num-envs"), (dict(horizon=0), "--horizon")],
    "drqv2": [(dict(num_envs=0), "--num-envs"), (dict(image_size=12), "--image-size"), (dict(lr=0), "--lr must be > 0"),
              (dict(critic_tau=2), "--critic-tau must be in [0, 1]"), (dict(buffer_size=10), "--buffer-size")],
    "curl": [(dict(num_envs=0), "--num-envs"), (dict(image_size=14), "--image-size"),
             (dict(alpha_lr=-1), "--alpha-lr must be > 0"), (dict(encoder_tau=1.5), "--encoder-tau must be in [0, 1]"),
             (dict(gamma=float("nan")), "--gamma must be in [0, 1]"), (dict(batch_size=1), "--batch-size"),
             (dict(image_width=70, crop_margin=0), "multiple of 4"),
             (dict(num_envs=16, buffer_size=64), "--buffer-size"), (dict(eval_only="missing.pt"), "--eval-only")],
    "dreamerv3": [(dict(num_envs=0), "--num-envs must be >= 1"), (dict(image_size=24), "--image-size/--image-width"),
                  (dict(gamma=1.5), "--gamma must be in [0, 1]"), (dict(imag_horizon=1), "--imag-horizon")],
    "s2v_dagger": [(dict(num_envs=0), "--num-envs must be >= 1"), (dict(beta_decay=2), "--beta-decay must be in [0, 1]")],
}


@pytest.mark.parametrize("script, overrides, words",
                         [(script, overrides, words) for script, cases in CASES.items() for overrides, words in cases])
def test_finalize_args_refuses(script, overrides, words):
    module = importlib.import_module(script)
    with pytest.raises(ValueError, match=re.escape(words)):
        module.finalize_args(module.Args(**overrides))


@pytest.mark.parametrize("flag", ["--resume", "--eval-only"])
def test_a_missing_checkpoint_is_one_line(flag, monkeypatch):
    """common/utils.py's load_checkpoint, which every script calls first."""
    module = importlib.import_module("dva_cartpole")
    monkeypatch.setattr("sys.argv", ["dva_cartpole.py", flag, "no/such/checkpoint.pt"])
    args = module.Args(**{flag[2:].replace("-", "_"): "no/such/checkpoint.pt"})
    with pytest.raises(SystemExit, match=re.escape(f"error: {flag}: no checkpoint file at no/such/checkpoint.pt")):
        load_checkpoint(args, module.Args, module.SHAPE_ARGS)
