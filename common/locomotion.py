"""Hopper, ant and humanoid on Genesis: batches of differentiable envs with a camera that follows each torso.

The same API as `common.cartpole.CartpoleTask` (`common.task.Task`), so the D.Va loop runs on them unchanged:

    task = make_task("hopper", num_envs, device, image_size=(64, 64))   # common/tasks.py
    reward, terminated, truncated = task.step(actions)   # actions (N, act_dim) in [-1, 1], differentiable
    task.critic_obs(); task.render(); task.backward(loss); task.reset(ended_env_ids)

Rewards and terminations are SHAC's (DiffRL `envs/{hopper,ant,humanoid}.py`, docs/tasks.md),
written for Genesis's z-up world: forward is +x, "up" is the torso's z axis dotted with world z, "heading" its x axis
dotted with the direction to a far target on +x. The critic's state follows SHAC's layouts:
    hopper   (11): [z, pitch, 3 joint pos, vx, vz, pitch rate, 3 joint vel] with z the torso's height change from
                   the start pose (SHAC's convention, terminated below -0.45)
    ant      (37): [h, quat (4), lin vel (3), ang vel (3), 8 joint pos, 0.1 x 8 joint vel, up, heading, prev (8)]
    humanoid (76): the ant's layout with 21 joints.
The models (common/assets/*.xml) carry the masses, damping, armature, stiffness, limits, gears and friction that
DiffRL's dflex really simulates, and the start states are DiffRL's: docs/tasks.md lists every parameter against its
source. One control step is 1/60 s (SHAC's), simulated in `substeps` Genesis substeps for contact stability.
"""

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

from common.diff_render import quat_to_matrix
from common.genesis_setup import check_camera_width, init_genesis, low_poly_visuals
from common.task import Task

ASSETS = Path(__file__).parent / "assets"


def quat_rotate(quat: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """Rotate `vec` (..., 3) by unit quaternions `quat` (..., 4) in Genesis's (w, x, y, z) order."""
    w, xyz, vec = quat[..., :1], quat[..., 1:], vec.to(quat)
    t = 2.0 * torch.cross(xyz, vec.expand_as(xyz), dim=-1)
    return vec + w * t + torch.cross(xyz, t, dim=-1)


def quat_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of quaternions in (w, x, y, z) order."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def dflex_inertias(mjcf: Path) -> dict[str, np.ndarray]:
    """{body name: 3 x 3 inertia about its centre of mass, in the body's axes} from the model's
    `<numeric name="dflex_inertia:BODY" data="Ixx Iyy Izz Ixy Ixz Iyz"/>` entries: the inertias dflex simulates,
    which MuJoCo's compiler cannot hold (some break the triangle inequality A + B >= C; docs/tasks.md)."""
    inertias = {}
    for numeric in ET.parse(mjcf).getroot().iter("numeric"):
        kind, _, body = numeric.attrib["name"].partition(":")
        if kind == "dflex_inertia":
            xx, yy, zz, xy, xz, yz = (float(v) for v in numeric.attrib["data"].split())
            inertias[body] = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    return inertias


def height_reward(d: torch.Tensor, low: float, high: float, coeff: float) -> torch.Tensor:
    """SHAC's height term: d clipped to [low, high]; -200 d^2 below the target height, coeff * d above it."""
    d = d.clamp(low, high)
    return torch.where(d < 0, -200.0 * d**2, coeff * d)


def hopper_reward(z, pitch, vx, actions):
    """SHAC hopper: vx + height term (target 0.15 above the termination height -0.45) + 1 - (pitch / 30 deg)^2
    - 0.1 |a|^2. `z` is the torso's height change from the start pose."""
    return (vx + height_reward(z - (-0.45 + 0.15), -1.0, 0.3, 1.0) + 1.0 - (pitch / (math.pi / 6)) ** 2
            - 0.1 * (actions**2).sum(-1))


def ant_reward(h, up, heading, vx, actions):
    """SHAC ant: vx + 0.1 up + heading + (h - 0.27); no action penalty."""
    return vx + 0.1 * up + heading + (h - 0.27)


def humanoid_reward(h, up, heading, vx, actions):
    """SHAC humanoid: vx + 0.1 up + heading + height term (target 0.84, 10 x above) - 0.002 |a|^2."""
    return vx + 0.1 * up + heading + height_reward(h - 0.84, -1.0, 0.1, 10.0) - 0.002 * (actions**2).sum(-1)


class LocomotionTask(Task):
    """The shared machinery: scene, floor, tracking camera, state reads, resets, tape handling.

    A subclass gives the model, the motors and their strengths, the start pose, the reward, the termination and the
    critic's state.
    """

    name: str
    asset: str
    motor_joints: tuple[str, ...]
    strengths: tuple[float, ...]  # torque = action x strength, inside the MJCF's gear x ctrlrange (else zero grad)
    camera_offset: tuple[float, float, float]  # camera position relative to the torso (x, y) and the floor (z)
    camera_lookat_z: float
    camera_fov: float = 60.0
    friction: float  # dflex's contact_mu, the friction of every robot-floor contact
    max_episode_length = 1000
    dt = 1.0 / 60.0
    substeps = 2
    # contacts and joint limits softened from Genesis's 0.01 s: a loss SHAC's gradient can follow (docs/tasks.md)
    constraint_timeconst = 0.1
    limit_ke: float | None = None  # dflex's soft joint limits (N m / rad past the range); None: Genesis's hard ones
    start_qpos_noise = 0.05
    start_qvel_noise = 0.05
    vel_obs_scale = 0.1
    heading_target = (1e4, 0.0)
    torch_view = dict(floor=True)  # the torch renderer's scene: our checker floor, sky and light are its defaults
    episode_buffers = ("progress", "prev_actions")
    score_name = "forward_velocity"

    @property
    def mjcf(self) -> Path:
        return ASSETS / self.asset

    def __init__(
        self,
        num_envs: int,
        device: torch.device,
        image_size: tuple[int, int] | None = (84, 84),
        renderer: str = "rasterizer",
        requires_grad: bool = True,
        seed: int = 0,
        precision: str = "32",
        substeps: int | None = None,
        rigid_options: dict | None = None,
    ):
        """substeps (default: the class's) and rigid_options (extra `gs.options.RigidOptions` settings, e.g.
        constraint_timeconst, iterations, tolerance) change the contact model; benchmarks/contact_gradients.py
        measures their effect on the gradient."""
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if substeps is not None:
            self.substeps = substeps
        self.num_envs, self.device, self.requires_grad = num_envs, device, requires_grad
        self.image_size = image_size
        self.act_dim = len(self.motor_joints)
        gs = init_genesis(device, precision)
        self.float_dtype = gs.tc_float
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

        # A light from behind the camera (the -y side), so the side of the robot we see is lit.
        lights = [dict(type="directional", dir=(0.3, 1.0, -1.0), color=(1.0, 1.0, 1.0), intensity=3.0)]
        self.scene = gs.Scene(
            sim_options=gs.options.SimOptions(dt=self.dt, substeps=self.substeps, requires_grad=requires_grad),
            rigid_options=gs.options.RigidOptions(**{
                "integrator": gs.integrator.approximate_implicitfast, "enable_self_collision": False,
                "constraint_timeconst": self.constraint_timeconst, **(rigid_options or {})}),
            vis_options=gs.options.VisOptions(split_envs=True, shadow=False, ambient_light=(0.35, 0.35, 0.35),
                                              background_color=(0.55, 0.65, 0.8), lights=lights),
            renderer=gs.renderers.BatchRenderer(use_rasterizer=True) if renderer == "batch"
            else gs.renderers.Rasterizer(),
            show_viewer=False,
        )
        # A checker floor (0.5 m checks, repeating every 1 m): its motion in the tracking camera's images is the
        # policy's cue for speed. A contact takes the larger of its two geoms' frictions: the floor's equals the
        # robot's, so every contact has dflex's (which uses the robot shape's alone).
        self.scene.add_entity(gs.morphs.Plane(tile_size=(1.0, 1.0)),
                              material=gs.materials.Rigid(friction=self.friction))
        with low_poly_visuals():  # default primitive meshes have thousands of faces: 5-10x slower CPU renders
            self.robot = self.scene.add_entity(gs.morphs.MJCF(file=str(ASSETS / self.asset)))
        self.camera = self.ray_caster = None
        if image_size is not None and renderer != "torch":
            height, width = image_size
            check_camera_width(width, renderer)
            if renderer == "batch":
                self.scene.add_light(pos=(0.0, -5.0, 5.0), dir=(0.3, 1.0, -1.0), intensity=3.0, directional=True,
                                     castshadow=False)
            self.camera = self.scene.add_camera(res=(width, height), pos=self.camera_offset,
                                                lookat=(0.0, 0.0, self.camera_lookat_z), fov=self.camera_fov,
                                                GUI=False, near=0.1, far=30.0)
        self.scene.build(n_envs=num_envs)
        self.rigid = self.scene.sim.rigid_solver
        if image_size is not None and renderer == "torch":
            self.ray_caster = self.torch_renderer()
        self.q_slice = slice(self.robot.q_start, self.robot.q_end)
        self.dof_slice = slice(self.robot.dof_start, self.robot.dof_end)
        # dflex's inertias in place of MuJoCo's (the same masses and centres of mass), in each link's inertial frame.
        for body, inertia in dflex_inertias(self.mjcf).items():
            link = self.robot.get_link(body)
            rotation = quat_to_matrix(torch.tensor(link.desc.inertial_quat, dtype=torch.float64)).numpy()
            link.set_inertia(rotation.T @ inertia @ rotation)
        self.torso = self.robot.get_link("torso").idx  # solver-global link index
        self.motor_dofs = [self.robot.get_joint(j).dofs_idx_local[0] for j in self.motor_joints]
        self.motor_qs = [self.robot.get_joint(j).qs_idx_local[0] for j in self.motor_joints]
        self.limit_spring = None  # (lower, upper, limit_ke) with dflex's soft joint limits
        if self.limit_ke is not None:
            # dflex's joint limits are springs, limit_ke x (limit - q) past the range (`sim.py:1455-1459`), added to
            # the motor torque in step(); Genesis's hard limit constraints are lifted, and its force clamp with them.
            lower, upper = (torch.as_tensor(x, dtype=torch.float32).reshape(-1, len(self.motor_dofs))[0].to(device)
                            for x in self.robot.get_dofs_limit(self.motor_dofs))
            self.limit_spring = (lower, upper, self.limit_ke)
            far = np.full(len(self.motor_dofs), 1e4)
            self.robot.set_dofs_limit(-far, far, self.motor_dofs)
            self.robot.set_dofs_force_range(-far, far, self.motor_dofs)
        self.strength = torch.tensor(self.strengths, device=device)
        self.start_qpos = torch.as_tensor(self.start_pose(), dtype=torch.float32)
        self.progress = torch.zeros(num_envs, dtype=torch.long, device=device)
        self.prev_actions = torch.zeros(num_envs, self.act_dim, device=device)
        # Genesis caches a view of its force buffer on first use, and a view made under no_grad cannot be written in
        # grad mode later: make that first use one differentiable step.
        self.reset()
        with torch.enable_grad():
            self.step(torch.zeros(num_envs, self.act_dim, device=device, requires_grad=requires_grad))
        self.reset()

    # ----------------------------------------------------------------------------------------------- per robot
    def start_pose(self) -> np.ndarray:
        """The robot's qpos at the start of an episode (before noise)."""
        raise NotImplementedError

    def reward_and_termination(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def critic_obs(self) -> torch.Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------- state
    def _read_state(self):
        """Latest qpos, qvel and torso pose: differentiable in grad mode, plain reads under torch.no_grad()."""
        if self.requires_grad and torch.is_grad_enabled():
            state = self.rigid.get_state()
            qpos, qvel = state.qpos[:, self.q_slice], state.dofs_vel[:, self.dof_slice]
            torso_pos, torso_quat = state.links_pos[:, self.torso], state.links_quat[:, self.torso]
        else:
            qpos, qvel = self.robot.get_qpos(), self.robot.get_dofs_velocity()
            torso_pos = self.rigid.get_links_pos(self.torso)[:, 0]
            torso_quat = self.rigid.get_links_quat(self.torso)[:, 0]
        if self.num_envs == 1 and qpos.dim() == 1:
            qpos, qvel = qpos[None], qvel[None]
        # A blown-up env must not put NaN into the shared loss; it is terminated in step().
        parts = [qpos, qvel, torso_pos, torso_quat]
        self.finite = torch.stack([torch.isfinite(p).all(-1) for p in parts]).all(0)
        self.qpos, self.qvel, self.torso_pos, self.torso_quat = (
            torch.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0) for p in parts)

    def up_and_heading(self) -> tuple[torch.Tensor, torch.Tensor]:
        """up = torso z axis . world z; heading = torso x axis . (unit vector to the target on +x, in the floor plane)."""
        up = quat_rotate(self.torso_quat, torch.tensor([0.0, 0.0, 1.0], device=self.device))[:, 2]
        forward = quat_rotate(self.torso_quat, torch.tensor([1.0, 0.0, 0.0], device=self.device))[:, :2]
        to_target = torch.tensor(self.heading_target, device=self.device) - self.torso_pos[:, :2].detach()
        return up, (forward * torch.nn.functional.normalize(to_target, dim=-1)).sum(-1)

    def forward_velocity(self) -> torch.Tensor:
        """Detached torso velocity along +x, for logging (`charts/eval_forward_velocity`)."""
        return self.qvel[:, 0].detach()

    # ----------------------------------------------------------------------------------------------- step
    def step(self, actions: torch.Tensor):
        """Apply `actions` in [-1, 1] as joint torques (action x strength) for one control step (1/60 s).

        Returns (reward, terminated, truncated), each (N,). `reward` is differentiable w.r.t. the actions.
        """
        actions = actions.to(self.device).clamp(-1.0, 1.0).reshape(self.num_envs, self.act_dim)
        torque = actions * self.strength
        if self.limit_spring is not None:  # dflex's soft limits, from the state at the start of the step
            (lower, upper, ke), q = self.limit_spring, self.qpos[:, self.motor_qs]
            torque = torque + ke * ((lower - q).clamp(min=0) - (q - upper).clamp(min=0))
        # The force dtype must equal the scene precision, or Genesis returns a zero gradient without error.
        self.robot.control_dofs_force(torque.to(self.float_dtype), self.motor_dofs)
        self._simulate()
        self.progress += 1
        self._read_state()
        reward, fallen = self.reward_and_termination(actions)
        self.prev_actions = actions
        blown_up = self.broken_envs() | (self.qvel.detach().abs() > 1e4).any(-1)
        terminated = fallen | blown_up
        truncated = (self.progress >= self.max_episode_length) & ~terminated
        return torch.where(blown_up, 0.0, reward), terminated, truncated

    # ----------------------------------------------------------------------------------------------- resets
    def random_start(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(qpos, qvel) of `n` new episodes: the start pose plus uniform noise on every coordinate (the hopper's)."""
        qpos = self.start_qpos.repeat(n, 1) + self.uniform(n, len(self.start_qpos), scale=self.start_qpos_noise)
        return qpos, self.uniform(n, self.robot.n_dofs, scale=self.start_qvel_noise)

    def set_state(self, qpos: torch.Tensor, qvel: torch.Tensor, env_ids: torch.Tensor | None = None):
        """Put `env_ids` (all if None) at (qpos, qvel), episode step 0; cuts the gradient tape."""
        if env_ids is None:
            env_ids = torch.arange(self.num_envs, device=self.device)
        if len(env_ids) > 0:
            with torch.no_grad():
                self.robot.set_qpos(qpos.to(self.device, self.float_dtype), envs_idx=env_ids, zero_velocity=False)
                self.robot.set_dofs_velocity(qvel.to(self.device, self.float_dtype), envs_idx=env_ids)
            self.progress[env_ids] = 0
            self.prev_actions[env_ids] = 0.0
        self.cut_graph()

    # ----------------------------------------------------------------------------------------------- evaluation
    def score_step(self, t: int, steps: int, alive: torch.Tensor) -> torch.Tensor:
        """The torso's forward velocity while the env is alive (a robot that falls stops walking, not the clock)."""
        return torch.where(alive, self.forward_velocity(), 0.0)

    def score(self, total: torch.Tensor, alive: torch.Tensor, steps: int) -> torch.Tensor:
        """Forward velocity: the distance walked over the evaluation's full duration (m/s)."""
        return total / steps

    # ----------------------------------------------------------------------------------------------- images
    def camera_pose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each env's camera position and look-at point (N, 3): beside the torso in the floor plane, at a fixed
        height (so the robot's height shows in the image). Differentiable w.r.t. the torso position."""
        x, y = self.torso_pos[:, 0], self.torso_pos[:, 1]
        height, lookat_z = torch.full_like(x, self.camera_offset[2]), torch.full_like(x, self.camera_lookat_z)
        pos = torch.stack([x + self.camera_offset[0], y + self.camera_offset[1], height], -1)
        return pos, torch.stack([x, y, lookat_z], -1)

    def _place_cameras(self):
        """The Genesis camera of each env follows its torso (`camera_pose()`)."""
        pos, lookat = (p.cpu().double().numpy() for p in self.camera_pose())
        self.camera.set_pose(pos=pos, lookat=lookat, envs_idx=np.arange(self.num_envs))


class HopperTask(LocomotionTask):
    name = "hopper"
    asset = "hopper.xml"
    motor_joints = ("thigh_joint", "leg_joint", "foot_joint")
    strengths = (200.0, 200.0, 200.0)
    friction = 0.9
    limit_ke = 1000.0  # dflex's soft joint limits (DiffRL's hopper.py): state SHAC hops faster with them (docs/tasks.md)
    camera_offset = (0.0, -2.2, 0.75)
    camera_lookat_z = 0.8
    critic_obs_dim = 11

    def start_pose(self):
        return np.zeros(6)  # [x, z, pitch, thigh, leg, foot]: Genesis reads a slide joint relative to its spawn

    def reward_and_termination(self, actions):
        z, pitch, vx = self.qpos[:, 1], self.qpos[:, 2], self.qvel[:, 0]
        return hopper_reward(z, pitch, vx, actions), z.detach() < -0.45

    def critic_obs(self):
        return torch.cat([self.qpos[:, 1:], self.qvel], dim=-1)


class AntTask(LocomotionTask):
    name = "ant"
    asset = "ant.xml"
    motor_joints = ("hip_1", "ankle_1", "hip_2", "ankle_2", "hip_3", "ankle_3", "hip_4", "ankle_4")
    strengths = (200.0,) * 8
    friction = 0.75
    limit_ke = 1000.0  # dflex's soft joint limits (DiffRL's ant.py): state SHAC walks further with them (docs/tasks.md)
    camera_offset = (0.5, -2.0, 1.6)  # the authors' ant camera: 0.5 m ahead, 2 m aside, 1 m above a 0.6 m torso
    camera_lookat_z = 0.6
    critic_obs_dim = 37
    start_height = 0.75
    termination_height = 0.27
    reward_fn = staticmethod(ant_reward)

    def start_pose(self):
        # DiffRL's start: legs inside their joint limits (Genesis's bundled pose is outside them and launches the ant)
        return np.array([0.0, 0.0, self.start_height, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0, -1.0, 0.0, 1.0])

    def random_start(self, n):
        """DiffRL's: torso position +-0.1 m, a tilt of up to pi/24 about a random axis, joints +-0.2 rad, every
        velocity +-0.25."""
        qpos = self.start_qpos.repeat(n, 1)
        qpos[:, :3] += self.uniform(n, 3, scale=0.1)
        half_angle = self.uniform(n, 1, scale=math.pi / 24) / 2
        axis = torch.nn.functional.normalize(torch.rand(n, 3, generator=self.generator) - 0.5, dim=-1)
        qpos[:, 3:7] = quat_mul(qpos[:, 3:7], torch.cat([torch.cos(half_angle), torch.sin(half_angle) * axis], -1))
        qpos[:, 7:] += self.uniform(n, qpos.shape[1] - 7, scale=0.2)
        return qpos, self.uniform(n, self.robot.n_dofs, scale=0.25)

    def reward_and_termination(self, actions):
        up, heading = self.up_and_heading()
        h = self.torso_pos[:, 2]
        reward = self.reward_fn(h, up, heading, self.qvel[:, 0], actions)
        return reward, h.detach() < self.termination_height

    def critic_obs(self):
        up, heading = self.up_and_heading()
        return torch.cat([self.torso_pos[:, 2:3], self.torso_quat, self.qvel[:, :6], self.qpos[:, 7:],
                          self.vel_obs_scale * self.qvel[:, 6:], up[:, None], heading[:, None], self.prev_actions],
                         dim=-1)


class HumanoidTask(AntTask):
    name = "humanoid"
    asset = "humanoid.xml"
    motor_joints = ("abdomen_z", "abdomen_y", "abdomen_x", "hip_x_right", "hip_z_right", "hip_y_right",
                    "knee_right", "ankle_y_right", "ankle_x_right", "hip_x_left", "hip_z_left", "hip_y_left",
                    "knee_left", "ankle_y_left", "ankle_x_left", "shoulder1_right", "shoulder2_right", "elbow_right",
                    "shoulder1_left", "shoulder2_left", "elbow_left")
    # SHAC's motor strengths (the MJCF's gears) x its motor scale 0.35: the torques stay inside gear x ctrlrange.
    gears = (200, 200, 200, 200, 200, 600, 400, 100, 100, 200, 200, 600, 400, 100, 100, 100, 100, 200, 100, 100, 200)
    strengths = tuple(0.35 * g for g in gears)
    camera_offset = (0.0, -3.5, 1.1)
    camera_lookat_z = 0.9
    critic_obs_dim = 76
    start_height = 1.35
    termination_height = 0.74
    heading_target = (200.0, 0.0)  # DiffRL's humanoid heads for a point 200 m ahead (its ant for one 10 km ahead)
    reward_fn = staticmethod(humanoid_reward)
    limit_ke = None  # Genesis's joint limits, not the ant's springs: with them state SHAC does not run (docs/tasks.md)

    def start_pose(self):
        return np.concatenate([[0.0, 0.0, self.start_height, 1.0, 0.0, 0.0, 0.0], np.zeros(21)])

