"""The DrQ-v2 image encoder that D.Va and the pixel baselines share."""

import math

import torch
import torch.nn as nn


class Encoder(nn.Module):
    """Conv(C->32, 3x3, stride 2) then three Conv(32->32, 3x3), ReLU after each; flattened features.

    Takes stacked uint8 frames (B, C, H, W) and scales them to [-0.5, 0.5]. At 84 x 84 the output has 32*35*35 features.
    """

    def __init__(self, obs_shape: tuple[int, int, int], channels: int = 32):
        super().__init__()
        c, h, w = obs_shape
        self.convs = nn.Sequential(
            nn.Conv2d(c, channels, 3, stride=2), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=1), nn.ReLU(),
        )
        self.out_hw = ((h - 3) // 2 + 1 - 6, (w - 3) // 2 + 1 - 6)
        if min(self.out_hw) < 1:
            raise ValueError(f"images of {h}x{w} px are too small for the encoder (at least 15x15)")
        self.repr_dim = channels * self.out_hw[0] * self.out_hw[1]

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float() / 255.0 - 0.5
        return self.convs(x).flatten(1)


def init_pixel_path(encoder: Encoder, trunk_linear: nn.Linear) -> None:
    """The D.Va authors' initialisation of a pixel actor's encoder and trunk: orthogonal weights (gain sqrt 2 for the
    convolutions, 1 for the trunk's linear layer) and zero biases. DrQ-v2, CURL and dva_cartpole.py keep their own."""
    for layer in [*encoder.modules(), trunk_linear]:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(layer.weight, gain=math.sqrt(2) if isinstance(layer, nn.Conv2d) else 1.0)
            nn.init.zeros_(layer.bias)
