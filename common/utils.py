"""Small helpers shared by every script: seeding, run folders, normalisers, frame stacks, checkpoints."""

import dataclasses
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


def seed_everything(seed: int, deterministic: bool = False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic


def run_name(task: str, exp_name: str, seed: int) -> str:
    """CleanRL's run naming: `{task}__{exp_name}__{seed}__{unix_time}`."""
    return f"{task}__{exp_name}__{seed}__{int(time.time())}"


def hparams_table(args) -> str:
    """All arguments as a markdown table, for `writer.add_text("hyperparameters", ...)`."""
    rows = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    return f"|param|value|\n|-|-|\n{rows}"


class RunningMeanStd(nn.Module):
    """Running mean and variance over a batch axis (parallel-merge formula), kept as buffers so they checkpoint."""

    def __init__(self, shape: tuple[int, ...], epsilon: float = 1e-4):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("count", torch.tensor(epsilon))

    @torch.no_grad()
    def update(self, x: torch.Tensor):
        x = x.reshape(-1, *self.mean.shape).to(self.mean)
        if len(x) == 0:  # an empty batch (every env masked) must not turn the statistics into NaN
            return
        self.update_from_moments(x.mean(0), x.var(0, unbiased=False), x.shape[0])

    @torch.no_grad()
    def update_from_moments(self, batch_mean: torch.Tensor, batch_var: torch.Tensor, batch_count: float):
        """Fold a batch, given by its mean, (population) variance and count, into the running statistics."""
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean += delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable in x (no clipping, which would zero the gradient); the statistics are constants."""
        return (x - self.mean) / torch.sqrt(self.var + 1e-5)


class FrameStack:
    """The last `k` RGB frames of every env as one uint8 tensor (N, 3k, H, W), oldest first."""

    def __init__(self, k: int):
        self.k = k
        self.frames = None

    def reset(self, frames: torch.Tensor, env_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Fill the stack of `env_ids` (all if None) with k copies of their first frame (N, H, W, 3)."""
        chw = frames.permute(0, 3, 1, 2)
        if self.frames is None or env_ids is None:
            self.frames = chw.repeat(1, self.k, 1, 1).contiguous()
        elif len(env_ids) > 0:
            self.frames[env_ids] = chw[env_ids].repeat(1, self.k, 1, 1)
        return self.frames

    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """Drop the oldest frame of every env and append `frames` (N, H, W, 3); returns a new tensor."""
        self.frames = torch.cat([self.frames[:, 3:], frames.permute(0, 3, 1, 2)], dim=1)
        return self.frames


def save_checkpoint(path: Path, payload: dict):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def explicit_flags(argv: list[str], args_class) -> set[str]:
    """The fields of the dataclass `args_class` that `argv` sets, in any of tyro's spellings: `--num-envs 4`,
    `--num-envs=4`, `--num_envs 4`, and `--flag` / `--no-flag` for a bool."""
    spellings = {}
    for field in dataclasses.fields(args_class):
        for name in (field.name.replace("_", "-"), field.name):
            spellings[f"--{name}"] = field.name
            spellings[f"--no-{name}"] = field.name  # a bool's; tyro has already refused it for any other field
            spellings[f"--no_{name}"] = field.name
    return {spellings[token.split("=")[0]] for token in argv if token.split("=")[0] in spellings}


def apply_saved_args(args, saved: dict, explicit: set[str], shape_args: tuple[str, ...]):
    """Continue a run with the settings it was saved with: every saved argument replaces the command line's, except
    the flags given on purpose (`explicit`). The shape arguments always come from the checkpoint (the networks must
    be rebuilt as they were saved); --resume and --eval-only always from the command line. Call finalize_args after
    this, so that defaults which depend on other flags are filled from the settings the run really uses.
    A shape argument given on the command line with another value than the checkpoint's is a ValueError (a task
    or a network the checkpoint cannot fill), not silently replaced."""
    fields = {field.name for field in dataclasses.fields(args)}
    for key, value in saved.items():
        if key not in fields or key in ("resume", "eval_only"):
            continue
        if key in shape_args and key in explicit and getattr(args, key) != value:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag} {getattr(args, key)}: the checkpoint was saved with {flag} {value}, "
                             f"which its networks need; leave {flag} out")
        if key in shape_args or key not in explicit:
            setattr(args, key, value)
    return args


def load_checkpoint(args, args_class, shape_args: tuple[str, ...]) -> dict | None:
    """For --resume and --eval-only: read the checkpoint and continue with the settings it was saved with
    (`apply_saved_args`, with the flags given on this command line kept). A missing or unreadable file ends the
    process with one line. Returns the checkpoint, or None when neither flag is given."""
    path = args.resume or args.eval_only
    if not path:
        return None
    if not Path(path).is_file():
        sys.exit(f"error: {'--resume' if args.resume else '--eval-only'}: no checkpoint file at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        saved = dict(checkpoint["args"])
    except Exception as error:  # a truncated or foreign file
        sys.exit(f"error: cannot read the checkpoint {path}: {error!r}")
    try:
        apply_saved_args(args, saved, explicit_flags(sys.argv[1:], args_class), shape_args)
    except ValueError as error:
        sys.exit(f"error: {error}")
    return checkpoint


def range_problems(args, at_least_one=(), non_negative=(), positive=(), unit=()) -> list[str]:
    """One message per numeric flag outside its meaningful range: `at_least_one` (counts, and every width of a
    tuple) >= 1, `non_negative` >= 0, `positive` (learning rates, clips) > 0, `unit` (discounts, lambdas, fractions,
    Adam betas) in [0, 1]. NaN fails every test."""
    problems = []
    for names, ok, rule in ((at_least_one, lambda x: x >= 1, ">= 1"), (non_negative, lambda x: x >= 0, ">= 0"),
                            (positive, lambda x: x > 0, "> 0"), (unit, lambda x: 0 <= x <= 1, "in [0, 1]")):
        for name in names:
            value = getattr(args, name)
            if not all(ok(x) for x in (value if isinstance(value, tuple) else (value,))):
                problems.append(f"--{name.replace('_', '-')} must be {rule} (got {value})")
    return problems


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def upscale(frames: np.ndarray, min_width: int = 256) -> np.ndarray:
    """Nearest-neighbour upscaling of (T, H, W, 3) frames so that tiny training images are visible in a video."""
    factor = max(1, -(-min_width // frames.shape[2]))
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def write_video(frames: np.ndarray, path: Path, writer=None, tag: str = "videos/eval", step: int = 0, fps: int = 30):
    """Save (T, H, W, 3) uint8 frames as mp4, and as an animated GIF in TensorBoard if a writer is given.

    TensorBoard's own `add_video` needs `moviepy.editor`, which moviepy 2 removed, so we encode the GIF ourselves.
    """
    import imageio.v2 as imageio
    from torch.utils.tensorboard.summary import Summary

    frames = upscale(np.asarray(frames, dtype=np.uint8))
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]  # even sizes for H.264
    imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1)
    if writer is not None:
        gif = imageio.mimwrite("<bytes>", list(frames[::2]), format="GIF", duration=2000 / fps, loop=0)
        image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3, encoded_image_string=gif)
        writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
