"""The image side every task shares: link poses for the torch renderer, and one `render()` for all three renderers."""

import numpy as np
import torch


class TaskImages:
    """Mixin of CartpoleTask and LocomotionTask.

    The task provides `rigid`, `robot`, `requires_grad`, `device`, `image_size` (None: no camera), `camera` (Genesis's,
    or None with renderer="torch"), `ray_caster` (a TorchRenderer with renderer="torch", else None), `camera_fov`,
    `mjcf` (its model's path), `torch_view` (the TorchRenderer options of its scene: floor, background, light) and
    `camera_pose()`; it may override `_place_cameras()`.
    """

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
