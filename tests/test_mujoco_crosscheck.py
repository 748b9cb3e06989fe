"""Our tasks against MuJoCo: the same model, the same start, the same open-loop actions, for one second.

Two things are checked, and together they tie the Genesis tasks to the dynamics DiffRL simulates:
1. The MJCF, compiled by MuJoCo, has DiffRL's effective parameters (masses, damping, armature, gear), as
   docs/tasks.md derives them from DiffRL's code. A wrong damping, armature, mass or gear in the model fails here.
2. Genesis, driven through the task's own `set_state` and `step` (its force scaling, control dt and substeps), follows
   MuJoCo's trajectory of that model integrated with the same scheme (semi-implicit Euler at the task's substep,
   MuJoCo's `Euler`). A wrong dt, force scale, or a term Genesis reads differently from MuJoCo fails here.

The bound, 1e-4 (m or rad) over one second, is fp32 round-off and the two engines' small differences in the same
scheme (measured: at most 1e-6 for both; printed by the tests). It separates: MuJoCo itself, run with one parameter
as the previous models had it (armature 0.1, no damping, or the torque at twice its scale), leaves it by more than
an order of magnitude (asserted; measured 470-5900x). For the record the tests also print each trajectory's distance
to RK4 at 1/1200 s, the discretisation error: the cart-pole at 4 x 1/240 s is dflex's own scheme, the hopper at 2 x
1/120 s is coarser than dflex's 16 x 1/960 s (docs/tasks.md).
"""

import math

import mujoco
import numpy as np
import pytest
import torch

SECONDS = 1.0


BOUND = 1e-4


def mujoco_rollout(model, qpos0, qvel0, controls, control_dt, substeps, integrator=mujoco.mjtIntegrator.mjINT_EULER):
    """Integrate the MJCF holding each control for one control step (`substeps` steps); qpos after every step."""
    model.opt.timestep = control_dt / substeps
    model.opt.integrator = integrator
    data = mujoco.MjData(model)
    data.qpos[:], data.qvel[:] = qpos0, qvel0
    out = []
    for ctrl in controls:
        data.ctrl[:] = ctrl
        for _ in range(substeps):
            mujoco.mj_step(model, data)
        out.append(data.qpos.copy())
    return np.array(out)


def mujoco_controls(task, model, actions):
    """The MuJoCo ctrl that gives the torques the task applies (torque = action x the task's strength; MuJoCo's is
    ctrl x gear), actuator by actuator."""
    joints = getattr(task, "motor_joints", ("slider",))
    strengths = task.strengths if hasattr(task, "strengths") else (task.force_limit,)
    ctrl = np.zeros((len(actions), model.nu))
    for i in range(model.nu):
        j = joints.index(model.joint(model.actuator_trnid[i, 0]).name)
        ctrl[:, i] = actions[:, j] * strengths[j] / model.actuator_gear[i, 0]
    return ctrl


def genesis_rollout(task, qpos0, qvel0, actions):
    """The task from the same start (env 0; the others copy it), stepped with the same actions; qpos per step."""
    n = task.num_envs
    out = []
    with torch.no_grad():
        task.set_state(torch.tensor(qpos0).float().repeat(n, 1), torch.tensor(qvel0).float().repeat(n, 1))
        for action in actions:
            task.step(torch.tensor(action).float().repeat(n, 1))
            out.append(task.qpos[0].double().numpy().copy())
    with torch.enable_grad():
        task.reset()  # leave the shared scene on a fresh, differentiable tape
    return np.array(out)


def open_loop_actions(steps, dims, amplitude, seed=0):
    """Smooth, different sinusoids per motor, well inside [-1, 1]."""
    rng = np.random.default_rng(seed)
    freq, phase = rng.uniform(0.5, 2.0, dims), rng.uniform(0, 2 * math.pi, dims)
    t = np.arange(steps)[:, None] / 60.0
    return amplitude * np.sin(2 * math.pi * freq * t + phase)


# ----------------------------------------------------------------------------------------------------------- cart-pole
def test_cartpole_model_has_diffrl_parameters(task):
    m = mujoco.MjModel.from_xml_path(str(task.mjcf))
    cart, pole = m.body("cart").id, m.body("pole").id
    # DiffRL's cartpole.urdf collision boxes at density 1000 (utils/load_utils.py urdf_add_collision -> add_shape_box)
    assert m.body_mass[cart] == pytest.approx(0.5 * 0.5 * 0.2 * 1000)
    assert m.body_mass[pole] == pytest.approx(0.05 * 0.05 * 1.0 * 1000)
    assert m.body_ipos[pole][2] == pytest.approx(0.5)
    assert m.body_inertia[pole][1] == pytest.approx(2.5 * (0.05**2 + 1.0**2) / 12, rel=1e-6)
    assert np.allclose(m.dof_damping, [1.0, 1.0])  # urdf_load(..., limit_kd=1.): -limit_kd * qd on both joints
    assert np.allclose(m.dof_armature, [0.01, 0.01])  # ModelBuilder.add_link's default armature
    assert m.actuator_gear[0, 0] == pytest.approx(task.force_limit) and task.force_limit == 1000.0
    assert task.dt == pytest.approx(1 / 60) and task.substeps == 4  # envs/cartpole_swing_up.py: sim_substeps = 4


def mujoco_model(path):
    """The MJCF compiled by MuJoCo, with the dflex inertias the tasks give Genesis (`dflex_inertias`: the model's
    `dflex_inertia:BODY` entries, which MuJoCo's compiler cannot take as inertials) written into the compiled model
    as principal moments and axes; models without such entries are left as compiled."""
    from common.locomotion import dflex_inertias

    m = mujoco.MjModel.from_xml_path(str(path))
    for body, inertia in dflex_inertias(path).items():
        moments, axes = np.linalg.eigh(inertia)
        axes[:, 2] *= np.linalg.det(axes)  # a proper rotation
        quat = np.zeros(4)
        mujoco.mju_mat2Quat(quat, axes.flatten())
        m.body(body).inertia[:], m.body(body).iquat[:] = np.maximum(moments, 0.0), quat
        m.body_sameframe[m.body(body).id] = 0  # else MuJoCo keeps using the body's frame as the inertial one
    return m


def compare(task, qpos0, qvel0, actions, wrong_models, label):
    """Genesis vs MuJoCo (same scheme) within BOUND; each wrong model at least 10 x BOUND away from the right one."""
    m = mujoco_model(task.mjcf)
    ctrl = mujoco_controls(task, m, actions)
    reference = mujoco_rollout(m, qpos0, qvel0, ctrl, task.dt, task.substeps)
    ours = genesis_rollout(task, qpos0, qvel0, actions)
    error = np.abs(ours - reference).max(0)
    rk4 = mujoco_rollout(mujoco_model(task.mjcf), qpos0, qvel0, ctrl, task.dt, 20, mujoco.mjtIntegrator.mjINT_RK4)
    print(f"\n{label}: max |Genesis - MuJoCo| over {SECONDS} s per qpos: " + " ".join(f"{e:.1e}" for e in error)
          + "; discretisation (vs RK4 at 1/1200 s): " + " ".join(f"{e:.1e}" for e in np.abs(reference - rk4).max(0)))
    assert (error < BOUND).all(), error
    assert np.abs(reference[-1] - qpos0).max() > 0.3  # the trajectory goes somewhere (the check is not vacuous)
    for name, wrong in wrong_models.items():
        off = np.abs(mujoco_rollout(wrong, qpos0, qvel0, ctrl, task.dt, task.substeps) - reference).max()
        assert off > 10 * BOUND, (name, off)
    return reference


def edited(path, **fields):
    """`mujoco_model(path)` with some of its arrays overwritten (a planted parameter error)."""
    m = mujoco_model(path)
    for field, value in fields.items():
        getattr(m, field)[:] = value
    return m


def test_cartpole_follows_mujoco_for_one_second(task):
    actions = open_loop_actions(int(SECONDS / task.dt), 1, 0.6)
    qpos0, qvel0 = np.array([0.1, -math.pi + 0.2]), np.array([0.3, -0.5])
    wrong = {"armature 0.1": edited(task.mjcf, dof_armature=0.1), "no damping": edited(task.mjcf, dof_damping=0.0)}
    compare(task, qpos0, qvel0, actions, wrong, "cart-pole")


# ----------------------------------------------------------------------------------------------------------- hopper
HOPPER_LIFT = 3.0  # m above the start pose, with an upward velocity: one second of flight, no contact


def test_hopper_model_has_diffrl_parameters(hopper):
    m = mujoco.MjModel.from_xml_path(str(hopper.mjcf))
    # envs/hopper.py: parse_mjcf(density=1000, damping=2, limit_kd=10, armature=1); the root joints' own damping 0
    assert np.allclose(m.dof_armature, 1.0)
    assert np.allclose(m.dof_damping, [10, 10, 10, 12, 12, 12])
    assert np.allclose(m.actuator_gear[:, 0], 200.0) and np.allclose(hopper.strength.numpy(), 200.0)
    capsule = lambda r, length: 1000 * math.pi * r**2 * (length + 4 * r / 3)  # noqa: E731
    expected = [capsule(0.05, 0.4), capsule(0.05, 0.45), capsule(0.04, 0.5), capsule(0.06, 0.39)]
    assert np.allclose(m.body_mass[1:], expected, rtol=1e-6)
    assert np.allclose(m.geom_friction[:, 0], 0.9)


def test_hopper_flight_follows_mujoco_for_one_second(hopper):
    actions = open_loop_actions(int(SECONDS / hopper.dt), 3, 0.05, seed=1)
    qpos0 = np.array([0.0, HOPPER_LIFT, 0.1, -0.6, -0.7, 0.1])  # [x, z, pitch, thigh, leg, foot], inside the limits
    qvel0 = np.array([0.5, 2.0, -0.3, 0.2, 0.1, -0.2])
    wrong = {"damping 1, none at the root": edited(hopper.mjcf, dof_damping=[0, 0, 0, 1, 1, 1]),
             "torque x 2": edited(hopper.mjcf, actuator_gear=np.array([[400.0, 0, 0, 0, 0, 0]] * 3))}
    reference = compare(hopper, qpos0, qvel0, actions, wrong, "hopper flight [x, z, pitch, thigh, leg, foot]")
    assert reference[:, 1].min() > 0.5  # it stayed in the air (0 is the start height): no floor contact in Genesis


def test_humanoid_flight_follows_mujoco_for_one_second(humanoid):
    """DiffRL's humanoid has joint springs (stiffness 2-20) and per-joint armature: Genesis must read them as MuJoCo
    does. Free flight from 3 m up, thrown upwards; the free joint's quaternion is compared as part of qpos. (The
    start has no angular velocity of the root: MuJoCo and Genesis express it in different frames.)"""
    actions = open_loop_actions(int(SECONDS / humanoid.dt), humanoid.act_dim, 0.1, seed=2)
    qpos0 = humanoid.start_qpos.double().numpy().copy()
    qpos0[2] += 3.0
    low, high = mujoco.MjModel.from_xml_path(str(humanoid.mjcf)).jnt_range[1:].T
    qpos0[7:] = (low + high) / 2  # away from the limits (whose soft constraints the two engines model differently)
    qvel0 = np.zeros(humanoid.robot.n_dofs)
    qvel0[2] = 3.0
    qvel0[6:] = np.random.default_rng(4).uniform(-0.3, 0.3, humanoid.act_dim)
    wrong = {"no stiffness": edited(humanoid.mjcf, jnt_stiffness=0.0),
             "MuJoCo's inertias": mujoco.MjModel.from_xml_path(str(humanoid.mjcf))}
    reference = compare(humanoid, qpos0, qvel0, actions, wrong, "humanoid flight")
    assert reference[:, 2].min() > 1.5


# DiffRL envs/assets/humanoid.xml, per joint (the side suffix dropped): its own damping, stiffness, armature and range
# in degrees, or parse_mjcf's defaults where it has none (envs/humanoid.py: damping 0.1, stiffness 5, armature 0.007).
DIFFRL_HUMANOID_JOINTS = {
    "abdomen_z": (5, 20, 0.02, (-45, 45)), "abdomen_y": (5, 20, 0.01, (-75, 30)), "abdomen_x": (5, 10, 0.01, (-35, 35)),
    "hip_x": (5, 10, 0.01, (-25, 5)), "hip_z": (5, 10, 0.01, (-60, 35)), "hip_y": (5, 20, 0.01, (-80, 20)),
    "knee": (0.1, 5, 0.007, (-160, 2)), "ankle_y": (1, 2, 0.006, (-50, 50)), "ankle_x": (1, 2, 0.006, (-50, 50)),
    "shoulder1": (5, 10, 0.01, (-60, 60)), "shoulder2": (5, 10, 0.01, (-60, 60)), "elbow": (1, 2, 0.006, (-90, 50)),
}
LIMIT_KD = 10.0  # parse_mjcf(limit_kd=10) in envs/{hopper,ant,humanoid}.py: dflex adds -limit_kd * qd at every step


def test_ant_and_humanoid_models_have_diffrl_parameters(ant, humanoid):
    m = mujoco.MjModel.from_xml_path(str(ant.mjcf))
    assert np.allclose(m.dof_damping[6:], 1.0 + LIMIT_KD) and np.allclose(m.dof_armature[6:], 0.05)
    assert np.allclose(m.jnt_stiffness, 0.0) and np.allclose(m.geom_friction[:, 0], 0.75)
    capsule = 1000 * math.pi * 0.08**2 * (math.sqrt(0.08) + 4 * 0.08 / 3)  # the four 0.28 m aux capsules, r 0.08
    assert m.body_mass[m.body("torso").id] == pytest.approx(1000 * 4 / 3 * math.pi * 0.25**3 + 4 * capsule)
    assert np.allclose(m.actuator_gear[:, 0], 200.0) and np.allclose(ant.strength.numpy(), 200.0)

    m = mujoco.MjModel.from_xml_path(str(humanoid.mjcf))
    for j in range(1, m.njnt):
        name = m.joint(j).name.removesuffix("_right").removesuffix("_left")
        damping, stiffness, armature, (low, high) = DIFFRL_HUMANOID_JOINTS[name]
        dof = m.jnt_dofadr[j]
        assert m.dof_damping[dof] == pytest.approx(damping + LIMIT_KD), name
        assert m.jnt_stiffness[j] == pytest.approx(stiffness), name
        assert m.dof_armature[dof] == pytest.approx(armature), name
        assert np.allclose(np.degrees(m.jnt_range[j]), [low, high]), name
    assert m.ntendon == 0 and np.allclose(m.geom_friction[:, 0], 0.75)
    # envs/humanoid.py: motor_strengths x motor_scale 0.35; the MJCF's gears are the strengths
    shac = [200, 200, 200, 200, 200, 600, 400, 100, 100, 200, 200, 600, 400, 100, 100, 100, 100, 200, 100, 100, 200]
    assert np.allclose(humanoid.strength.numpy(), 0.35 * np.array(shac))
    for i in range(m.nu):
        j = humanoid.motor_joints.index(m.joint(m.actuator_trnid[i, 0]).name)
        assert m.actuator_gear[i, 0] == pytest.approx(shac[j])
    assert humanoid.start_height == 1.35 and humanoid.heading_target == (200.0, 0.0)
