"""Batched augmentation on the training device (GPU or CPU) with one affine warp per sample.

Random scale, rotation (any right angle plus a small tilt), flips and translation are folded into one
`affine_grid`, so image and mask stay aligned and no per-sample Python work runs; then colour jitter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(batch: int, crop: int, source: int, scale: tuple[float, float], device: torch.device,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Affine matrices (B x 2 x 3) mapping crop coordinates to source coordinates (normalised)."""
    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=device, generator=generator)

    zoom = scale[0] + (scale[1] - scale[0]) * rand(batch)
    extent = (crop / source) / zoom  # fraction of the source the crop covers
    angle = (torch.randint(0, 4, (batch,), device=device, generator=generator).float() * (math.pi / 2)
             + (rand(batch) - 0.5) * math.radians(20))
    flip = torch.where(rand(batch) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * extent, torch.sin(angle) * extent
    room = (1 - extent).clamp(min=0)
    tx, ty = (rand(batch) * 2 - 1) * room, (rand(batch) * 2 - 1) * room
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    return theta


def colour_jitter(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x: B x 3 x H x W in [0, 1]. Brightness, contrast, saturation, occasional greyscale and noise."""
    b = x.shape[0]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=x.device, generator=generator)

    x = x * (0.75 + 0.5 * rand(b, 1, 1, 1))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (0.75 + 0.5 * rand(b, 1, 1, 1)) + mean
    grey = x.mean(dim=1, keepdim=True)
    sat = 0.7 + 0.6 * rand(b, 1, 1, 1)
    sat = torch.where(rand(b, 1, 1, 1) < 0.1, torch.zeros_like(sat), sat)
    x = (x - grey) * sat + grey
    x = x + 0.02 * rand(b, 1, 1, 1) * torch.randn(x.shape, device=x.device, generator=generator)
    return x.clamp(0, 1)


def augment_batch(images: torch.Tensor, masks: torch.Tensor, crop: int, scale: tuple[float, float] = (0.7, 1.4),
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """images: B x S x S x 3 uint8, masks: B x S x S uint8 {0,1} -> (B x 3 x crop x crop in [0,1], B x crop x crop)."""
    b, s = images.shape[0], images.shape[1]
    x = images.permute(0, 3, 1, 2).float() / 255.0
    m = masks.unsqueeze(1).float()
    theta = random_affine(b, crop, s, scale, images.device, generator)
    grid = F.affine_grid(theta, (b, 3, crop, crop), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    m = F.grid_sample(m, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return colour_jitter(x, generator), (m[:, 0] > 0.5).float()
