"""A small differentiable renderer in torch: a task's spheres, capsules and boxes over a checker floor.

Genesis's cameras are not differentiable. SHAC with differentiable rendering (`shac_diffrender.py`) needs
d image / d state, so this module draws the same geometry as the task's Genesis camera, from the differentiable link
poses, in plain torch (CPU or CUDA, batched over envs and pixels). The D.Va scripts can use it too
(`--renderer torch`, no gradient): a ray caster, faster than Genesis's CPU rasterizer for the hopper, slower for
the cart-pole's boxes and the humanoid's 19 shapes (docs/results.md).

How a pixel is drawn. Every pixel casts one ray. For every shape the ray gets, in closed form (boxes: a short
golden-section search):
  - `dist`: the signed distance between the ray and the shape, in metres (negative when the ray passes through it);
  - `t`: the depth along the ray where it meets the shape (or passes closest to it);
  - a surface normal at that point, for Lambert shading, and the depth of the shape's centre along the ray.
A shape covers the pixel with `alpha = sigmoid(-dist / (sharpness x pixel footprint at the centre's depth))`: a soft
edge about a pixel wide whose position moves smoothly with the pose, so d image / d pose is non-zero along
silhouettes. Everything but the depth order is differentiable (the gradient is that of the rendered image). The
shapes (and the floor, with alpha 1 where the ray hits it) are composited front to back in depth order (the order
itself carries no gradient). Colours come from the MJCF's `rgba`.

Geometry is read from the task's MJCF with the `mujoco` package (a Genesis dependency) so that it matches what
Genesis loads: body b's shapes ride on the Genesis link of the same name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mujoco
import torch

SPHERE, CAPSULE, BOX = mujoco.mjtGeom.mjGEOM_SPHERE, mujoco.mjtGeom.mjGEOM_CAPSULE, mujoco.mjtGeom.mjGEOM_BOX
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """(..., 4) unit quaternions (w, x, y, z) -> (..., 3, 3) rotation matrices."""
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(*q.shape[:-1], 3, 3)


@dataclass
class Shapes:
    """The shapes of one kind: for each, its body (row in the link-pose tensor), its pose in that body's frame,
    its size (sphere: radius; capsule: radius, half length along local z; box: half extents) and its colour."""

    body: torch.Tensor  # (G,) long
    pos: torch.Tensor  # (G, 3)
    rot: torch.Tensor  # (G, 3, 3)
    size: torch.Tensor  # (G, 3)
    rgb: torch.Tensor  # (G, 3)

    def world(self, body_pos, body_rot):
        """World-frame centres (N, G, 3) and rotations (N, G, 3, 3) from body poses (N, B, 3), (N, B, 3, 3)."""
        rot_b, pos_b = body_rot[:, self.body], body_pos[:, self.body]
        local_pos, local_rot = self.pos.to(pos_b.dtype), self.rot.to(pos_b.dtype)
        return pos_b + (rot_b @ local_pos[..., None])[..., 0], rot_b @ local_rot


def load_shapes(mjcf_path: str, device: torch.device) -> tuple[dict[int, Shapes], list[str]]:
    """Visible spheres, capsules and boxes of an MJCF file, grouped by kind, and the model's body names."""
    model = mujoco.MjModel.from_xml_path(str(mjcf_path))
    groups = {}
    for kind in (SPHERE, CAPSULE, BOX):
        ids = [g for g in range(model.ngeom) if model.geom_type[g] == kind and model.geom_rgba[g, 3] > 0]
        if not ids:
            continue
        quat = torch.tensor(model.geom_quat[ids], dtype=torch.float32)
        groups[int(kind)] = Shapes(
            body=torch.tensor(model.geom_bodyid[ids], dtype=torch.long, device=device),
            pos=torch.tensor(model.geom_pos[ids], dtype=torch.float32, device=device),
            rot=quat_to_matrix(quat).to(device),
            size=torch.tensor(model.geom_size[ids], dtype=torch.float32, device=device),
            rgb=torch.tensor(model.geom_rgba[ids, :3], dtype=torch.float32, device=device),
        )
    unsupported = {int(t) for t in model.geom_type} - {int(SPHERE), int(CAPSULE), int(BOX)}
    if unsupported:
        raise ValueError(f"{mjcf_path}: geom types {sorted(unsupported)} are not supported (sphere, capsule, box)")
    return groups, [model.body(b).name for b in range(model.nbody)]


def body_link_rows(mjcf_path, robot) -> list[int | None]:
    """For each MJCF body, its Genesis link's row in the solver's link tensors (None: the world body, which Genesis
    drops from a free-base robot)."""
    _, names = load_shapes(mjcf_path, torch.device("cpu"))
    offset = 0 if robot.links[0].name == names[0] else 1
    rows = [None] * offset + [robot.link_start + b for b in range(len(names) - offset)]
    for b, row in enumerate(rows):
        if row is not None and robot.links[b - offset].name != names[b]:
            raise ValueError(f"body {b} ({names[b]!r}) does not match Genesis link {robot.links[b - offset].name!r}")
    return rows


# ------------------------------------------------------------------------------------- ray vs shape, in closed form
def _sphere_hit(o, d, center, radius):
    """Rays o + t d (N, P, 1, 3), |d| = 1, against spheres center (N, 1, G, 3), radius (G,).
    Returns dist (N, P, G), the hit depth t (N, P, G), normal (N, P, G, 3) and the depth of the centre t_mid."""
    t_mid = ((center - o) * d).sum(-1)
    closest = o + t_mid[..., None] * d
    perp = (center - closest).square().sum(-1).add(1e-12).sqrt()
    half_chord = (radius.square() - perp.square()).clamp(min=0.0).add(1e-12).sqrt()
    t = t_mid - half_chord
    normal = torch.nn.functional.normalize(o + t[..., None] * d - center, dim=-1)
    return perp - radius, t, normal, t_mid


def _capsule_hit(o, d, center, rot, radius, half_length):
    """Capsules (segment along the local z axis of `rot`, half length, radius): the closest point of the segment to
    the ray's line makes it a sphere test."""
    axis = rot[..., :, 2]  # (N, 1, G, 3)
    a = center - half_length[:, None] * axis
    v = 2.0 * half_length[:, None] * axis
    w = a - o
    vd, wd, wv, vv = (v * d).sum(-1), (w * d).sum(-1), (w * v).sum(-1), (v * v).sum(-1)
    s = ((wd * vd - wv) / (vv - vd.square()).clamp(min=1e-9)).clamp(0.0, 1.0)
    return _sphere_hit(o, d, a + s[..., None] * v, radius)


def _box_sdf(p, half, smooth: float = 0.01, round_abs: float = 1e-3):
    """A smooth signed distance to a box, for points p in its frame: log-sum-exp (`smooth` metres) of the three
    slab distances |p_i| - half_i, with |p_i| rounded to sqrt(p_i^2 + r^2) - r. Its zero set is the box with edges
    rounded by about a centimetre (inside the true box by at most smooth x ln 3); it is convex, so its minimum along a
    ray is unique and moves smoothly with the pose. (The exact SDF's max and |.| put that minimum on kinks, where the
    envelope-theorem gradient of `_box_hit` is wrong: by up to 100 % for rotations, measured.)
    Returns the distance and its gradient w.r.t. p (the surface normal on the surface)."""
    soft_abs = (p.square() + round_abs**2).sqrt()
    q = soft_abs - round_abs - half
    dist = smooth * torch.logsumexp(q / smooth, dim=-1)
    grad = torch.softmax(q / smooth, dim=-1) * p / soft_abs
    return dist, grad


def _box_hit(o, d, center, rot, half, footprint_per_m: float, iterations: int = 24):
    """Boxes. `dist` is the minimum of the box's smooth signed distance along the ray (convex in t: a golden-section
    search without gradient; by the envelope theorem its gradient is that of the SDF at the minimiser). The search
    runs only for rays that pass within 10 edge widths of the box (they enter the box grown by that margin); for the
    others the SDF at the ray's closest approach to the centre stands in (coverage < 1e-4 there either way).
    `t` (depth order) comes from the slab test where the ray hits, else from the minimiser. The shading normal is the
    SDF's gradient where the ray enters the grown box: a point that moves smoothly with the pose for every pixel the
    soft edge reaches (so shading is continuous and differentiable)."""
    rel = o - center
    o_local = (rel[..., None, :] @ rot)[..., 0, :]  # R^T (o - c), (N, 1, G, 3)
    d_local = (d[..., None, :] @ rot)[..., 0, :]  # (N, P, G, 3)
    o_local = o_local.expand_as(d_local)
    t_mid = -(rel * d).sum(-1)
    d_safe = torch.where(d_local.abs() < 1e-9, torch.full_like(d_local, 1e-9), d_local)

    def slab(half):  # where the ray enters the box, and whether it does
        t1, t2 = (-half - o_local) / d_safe, (half - o_local) / d_safe
        t_enter, t_exit = torch.minimum(t1, t2).max(-1).values, torch.maximum(t1, t2).min(-1).values
        return t_enter, (t_enter <= t_exit) & (t_exit > 0)

    margin = 10.0 * footprint_per_m * t_mid.detach().clamp(min=0.05)
    t_grown, near = slab(half + margin[..., None])
    with torch.no_grad():
        t_min = t_mid.detach().clone()
        if near.any():
            o_n, d_n = o_local[near], d_local[near]
            half_n = half.expand_as(d_local)[near]
            reach = half_n.norm(dim=-1) + margin[near] + 1e-3
            lo, hi = t_min[near] - reach, t_min[near] + reach
            for _ in range(iterations):
                m1, m2 = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
                f1 = _box_sdf(o_n + m1[..., None] * d_n, half_n)[0]
                f2 = _box_sdf(o_n + m2[..., None] * d_n, half_n)[0]
                left = f1 < f2
                hi, lo = torch.where(left, m2, hi), torch.where(left, lo, m1)
            t_min[near] = 0.5 * (lo + hi)
    t_enter, hit = slab(half)
    t = torch.where(hit, t_enter, t_min).detach()
    t_shade = torch.where(near, t_grown, t_min)
    dist = _box_sdf(o_local + t_min[..., None] * d_local, half)[0]
    normal_local = torch.nn.functional.normalize(_box_sdf(o_local + t_shade[..., None] * d_local, half)[1], dim=-1)
    normal = (rot @ normal_local[..., None])[..., 0]
    return dist, t, normal, t_mid


# ------------------------------------------------------------------------------------------------------ renderer
class TorchRenderer:
    """Renders (N, H, W, 3) float images in [0, 1] of a task's bodies from their link poses and per-env cameras.

    body_links: for each MJCF body, the row of the link-pose tensors that carries it (None: fixed to the world).
    The floor's defaults imitate Genesis's `Plane(tile_size=(1, 1))` as our tasks light it: 0.5 m checks in two
    blue-greys. Colours and lighting are close to Genesis's, not equal; the geometry and the camera are the same.
    """

    def __init__(self, mjcf_path, body_links: list[int | None], image_size: tuple[int, int], fov: float,
                 device: torch.device, floor: bool = True, tile_size: float = 0.5,
                 floor_rgb=((0.165, 0.235, 0.31), (0.095, 0.165, 0.235)), background=(0.55, 0.65, 0.8),
                 light_dir=(0.3, 1.0, -1.0), ambient: float = 0.45, sharpness: float = 0.25):
        self.groups, _ = load_shapes(mjcf_path, device)
        self.height, self.width = image_size
        self.device, self.floor, self.tile_size, self.sharpness = device, floor, tile_size, sharpness
        self.ambient = ambient
        self.body_links = body_links
        self.floor_rgb = torch.tensor(floor_rgb, dtype=torch.float32, device=device)
        self.background = torch.tensor(background, dtype=torch.float32, device=device)
        self.to_light = -torch.nn.functional.normalize(torch.tensor(light_dir, dtype=torch.float32), dim=0).to(device)
        # Camera-frame ray directions (x right, y up, z forward) of the pixel centres; fov is vertical.
        tan_half = math.tan(math.radians(fov) / 2.0)
        ys = (1.0 - 2.0 * (torch.arange(self.height, device=device) + 0.5) / self.height) * tan_half
        xs = (2.0 * (torch.arange(self.width, device=device) + 0.5) / self.width - 1.0) * tan_half * (
            self.width / self.height)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        self.rays_cam = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], -1).reshape(-1, 3)  # (P, 3)
        self.pixel_angle = 2.0 * tan_half / self.height  # footprint of one pixel per metre of depth

    def body_poses(self, links_pos: torch.Tensor, links_quat: torch.Tensor):
        """Per-body world positions (N, B, 3) and rotations (N, B, 3, 3); world-fixed bodies get the identity."""
        n = links_pos.shape[0]
        pos, rot = [], []
        eye = torch.eye(3, device=links_pos.device, dtype=links_pos.dtype)
        for link in self.body_links:
            if link is None:
                pos.append(links_pos.new_zeros(n, 3))
                rot.append(eye.expand(n, 3, 3))
            else:
                pos.append(links_pos[:, link])
                rot.append(quat_to_matrix(links_quat[:, link]))
        return torch.stack(pos, 1), torch.stack(rot, 1)

    def rays(self, cam_pos: torch.Tensor, cam_lookat: torch.Tensor):
        """World-frame unit ray directions (N, P, 3) of cameras at cam_pos looking at cam_lookat, z up."""
        forward = torch.nn.functional.normalize(cam_lookat - cam_pos, dim=-1)
        up_world = torch.tensor([0.0, 0.0, 1.0], device=cam_pos.device, dtype=cam_pos.dtype).expand_as(forward)
        right = torch.nn.functional.normalize(torch.cross(forward, up_world, dim=-1), dim=-1)
        up = torch.cross(right, forward, dim=-1)
        basis = torch.stack([right, up, forward], dim=-2)  # (N, 3, 3), rows
        return torch.nn.functional.normalize(self.rays_cam.to(basis.dtype) @ basis, dim=-1)

    def render(self, links_pos, links_quat, cam_pos, cam_lookat, return_alpha: bool = False):
        """links_pos (N, L, 3), links_quat (N, L, 4) wxyz, cam_pos / cam_lookat (N, 3) -> images (N, H, W, 3).

        With return_alpha, also the robot's coverage (N, H, W): 1 where a shape in front of the floor covers the
        pixel (the soft foreground mask)."""
        n, dtype = links_pos.shape[0], links_pos.dtype  # fp32 or fp64 (the gradient tests use fp64)
        body_pos, body_rot = self.body_poses(links_pos, links_quat)
        d = self.rays(cam_pos, cam_lookat)[:, :, None, :]  # (N, P, 1, 3)
        o = cam_pos[:, None, None, :]  # (N, 1, 1, 3)
        dists, depths, centres, colours = [], [], [], []
        for kind, shapes in self.groups.items():
            center, rot = shapes.world(body_pos, body_rot)
            center, rot = center[:, None], rot[:, None]
            size = shapes.size.to(dtype)
            if kind == SPHERE:
                dist, t, normal, t_mid = _sphere_hit(o, d, center, size[:, 0])
            elif kind == CAPSULE:
                dist, t, normal, t_mid = _capsule_hit(o, d, center, rot, size[:, 0], size[:, 1])
            else:
                dist, t, normal, t_mid = _box_hit(o, d, center, rot, size, self.sharpness * self.pixel_angle)
            lambert = (normal * self.to_light.to(dtype)).sum(-1).clamp(min=0.0)
            shade = (self.ambient + (1.0 - self.ambient) * lambert)[..., None]
            dists.append(dist), depths.append(t), centres.append(t_mid), colours.append(shade * shapes.rgb.to(dtype))
        dist, t = torch.cat(dists, -1), torch.cat(depths, -1)  # (N, P, G)
        colour = torch.cat(colours, -2)  # (N, P, G, 3)
        # The edge is `sharpness` pixels wide at the shape's depth (a smooth function of the pose, like `dist`).
        footprint = self.sharpness * self.pixel_angle * torch.cat(centres, -1).clamp(min=0.05)
        alpha = torch.sigmoid(-dist / footprint) * (t.detach() > 0)
        robot_alpha = alpha
        if self.floor:
            floor_alpha, floor_t, floor_rgb = self._floor(o[:, :, 0], d[:, :, 0])
            alpha = torch.cat([alpha, floor_alpha[..., None]], -1)
            t = torch.cat([t, floor_t[..., None]], -1)
            colour = torch.cat([colour, floor_rgb[..., None, :]], -2)
        order = t.detach().argsort(dim=-1)
        alpha, colour = alpha.gather(-1, order), colour.gather(-2, order[..., None].expand_as(colour))
        transmit = torch.cumprod(1.0 - alpha, dim=-1)
        before = torch.cat([torch.ones_like(transmit[..., :1]), transmit[..., :-1]], -1)
        image = ((alpha * before)[..., None] * colour).sum(-2) + transmit[..., -1:] * self.background.to(dtype)
        image = image.reshape(n, self.height, self.width, 3)
        if not return_alpha:
            return image
        if self.floor:  # robot shapes behind the floor (below ground) are hidden by it
            in_front = torch.cat(depths, -1).detach() < floor_t[..., None].detach()
            robot_alpha = robot_alpha * in_front
        coverage = 1.0 - torch.prod(1.0 - robot_alpha, dim=-1)
        return image, coverage.reshape(n, self.height, self.width)

    def _floor(self, o, d):
        """The z = 0 checker floor: alpha (N, P) 1 where the ray goes down to it, depth, colour (N, P, 3)."""
        down = d[..., 2] < -1e-6
        t = torch.where(down, -o[..., 2] / torch.where(down, d[..., 2], -torch.ones_like(d[..., 2])),
                        torch.full_like(d[..., 2], 1e6))
        hit = o + t[..., None] * d
        tile = (torch.floor(hit[..., 0] / self.tile_size) + torch.floor(hit[..., 1] / self.tile_size)).remainder(2)
        rgb = self.floor_rgb.to(o.dtype)[tile.long().clamp(0, 1)]
        return down.to(o.dtype), t, rgb
