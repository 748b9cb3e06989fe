"""The torch renderer draws what the Genesis camera sees, and its gradient w.r.t. the link poses is right."""

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from common.diff_render import TorchRenderer, quat_to_matrix

TASKS = ["task", "hopper", "ant_192", "humanoid_192"]  # "task" is the cart-pole fixture


# The ant's and humanoid's limbs are 1-2 px wide in the shared 64 px scenes, where half a pixel of difference between
# a polygon mesh (Genesis) and the exact shape (ours) is a large part of the mask: compare them at 192 px.
@pytest.fixture(scope="module")
def ant_192():
    from common.tasks import make_task

    return make_task("ant", 1, torch.device("cpu"), image_size=(192, 192), seed=0)


@pytest.fixture(scope="module")
def humanoid_192():
    from common.tasks import make_task

    return make_task("humanoid", 1, torch.device("cpu"), image_size=(192, 192), seed=0)


def _pose_a_little(task, name):
    """Take the task to a state that is not its start pose: a few steps of a fixed pseudo-random action."""
    task.reset()
    generator = torch.Generator().manual_seed(3)
    act_dim = getattr(task, "act_dim", 1)
    with torch.no_grad():
        for _ in range(12 if name == "task" else 20):  # cart-pole: 12 steps keep the cart in the picture
            task.step(0.6 * (2 * torch.rand(task.num_envs, act_dim, generator=generator) - 1))


def _genesis_robot_mask(task):
    task.render()  # places the (tracking) cameras
    seg = task.camera.render(rgb=False, segmentation=True, force_render=True)[2]
    seg = torch.as_tensor(np.ascontiguousarray(seg))  # one env comes back as a flipped (negative-stride) view
    if seg.dim() == 2:
        seg = seg[None]
    first = task.robot.link_start + 1  # Genesis writes link index + 1 (0 is the background)
    return (seg >= first) & (seg < first + task.robot.n_links)


@pytest.mark.parametrize("name", TASKS)
def test_matches_genesis_camera(name, request):
    """Foreground masks of the same state: IoU >= 0.9 against Genesis's Rasterizer (segmentation by link)."""
    task = request.getfixturevalue(name)
    _pose_a_little(task, name)
    reference = _genesis_robot_mask(task)
    renderer = task.torch_renderer()
    with torch.no_grad():
        image, coverage = renderer.render(*task.link_poses(), *task.camera_pose(), return_alpha=True)
    ours = coverage > 0.5
    assert image.shape == (task.num_envs, *task.image_size, 3)
    assert 0.0 <= image.min() and image.max() <= 1.0
    for env in range(task.num_envs):
        union = (ours[env] | reference[env]).sum().item()
        iou = (ours[env] & reference[env]).sum().item() / union
        assert union > 30, f"{name}: the robot should be in view"
        assert iou >= 0.9, f"{name} env {env}: IoU {iou:.3f}"


def test_shapes_in_closed_form():
    """One unit sphere straight ahead of a camera: the pixel on its centre is covered, far corners are not, and the
    soft edge sits on the silhouette, whose angular radius is asin(r / distance)."""
    xml = """<mujoco><worldbody><body name="ball" pos="0 0 0"><joint type="free"/>
             <geom type="sphere" size="0.5" rgba="1 0 0 1"/></body></worldbody></mujoco>"""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ball.xml"
        path.write_text(xml)
        renderer = TorchRenderer(path, [None, 0], (33, 33), 60.0, torch.device("cpu"), floor=False)
    links_pos = torch.zeros(1, 1, 3)
    links_quat = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    cam_pos, lookat = torch.tensor([[0.0, -3.0, 0.0]]), torch.zeros(1, 3)
    image, coverage = renderer.render(links_pos, links_quat, cam_pos, lookat, return_alpha=True)
    assert coverage[0, 16, 16] > 0.99 and coverage[0, 0, 0] < 0.01
    edge = math.tan(math.asin(0.5 / 3.0)) / math.tan(math.radians(30.0)) * 16.5  # in pixels from the centre
    row = coverage[0, 16]
    covered = (row > 0.5).sum().item()
    assert abs(covered - 2 * edge) <= 1.5
    # Lambert shading of the red sphere where it faces the camera (normal (0, -1, 0)): ambient + (1 - ambient) n.l
    to_light = -torch.nn.functional.normalize(torch.tensor([0.3, 1.0, -1.0]), dim=0)
    shade = renderer.ambient + (1 - renderer.ambient) * max(0.0, -to_light[1].item())
    assert abs(image[0, 16, 16, 0].item() - shade) < 2e-3 and image[0, 16, 16, 1:].abs().max() < 1e-3


# Not the ant: where two shapes interpenetrate (its capsules meet at every joint, its feet dip into the floor) the
# image has a crease, a depth-order switch that no soft edge smooths; differences across it are not derivatives.
@pytest.mark.parametrize("name", ["task", "hopper"])
def test_gradient_matches_finite_differences(name, request):
    """d(image loss)/d(link positions and orientations) against central differences, relative error <= 1e-2.
    Rendered in fp64: the soft edges are a fraction of a pixel wide, so fp32 differences at an eps small enough to
    stay inside them are mostly round-off."""
    task = request.getfixturevalue(name)
    _pose_a_little(task, name)
    renderer = task.torch_renderer()
    with torch.no_grad():
        links_pos, links_quat = (x.double() for x in task.link_poses())
        cam_pos, cam_lookat = (x.double() for x in task.camera_pose())
    weights = torch.rand(task.num_envs, *task.image_size, 3, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)

    def loss(pos, quat):
        return (renderer.render(pos, quat, cam_pos, cam_lookat) * weights).sum()

    pos = links_pos.clone().requires_grad_(True)
    quat = links_quat.clone().requires_grad_(True)
    loss(pos, quat).backward()
    moving = [row for row in renderer.body_links if row is not None and row != task.robot.link_start]
    checked = 0
    for row in moving[-2:]:
        for tensor, grad, coord in ((links_pos, pos.grad, 0), (links_pos, pos.grad, 2), (links_quat, quat.grad, 1)):
            eps = 1e-5
            plus, minus = tensor.clone(), tensor.clone()
            plus[0, row, coord] += eps
            minus[0, row, coord] -= eps
            args_plus = (plus, links_quat) if tensor is links_pos else (links_pos, plus)
            args_minus = (minus, links_quat) if tensor is links_pos else (links_pos, minus)
            with torch.no_grad():
                fd = (loss(*args_plus) - loss(*args_minus)).item() / (2 * eps)
            analytic = grad[0, row, coord].item()
            assert abs(analytic - fd) <= 1e-2 * max(abs(fd), 1.0), f"{name} link {row} coord {coord}: {analytic} vs {fd}"
            checked += abs(fd) > 1.0
    assert checked >= 2, "the checked coordinates should move the image"


def test_quat_to_matrix():
    angle = 0.7
    q = torch.tensor([[math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)]])  # about z
    expected = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0],
                             [0.0, 0.0, 1.0]])
    assert torch.allclose(quat_to_matrix(q)[0], expected, atol=1e-6)
