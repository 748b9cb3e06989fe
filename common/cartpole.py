"""Cart-pole swing-up on Genesis: a batch of differentiable envs with a fixed camera per env.

The task API that every script uses (`common.task.Task`; the locomotion tasks follow it too):

    task = make_task("cartpole", num_envs, device, image_size=(H, W))   # common/tasks.py
    task.reset()                       # all envs to a random start; cuts the gradient tape
    frames = task.render()             # (N, H, W, 3) uint8, never differentiated
    reward, terminated, truncated = task.step(actions)   # actions (N, 1) in [-1, 1], differentiable
    task.critic_obs()                  # (N, 5) [x, xdot, sin th, cos th, thdot], differentiable
    task.backward(loss)                # back-propagate through the window, keep the end state
    task.reset(ended_env_ids)          # at the window boundary only (docs/genesis.md: mid-window resets leak)
    task.link_poses(), task.camera_pose()   # the inputs of the torch renderer (common/diff_render.py)

`renderer` is "rasterizer" or "batch" (Genesis's camera) or "torch" (no Genesis camera: `render()` is the torch ray
caster of the same view, run without gradient).

theta = 0 is the pole upright; episodes start with it hanging down (theta = -pi).
"""

import math
from pathlib import Path

import torch

from common.genesis_setup import check_camera_width, init_genesis
from common.task import Task

ASSET = Path(__file__).parent / "assets" / "cartpole.xml"


def wrap_angle(theta: torch.Tensor) -> torch.Tensor:
    """Wrap to [-pi, pi); differentiable (slope 1 everywhere but at the seam)."""
    return torch.remainder(theta + math.pi, 2 * math.pi) - math.pi


def cartpole_reward(x, xdot, theta, thetadot):
    """SHAC's swing-up reward: 10 (health) - th^2 - 0.1 thd^2 - 0.05 x^2 - 0.1 xd^2, th wrapped to [-pi, pi)."""
    theta = wrap_angle(theta)
    return 10.0 - theta**2 - 0.1 * thetadot**2 - 0.05 * x**2 - 0.1 * xdot**2


class CartpoleTask(Task):
    name = "cartpole"
    score_name = "success"
    act_dim = 1
    critic_obs_dim = 5
    max_episode_length = 240
    dt = 1.0 / 60.0
    substeps = 4  # DiffRL's sim_substeps: Genesis then integrates exactly as dflex does (semi-implicit Euler at 1/240 s)
    force_limit = 1000.0  # N; equals the motor's gear x ctrlrange in the MJCF (a larger force is clipped: zero grad)
    track_limit = 2.5  # |x| beyond this ends the episode (the cart leaves the picture)
    start_qpos_noise = math.pi / 12
    start_qvel_noise = 0.05
    mjcf = ASSET
    torch_view = dict(floor=False, background=(0.1, 0.1, 0.12), light_dir=(0.3, 1.0, -0.6))  # as the Genesis scene

    def __init__(
        self,
        num_envs: int,
        device: torch.device,
        image_size: tuple[int, int] | None = (84, 84),
        renderer: str = "rasterizer",
        requires_grad: bool = True,
        seed: int = 0,
        precision: str = "32",
    ):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs, self.device, self.requires_grad = num_envs, device, requires_grad
        self.image_size = image_size
        gs = init_genesis(device, precision)
        self.float_dtype = gs.tc_float
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

        lights = [dict(type="directional", dir=(0.3, 1.0, -0.6), color=(1.0, 1.0, 1.0), intensity=4.0)]
        self.scene = gs.Scene(
            sim_options=gs.options.SimOptions(dt=self.dt, substeps=self.substeps, requires_grad=requires_grad),
            rigid_options=gs.options.RigidOptions(
                enable_collision=False, integrator=gs.integrator.approximate_implicitfast
            ),
            vis_options=gs.options.VisOptions(
                split_envs=True, shadow=False, ambient_light=(0.4, 0.4, 0.4),
                background_color=(0.1, 0.1, 0.12), lights=lights,
            ),
            renderer=gs.renderers.BatchRenderer(use_rasterizer=True) if renderer == "batch"
            else gs.renderers.Rasterizer(),
            show_viewer=False,
        )
        self.robot = self.scene.add_entity(gs.morphs.MJCF(file=str(ASSET)))
        self.camera = self.ray_caster = None
        if image_size is not None:
            height, width = image_size
            # Frame the track: |x| <= 2.8 m fills the width whatever the aspect ratio (fov is vertical).
            fov = 40.0
            distance = 2.8 / ((width / height) * math.tan(math.radians(fov / 2)))
            self.camera_fov, self.camera_position = fov, (0.0, -distance, 0.0)
        if image_size is not None and renderer != "torch":
            check_camera_width(width, renderer)
            if renderer == "batch":
                self.scene.add_light(pos=(0.0, -5.0, 3.0), dir=(0.3, 1.0, -0.6), intensity=4.0, directional=True,
                                     castshadow=False)
            self.camera = self.scene.add_camera(
                res=(width, height), pos=self.camera_position, lookat=(0.0, 0.0, 0.0), fov=fov, GUI=False,
                near=0.5, far=distance + 5.0,
            )
        self.scene.build(n_envs=num_envs)
        self.rigid = self.scene.sim.rigid_solver
        if image_size is not None and renderer == "torch":
            self.ray_caster = self.torch_renderer()
        self.dofs = [self.robot.get_joint("slider").dofs_idx_local[0], self.robot.get_joint("hinge").dofs_idx_local[0]]
        self.motor_dofs = self.dofs[:1]
        self.progress = torch.zeros(num_envs, dtype=torch.long, device=device)
        # Genesis caches a view of its force buffer on first use, and a view made under no_grad cannot be written in
        # grad mode later: make that first use one differentiable step.
        with torch.enable_grad():
            self.step(torch.zeros(num_envs, self.act_dim, device=device, requires_grad=requires_grad))
        self.reset()

    # ----------------------------------------------------------------------------------------------- state
    def _read_state(self):
        """Latest (qpos, qvel) as (N, 2) each: differentiable in grad mode, plain reads under torch.no_grad()."""
        if self.requires_grad and torch.is_grad_enabled():
            state = self.rigid.get_state()
            qpos, qvel = state.qpos[:, self.dofs], state.dofs_vel[:, self.dofs]
        else:
            qpos = self.robot.get_dofs_position(self.dofs)
            qvel = self.robot.get_dofs_velocity(self.dofs)
        # A blown-up env must not put NaN into the shared loss; it is terminated below.
        self.finite = torch.isfinite(qpos).all(-1) & torch.isfinite(qvel).all(-1)
        self.qpos = torch.nan_to_num(qpos, nan=0.0, posinf=0.0, neginf=0.0)
        self.qvel = torch.nan_to_num(qvel, nan=0.0, posinf=0.0, neginf=0.0)

    def critic_obs(self) -> torch.Tensor:
        x, theta = self.qpos[:, 0], self.qpos[:, 1]
        xdot, thetadot = self.qvel[:, 0], self.qvel[:, 1]
        return torch.stack([x, xdot, torch.sin(theta), torch.cos(theta), thetadot], dim=-1)

    def pole_angle(self) -> torch.Tensor:
        """Wrapped pole angle (0 = upright), detached: for success metrics."""
        return wrap_angle(self.qpos[:, 1].detach())

    # ----------------------------------------------------------------------------------------------- step
    def step(self, actions: torch.Tensor):
        """Apply `actions` in [-1, 1] as cart forces for one control step (1/60 s).

        Returns (reward, terminated, truncated), each (N,). `reward` is differentiable w.r.t. the actions.
        """
        force = actions.to(self.device).clamp(-1.0, 1.0).reshape(self.num_envs, 1) * self.force_limit
        # The force dtype must equal the scene precision, or Genesis returns a zero gradient without error.
        self.robot.control_dofs_force(force.to(self.float_dtype), self.motor_dofs)
        self._simulate()
        self.progress += 1
        self._read_state()
        x, theta = self.qpos[:, 0], self.qpos[:, 1]
        reward = cartpole_reward(x, self.qvel[:, 0], theta, self.qvel[:, 1])
        blown_up = self.broken_envs() | (self.qpos.abs() > 1e6).any(-1)
        terminated = (x.detach().abs() > self.track_limit) | blown_up
        truncated = (self.progress >= self.max_episode_length) & ~terminated
        return reward, terminated, truncated

    # ----------------------------------------------------------------------------------------------- resets
    def random_start(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(qpos, qvel) of `n` new episodes: the pole hanging down, uniform noise on both joints."""
        qpos = self.uniform(n, 2, scale=self.start_qpos_noise)
        qpos[:, 1] -= math.pi
        return qpos, self.uniform(n, 2, scale=self.start_qvel_noise)

    def set_state(self, qpos: torch.Tensor, qvel: torch.Tensor, env_ids: torch.Tensor | None = None):
        """Put `env_ids` (all if None) at ([x, theta], [xdot, thetadot]), episode step 0; cuts the gradient tape."""
        if env_ids is None:
            env_ids = torch.arange(self.num_envs, device=self.device)
        if len(env_ids) > 0:
            with torch.no_grad():
                self.robot.set_dofs_position(qpos.to(self.device, self.float_dtype), self.dofs, envs_idx=env_ids,
                                             zero_velocity=False)
                self.robot.set_dofs_velocity(qvel.to(self.device, self.float_dtype), self.dofs, envs_idx=env_ids)
            self.progress[env_ids] = 0
        self.cut_graph()

    # ----------------------------------------------------------------------------------------------- evaluation
    def score_step(self, t: int, steps: int, alive: torch.Tensor) -> torch.Tensor:
        """1 for each of the last 60 evaluation steps in which the pole is 0.3 rad or more from upright."""
        return ((t >= steps - 60) & (self.pole_angle().abs() >= 0.3)).float()

    def score(self, total: torch.Tensor, alive: torch.Tensor, steps: int) -> torch.Tensor:
        """Success: the pole stayed within 0.3 rad of upright over the last 60 steps, and the cart on the track."""
        return ((total == 0) & alive).float()

    # ----------------------------------------------------------------------------------------------- images
    def camera_pose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each env's camera position and look-at point (N, 3): the same fixed camera for all."""
        if self.image_size is None:
            raise RuntimeError("this task was built without a camera (image_size=None)")
        pos = torch.tensor(self.camera_position, device=self.device).expand(self.num_envs, 3)
        return pos, torch.zeros_like(pos)
