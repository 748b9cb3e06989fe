"""The locomotion tasks' contact friction and body inertias against what DiffRL's dflex simulates.

dflex (NVlabs/DiffRL, `dflex/dflex/model.py`, `dflex/dflex/util.py`) and DiffRL's loader (`utils/load_utils.py`,
`parse_mjcf`) decide both, and neither is what MuJoCo would compile from the same model file:
- friction: a dflex ground contact uses the robot shape's `contact_mu` alone (hopper 0.9, ant and humanoid 0.75);
  Genesis gives a contact the larger of its two geoms' frictions, so the floor must not be above the robot's;
- inertias: dflex rotates a shape's inertia into its body with an element-wise product, `R * I * R.T`, and drops the
  off-diagonal terms of the body's running sum every time a shape is added, so a rotated capsule loses components
  (the humanoid's thighs and shins keep only their inertia about y).
The dflex formulas below are written from those files, not taken from the project's code.
"""

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

# DiffRL envs/hopper.py, ant.py, humanoid.py: parse_mjcf(..., contact_mu=...)
DFLEX_FRICTION = {"hopper": 0.9, "ant": 0.75, "humanoid": 0.75}


# ------------------------------------------------------------------------------------------------ dflex, by definition
def _normalize(v):  # dflex util.normalize: a zero vector stays zero
    n = np.linalg.norm(v)
    return v if n == 0.0 else v / n


def _quat_from_axis_angle(axis, angle):  # dflex quaternions are (x, y, z, w)
    return np.array([*(np.asarray(axis, float) * math.sin(angle / 2)), math.cos(angle / 2)])


def _quat_rotate(q, x):  # dflex util.quat_rotate
    w, v = q[3], q[:3]
    return x * (2.0 * w * w - 1.0) + np.cross(v, x) * w * 2.0 + v * np.dot(v, x) * 2.0


def _quat_to_matrix(q):  # dflex util.quat_to_matrix: the rotated unit vectors as columns
    return np.array([_quat_rotate(q, e) for e in np.eye(3)]).T


def _transform_inertia(m, inertia, p, q):  # dflex util.transform_inertia, element-wise products and all
    rot = _quat_to_matrix(q)
    return rot * inertia * rot.T + m * (np.dot(p, p) * np.eye(3) - np.outer(p, p))


def dflex_bodies(mjcf, density=1000.0):
    """{body: (mass, centre of mass in the MJCF body's frame, inertia about it in the body's axes)} as DiffRL's
    parse_mjcf and dflex's ModelBuilder (`add_shape_*`, `_update_body_mass`, `compute_*_inertia`) build them: each
    body's frame sits at its (last) joint, capsules given by `fromto` are turned from dflex's x axis onto it."""
    root = ET.parse(mjcf).getroot()
    geom_default = root.find("default").find("geom").attrib  # our models' one default geom type (capsule or none)

    def vec(node, key, default=None):
        return np.array([float(x) for x in node.attrib[key].split()]) if key in node.attrib else np.array(default)

    bodies = {}

    def walk(body):
        joints = body.findall("joint") + body.findall("freejoint")
        joint_pos = vec(joints[-1], "pos", (0.0, 0.0, 0.0)) if joints else np.zeros(3)
        mass, com, inertia = 0.0, np.zeros(3), np.zeros((3, 3))
        for geom in body.findall("geom"):
            radius = vec(geom, "size")[0]
            if geom.attrib.get("type", geom_default.get("type", "sphere")) == "sphere":
                pos, rot = vec(geom, "pos", (0.0, 0.0, 0.0)), np.array([0.0, 0.0, 0.0, 1.0])
                m = density * 4.0 / 3.0 * math.pi * radius**3
                shape_inertia = np.eye(3) * 0.4 * m * radius**2
            else:  # capsule from `fromto`, along dflex's x axis before rotation
                fromto = vec(geom, "fromto")
                start, end = fromto[:3], fromto[3:]
                axis = _normalize(end - start)
                angle = math.acos(np.dot(axis, (1.0, 0.0, 0.0)))
                pos = (start + end) * 0.5
                rot = _quat_from_axis_angle(_normalize(np.cross(axis, (1.0, 0.0, 0.0))), -angle)
                length = np.linalg.norm(end - start)
                ms = density * 4.0 / 3.0 * math.pi * radius**3
                mc = density * math.pi * radius**2 * length
                m = ms + mc
                ia = mc * (0.25 * radius**2 + length**2 / 12.0) + ms * (0.4 * radius**2 + 0.375 * radius * length
                                                                          + 0.25 * length**2)
                ib = (mc * 0.5 + ms * 0.4) * radius**2
                shape_inertia = np.diag([ib, ia, ia])
            p = pos - joint_pos  # dflex: the shape relative to the link's frame, at the joint
            new_mass = mass + m
            new_com = (com * mass + p * m) / new_mass
            inertia = (_transform_inertia(mass, inertia, new_com - com, np.array([0.0, 0.0, 0.0, 1.0]))
                       + _transform_inertia(m, shape_inertia, new_com - p, rot))
            mass, com = new_mass, new_com
        bodies[body.attrib["name"]] = (mass, com + joint_pos, inertia)
        for child in body.findall("body"):
            walk(child)

    for body in root.find("worldbody").findall("body"):
        walk(body)
    return bodies


# ------------------------------------------------------------------------------------------------------------ inertias
def test_dflex_formula_reproduces_the_reviewed_figures():
    """The formula above gives the figures an independent read of dflex found (DiffRL's own ant.xml layout and our
    humanoid.xml): it is dflex's, not MuJoCo's."""
    from common.locomotion import ASSETS

    ant, humanoid = dflex_bodies(ASSETS / "ant.xml"), dflex_bodies(ASSETS / "humanoid.xml")
    torso = ant["torso"][2]
    assert torso[0, 0] == pytest.approx(1.997, abs=1e-3) and torso[1, 1] == pytest.approx(2.177, abs=1e-3)
    foot = ant["front_left_foot"][2]
    ankle = np.array([-1.0, 1.0, 0.0]) / math.sqrt(2)
    assert ankle @ foot @ ankle == pytest.approx(0.144, abs=1e-3)  # MuJoCo: 0.535
    thigh = humanoid["thigh_right"][2]
    assert abs(thigh[0, 0]) < 1e-9 and abs(thigh[2, 2]) < 1e-6 and thigh[1, 1] == pytest.approx(0.0748, abs=1e-4)
    assert humanoid["torso"][2][0, 0] == pytest.approx(0.142, abs=1e-3)


@pytest.mark.parametrize("name", ["ant", "humanoid"])
def test_genesis_simulates_dflex_masses_and_inertias(name, request):
    """Every body of the task as Genesis simulates it has dflex's mass, centre of mass and inertia (the inertia
    rotated from the link's inertial frame back to the body's axes). MuJoCo's own inertias fail this (e.g. the ant's
    foot about its ankle axis, 0.535 instead of 0.144 kg m^2)."""
    from common.diff_render import quat_to_matrix

    task = request.getfixturevalue(name)
    expected = dflex_bodies(task.mjcf)
    links = [link for link in task.robot.links if link.name in expected]
    assert sorted(link.name for link in links) == sorted(expected)
    idx = [link.idx for link in links]
    masses, coms, inertias = (getter(idx).double().numpy() for getter in (
        task.rigid.get_links_mass, task.rigid.get_links_COM, task.rigid.get_links_inertia))
    for link, mass, com, inertia in zip(links, masses, coms, inertias):
        m, c, i = expected[link.name]
        rotation = quat_to_matrix(torch.tensor(link.desc.inertial_quat, dtype=torch.float64)).numpy()
        assert mass == pytest.approx(m, rel=1e-5), link.name
        assert np.allclose(com, c, atol=1e-6), link.name
        assert np.allclose(rotation @ inertia @ rotation.T, i, atol=1e-6), (link.name, inertia, i)


# ------------------------------------------------------------------------------------------------------------ friction
@pytest.mark.parametrize("name", ["hopper", "ant", "humanoid"])
def test_every_floor_contact_has_dflex_friction(name, request):
    """After the robot has come down on the floor, every live contact in the solver has the friction of dflex's
    robot shapes (the floor's default 1.0 would win the max otherwise)."""
    from genesis.utils.misc import qd_to_torch

    task = request.getfixturevalue(name)
    task.reset()
    with torch.no_grad():
        for _ in range(40):
            task.step(torch.zeros(task.num_envs, task.act_dim))
    collider = task.rigid.collider.collider_state
    n_contacts = qd_to_torch(collider.n_contacts).tolist()
    friction = qd_to_torch(collider.contact_data.friction, transpose=True)
    assert min(n_contacts) > 0, "the robot must touch the floor"
    for env, n in enumerate(n_contacts):
        assert torch.allclose(friction[env, :n].double(), torch.tensor(DFLEX_FRICTION[name], dtype=torch.float64),
                              atol=1e-6), (env, friction[env, :n])
    with torch.enable_grad():
        task.reset()


# ------------------------------------------------------------------------------------------------------- joint limits
DFLEX_LIMIT_KE = 1000.0  # DiffRL envs/hopper.py, ant.py, humanoid.py: parse_mjcf(..., limit_ke=1.e+3)


def dflex_limit_torque(q: float, lower: float, upper: float, ke: float) -> float:
    """dflex's jcalc_tau (`sim.py:1455-1459`): a spring past the range, nothing inside it."""
    if q < lower:
        return ke * (lower - q)
    if q > upper:
        return ke * (upper - q)
    return 0.0


def mjcf_ranges(mjcf, joints) -> list[tuple[float, float]]:
    """The joints' ranges in radians, read from the model file."""
    ranges = {j.get("name"): j.get("range") for j in ET.parse(mjcf).getroot().iter("joint")}
    return [tuple(math.radians(float(x)) for x in ranges[j].split()) for j in joints]


def assert_step_sends_motor_plus_spring(task, qpos, actions, joint_q, ranges, monkeypatch):
    """From `qpos` (its motor joints at `joint_q`), one step() asks Genesis for the motor torque plus dflex's spring."""
    task.set_state(qpos, torch.zeros(2, task.robot.n_dofs))
    sent = []
    control = task.robot.control_dofs_force
    monkeypatch.setattr(task.robot, "control_dofs_force",
                        lambda force, *args, **kwargs: sent.append(force) or control(force, *args, **kwargs))
    with torch.no_grad():
        task.step(actions)
    expected = [[a * s + dflex_limit_torque(q, lo, hi, DFLEX_LIMIT_KE)
                 for a, s, q, (lo, hi) in zip(row_a, task.strengths, row_q, ranges)]
                for row_a, row_q in zip(actions.tolist(), joint_q)]
    torque = sent[0].double().cpu()
    assert torch.allclose(torque, torch.tensor(expected, dtype=torch.float64), atol=1e-3), (torque, expected)


@pytest.mark.parametrize("name", ["ant"])
def test_3d_joint_limits_are_dflex_springs(name, request, monkeypatch):
    """The ant has dflex's soft joint limits too: the spring holds the model file's ranges at dflex's 1000 N m/rad,
    Genesis's limits are lifted, and the torque step() sends is the motor's plus dflex's spring, every joint past,
    before and inside its range."""
    task = request.getfixturevalue(name)
    assert task.limit_spring is not None and task.limit_spring[2] == DFLEX_LIMIT_KE
    ranges = mjcf_ranges(task.mjcf, task.motor_joints)
    lower, upper = (x.cpu().double() for x in task.limit_spring[:2])
    assert torch.allclose(lower, torch.tensor([lo for lo, _ in ranges], dtype=torch.float64), atol=1e-5)
    assert torch.allclose(upper, torch.tensor([hi for _, hi in ranges], dtype=torch.float64), atol=1e-5)
    genesis_lower, genesis_upper = (torch.as_tensor(x).reshape(-1, len(ranges))[0]
                                    for x in task.robot.get_dofs_limit(task.motor_dofs))
    assert (genesis_lower <= -1e3).all() and (genesis_upper >= 1e3).all(), (genesis_lower, genesis_upper)

    joint_q = [[hi + 0.1 if j % 2 else lo - 0.05 for j, (lo, hi) in enumerate(ranges)],
               [(lo + hi) / 2 if j % 2 else hi + 0.3 for j, (lo, hi) in enumerate(ranges)]]
    qpos = task.start_qpos.repeat(2, 1).clone()
    qpos[:, 2] = 5.0  # in the air
    qpos[:, task.motor_qs] = torch.tensor(joint_q)
    assert_step_sends_motor_plus_spring(task, qpos, torch.linspace(-1.0, 1.0, 2 * len(ranges)).reshape(2, -1),
                                        joint_q, ranges, monkeypatch)
    with torch.enable_grad():
        task.reset()  # the shared task back at a fresh start, in grad mode


def test_humanoid_keeps_genesis_joint_limits(humanoid):
    """The humanoid (a subclass of the ant's task) does not inherit the ant's springs: Genesis's limits stay at the
    model file's ranges and step() adds no spring."""
    assert humanoid.limit_spring is None
    ranges = torch.tensor(mjcf_ranges(humanoid.mjcf, humanoid.motor_joints), dtype=torch.float64)
    lower, upper = (torch.as_tensor(x).double().reshape(-1, len(ranges))[0]
                    for x in humanoid.robot.get_dofs_limit(humanoid.motor_dofs))
    assert torch.allclose(lower, ranges[:, 0], atol=1e-5) and torch.allclose(upper, ranges[:, 1], atol=1e-5)


def test_hopper_joint_limits_are_dflex_springs(hopper, monkeypatch):
    """The hopper has dflex's soft joint limits (`LocomotionTask.limit_ke`): a joint past its range gets dflex's
    spring on top of its motor torque, and Genesis's own limit is lifted, so that a joint held at full torque against
    its limit in flight settles strength / limit_ke past it (0.2 rad), where a Genesis limit would stop it within a
    few hundredths."""
    task = hopper
    assert task.limit_spring is not None and task.limit_spring[2] == DFLEX_LIMIT_KE
    ranges = mjcf_ranges(task.mjcf, task.motor_joints)
    in_the_air = task.start_qpos.repeat(2, 1).clone()
    in_the_air[:, 1] = 20.0  # [x, z, pitch, thigh, leg, foot]

    # the torque step() asks Genesis for: motor + spring, with joints past, before and inside their ranges
    joint_q = [[ranges[0][1] + 0.1, ranges[1][0] - 0.05, 0.0],
               [ranges[0][0] + 0.2, ranges[1][1] + 0.3, ranges[2][0] - 0.02]]
    qpos = in_the_air.clone()
    qpos[:, 3:] = torch.tensor(joint_q)
    assert_step_sends_motor_plus_spring(task, qpos, torch.tensor([[0.5, -0.25, 1.0], [-1.0, 0.0, 0.3]]), joint_q,
                                        ranges, monkeypatch)

    # held at full torque against the thigh's upper limit: it settles strength / limit_ke = 0.2 rad past it
    task.set_state(in_the_air, torch.zeros(2, task.robot.n_dofs))
    with torch.no_grad():
        for _ in range(90):
            task.step(torch.tensor([[1.0, 0.0, 0.0]] * 2))
    past = task.qpos[:, 3].cpu() - ranges[0][1]
    assert torch.allclose(past, torch.full_like(past, task.strengths[0] / DFLEX_LIMIT_KE), atol=0.02), past
    with torch.enable_grad():
        task.reset()  # the shared task back at a fresh start, in grad mode
