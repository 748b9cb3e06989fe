"""What every task shares: the `Task` base, and the one exception a blown-up simulation reaches the scripts as.

`Task` holds what the cart-pole (`common/cartpole.py`) and the locomotion tasks (`common/locomotion.py`) do the same
way: the gradient tape (cut, backward, snapshot, restore), resets, rendering with any of the three renderers, the
detection of envs that blew up, and the evaluation of a policy (`run_episodes`) with its score. A simulation that
blows up inside Genesis reaches the scripts as one exception type, `SimulationBlowUp`, and `broken_envs()` says which envs to restart.
`common/tasks.py` builds a task by name (`make_task`).
"""

import numpy as np
import torch


class SimulationBlowUp(RuntimeError):
    """Genesis stopped a step or a backward pass because an env's state or gradient became NaN. The scene keeps its
    last state; `Task.broken_envs()` says which envs to restart."""


def _is_nan_error(error: Exception) -> bool:
    # Genesis raises a generic exception whose text names the NaN ("... causing 'nan'", "Nan grad in qpos ...").
    return "nan" in str(error).lower()


class Task:
    """The machinery both task families share; a new task is a subclass that provides what is declared below.

    Its `__init__` sets the class attributes (or inherits them) and builds, in this order of use:
        scene, rigid        the Genesis scene (n_envs = num_envs) and its rigid solver
        robot               the robot entity; camera (or None) and ray_caster (or None, the torch renderer's)
        num_envs, device, image_size (height, width, or None), requires_grad
        generator           a seeded torch.Generator on the CPU: every random start draws from it (checkpointed)
        progress            (N,) long: steps since each env's episode began; other per-env buffers that a snapshot
                            restores and a tape cut detaches are named in `episode_buffers`
    and it provides these methods:
        _read_state()       read the scene into torch tensors (qpos, qvel, ...) and set `finite` ((N,) bool)
        random_start(n)     (qpos, qvel) of n fresh starts, drawn from `generator`
        set_state(qpos, qvel, env_ids=None)
        step(actions)       -> (reward, terminated, truncated), differentiable in the actions; ends no episode
        critic_obs()        (N, critic_obs_dim), the critic's (and state SHAC's actor's) input
        camera_pose()       the tracking camera's (position, look-at) per env
        score_step(t, steps, alive), score(total, alive, steps): the evaluation's second number (`score_name`)
    """

    name: str
    act_dim: int
    critic_obs_dim: int
    max_episode_length: int
    mjcf: object  # the model's path (the torch renderer reads its shapes)
    camera_fov: float
    torch_view: dict  # the TorchRenderer options that draw this task's Genesis scene: floor, background, light
    episode_buffers: tuple[str, ...] = ("progress",)
    score_name: str  # the evaluation's second number: charts/eval_<score_name>
    generator: torch.Generator
    finite: torch.Tensor

    # ----------------------------------------------------------------------------------------------- simulation
    def _simulate(self):
        """One `scene.step()`; Genesis's NaN stop becomes `SimulationBlowUp`."""
        try:
            self.scene.step()
        except Exception as error:
            if _is_nan_error(error):
                raise SimulationBlowUp(str(error)) from error
            raise

    def broken_envs(self) -> torch.Tensor:
        """(N,) bool: envs whose state is non-finite or that Genesis's solver flagged (a blow-up freezes the state,
        so it need not show as a NaN)."""
        return ~self.finite | self.rigid.get_error_envs_mask().to(self.device)

    # ----------------------------------------------------------------------------------------------- tape
    def cut_graph(self):
        """Start a new gradient tape from the current state (SHAC's `initialize_trajectory`).

        Under torch.no_grad() nothing is taped, and Genesis's get_state/reset round trip crashes there: skip it.
        After steps taken under no_grad the tape's token carries no grad and get_state() would raise: renew it first.
        """
        if self.requires_grad and torch.is_grad_enabled():
            self.scene.sim.reset_grad()
            self.scene.reset(self.scene.get_state())
        self._detach_buffers()
        self._read_state()

    def backward(self, loss: torch.Tensor):
        """Back-propagate `loss` through the simulated window; the scene stays at the window's end state, and the
        state read afterwards starts a new tape. Genesis's NaN-gradient stop becomes `SimulationBlowUp`."""
        try:
            self.scene.backward(loss)
        except Exception as error:
            if _is_nan_error(error):
                raise SimulationBlowUp(str(error)) from error
            raise
        self._detach_buffers()
        self._read_state()

    def _detach_buffers(self):
        for name in self.episode_buffers:
            setattr(self, name, getattr(self, name).detach())

    def rng_state(self) -> torch.Tensor:
        """The state of the task's random stream (start states), for a checkpoint."""
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor):
        self.generator.set_state(state)

    def snapshot(self):
        """Everything needed to put the batch back where it is (for evaluation in the training scene).
        Take and restore it in grad mode: Genesis's get_state/reset round trip crashes under no_grad."""
        return self.scene.get_state(), {name: getattr(self, name).detach().clone() for name in self.episode_buffers}

    def restore(self, snapshot):
        state, buffers = snapshot
        self.scene.reset(state)
        for name, value in buffers.items():
            setattr(self, name, value.clone())
        self._read_state()

    # ----------------------------------------------------------------------------------------------- resets
    def reset(self, env_ids: torch.Tensor | None = None):
        """A random start state (`random_start`) for `env_ids` (all if None), then cut the gradient tape. Call only
        between windows: a reset inside a taped window breaks Genesis's gradient."""
        if env_ids is None:
            env_ids = torch.arange(self.num_envs, device=self.device)
        env_ids = torch.as_tensor(env_ids, device=self.device).reshape(-1)
        self.set_state(*self.random_start(len(env_ids)), env_ids)

    def uniform(self, *shape: int, scale: float) -> torch.Tensor:
        """Uniform noise in [-scale, scale] from the task's own generator (seeded, checkpointed)."""
        return (torch.rand(*shape, generator=self.generator) * 2 - 1) * scale

    @torch.no_grad()
    def repeat_step(self, actions: torch.Tensor, repeat: int):
        """Hold `actions` for `repeat` steps (the pixel baselines' action repeat). An env that ends at a step stops
        counting there: it keeps being simulated with the batch, and the caller resets it. Returns the reward summed
        while alive, terminated, ended (terminated or time limit) and the steps each env lived, each (N,)."""
        reward = torch.zeros(self.num_envs, device=self.device)
        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        ended, steps = torch.zeros_like(terminated), torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        for _ in range(repeat):
            r, term, trunc = self.step(actions)
            live = ~ended
            reward += torch.where(live, r, 0.0)
            steps += live.long()
            terminated |= live & term
            ended |= live & (term | trunc)
        return reward, terminated, ended, steps

    # ----------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def run_episodes(self, policy, steps: int, action_repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluate a policy: one episode per env from fresh starts (`reset()`), of `steps` steps or until every env
        has ended. `policy(t)` is called at each decision (t: the episode's step, 0 at the start), observes the task
        itself (`render()`, `critic_obs()`) and returns the actions (N, act_dim), held for `action_repeat` steps.
        Returns (returns, score), each (N,): the rewards summed while alive, and the task's score (`score_step`,
        `score`: the cart-pole's success, the locomotion's forward velocity). The caller puts the training batch
        back (`snapshot`/`restore`) or resets it."""
        returns = torch.zeros(self.num_envs, device=self.device)
        score = torch.zeros_like(returns)
        alive = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        self.reset()
        t = 0
        while t < steps and alive.any():
            actions = policy(t)
            for _ in range(min(action_repeat, steps - t)):
                reward, terminated, _ = self.step(actions)
                returns += torch.where(alive, reward, 0.0)
                score += self.score_step(t, steps, alive)
                alive &= ~terminated
                t += 1
        return returns, self.score(score, alive, steps)

    def score_step(self, t: int, steps: int, alive: torch.Tensor) -> torch.Tensor:
        """Per env, this evaluation step's share of the score (summed over the evaluation by the caller);
        `alive`: the envs not ended before this step."""
        raise NotImplementedError

    def score(self, total: torch.Tensor, alive: torch.Tensor, steps: int) -> torch.Tensor:
        """Per env, the evaluation's score from the summed `score_step`s and the envs still alive at the end."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------- images
    def link_poses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (N, L, 3) and quaternions (N, L, 4, wxyz) of all the scene's links: differentiable in grad
        mode (the torch renderer's input), plain reads under torch.no_grad()."""
        if self.requires_grad and torch.is_grad_enabled():
            state = self.rigid.get_state()
            return state.links_pos, state.links_quat
        return self.rigid.get_links_pos(), self.rigid.get_links_quat()

    def torch_renderer(self, image_size: tuple[int, int] | None = None, **kwargs):
        """A `common.diff_render.TorchRenderer` of this task's bodies, seen from its camera (the Genesis view)."""
        from common.diff_render import TorchRenderer, body_link_rows

        if self.image_size is None:
            raise RuntimeError("this task was built without a camera (image_size=None)")
        return TorchRenderer(self.mjcf, body_link_rows(self.mjcf, self.robot), image_size or self.image_size,
                             self.camera_fov, self.device, **{**self.torch_view, **kwargs})

    def _place_cameras(self):
        """Move the Genesis camera before a render (a fixed camera: nothing to do)."""

    @torch.no_grad()
    def render(self) -> torch.Tensor:
        """One RGB image per env from the task's camera (`camera_pose()`): (N, H, W, 3) uint8 on the task's device."""
        if self.image_size is None:
            raise RuntimeError("this task was built without a camera (image_size=None)")
        if self.ray_caster is not None:  # renderer="torch"
            return (255 * self.ray_caster.render(*self.link_poses(), *self.camera_pose())).round().to(torch.uint8)
        self._place_cameras()
        # force_render: Genesis caches frames by tape step, and a reset under no_grad (evaluation) keeps the step,
        # so a cached frame could show the state from before the reset. We render once per step anyway.
        rgb = self.camera.render(rgb=True, force_render=True)[0]
        # one env comes back as a flipped (negative-stride) view, without the batch axis
        rgb = torch.as_tensor(np.ascontiguousarray(rgb) if not torch.is_tensor(rgb) else rgb, device=self.device)
        if rgb.dim() == 3:
            rgb = rgb.unsqueeze(0)
        return rgb[..., :3].to(torch.uint8)
