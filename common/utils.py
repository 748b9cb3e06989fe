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
import tyro


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


@dataclasses.dataclass
class Episodes:
    """Each env's episode in progress: its return and length so far, and whether it has ended (the SHAC loop's envs
    wait for the window boundary to start over)."""

    returns: torch.Tensor  # (N,) float
    lengths: torch.Tensor  # (N,) long
    ended: torch.Tensor  # (N,) bool

    @classmethod
    def zeros(cls, num_envs: int, device=None) -> "Episodes":
        return cls(torch.zeros(num_envs, device=device), torch.zeros(num_envs, dtype=torch.long, device=device),
                   torch.zeros(num_envs, dtype=torch.bool, device=device))

    def finish(self, env_ids: torch.Tensor) -> list[tuple[float, int]]:
        """The (return, length) of the episodes of `env_ids`, which start over from zero."""
        finished = [(self.returns[i].item(), self.lengths[i].item()) for i in env_ids.tolist()]
        self.restart(env_ids)
        return finished

    def restart(self, env_ids: torch.Tensor | None = None):
        """Start the episodes of `env_ids` (all if None) over from zero, dropping what they had."""
        env_ids = slice(None) if env_ids is None else env_ids
        self.returns[env_ids], self.lengths[env_ids], self.ended[env_ids] = 0.0, 0, False


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


def resumed_args(args_class, saved: dict, argv: list[str], shape_args: tuple[str, ...]):
    """The command line `argv` parsed with a checkpoint's settings `saved` as its defaults (tyro's `default=`): the
    run continues with the settings it was saved with, and a flag given on the command line wins, even at the class's
    default value. --resume and --eval-only come from the command line alone. A shape argument (the networks must be
    rebuilt as they were saved) given with another value than the checkpoint's is a ValueError that names both.
    Call finalize_args after this, so that defaults which depend on other flags follow the settings the run uses."""
    fields = {field.name for field in dataclasses.fields(args_class)}
    defaults = args_class(**{key: value for key, value in saved.items()
                             if key in fields and key not in ("resume", "eval_only")})
    args = tyro.cli(args_class, default=defaults, args=argv)
    for key in shape_args:
        if key in saved and getattr(args, key) != saved[key]:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag} {getattr(args, key)}: the checkpoint was saved with {flag} {saved[key]}, "
                             f"which its networks need; leave {flag} out")
    return args


def load_checkpoint(args, args_class, shape_args: tuple[str, ...]):
    """For --resume and --eval-only: read the checkpoint and continue with the settings it was saved with, the flags
    given on this command line overriding them (`resumed_args`). A missing or unreadable file, or a shape flag the
    checkpoint cannot fill, ends the process with one line. Returns (args, checkpoint); (args, None) when neither
    flag is given."""
    path = args.resume or args.eval_only
    if not path:
        return args, None
    if not Path(path).is_file():
        sys.exit(f"error: {'--resume' if args.resume else '--eval-only'}: no checkpoint file at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        saved = dict(checkpoint["args"])
    except Exception as error:  # a truncated or foreign file
        sys.exit(f"error: cannot read the checkpoint {path}: {error!r}")
    try:
        args = resumed_args(args_class, saved, sys.argv[1:], shape_args)
    except ValueError as error:
        sys.exit(f"error: {error}")
    return args, checkpoint


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
