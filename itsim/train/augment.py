"""Image augmentation on the device, for a whole batch at once.

Random scale-crop and horizontal flip are one affine warp (`grid_sample`), so the batch is warped in
one call instead of a Python loop per image. "rrc" is a random resized crop (area 35-100%, aspect
3/4-4/3, as Inception/SimCLR crops), "jitter" a per-image brightness, contrast and saturation change
(+-0.4), both batched too. Flips are off by default: captions with "left"/"right"
(the synthetic data has them) would then describe the wrong side.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OPS = ("crop", "flip", "rrc", "jitter")


def parse_ops(spec: str) -> tuple[str, ...]:
    ops = tuple(o.strip() for o in spec.split(",") if o.strip())
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown}; choose from {OPS}")
    return ops


def augment(images: torch.Tensor, ops: tuple[str, ...], gen: torch.Generator, min_scale: float = 0.8) -> torch.Tensor:
    """float images [B,3,H,W] in [0,1] -> augmented copy; `gen` (CPU) makes it repeatable."""
    if not ops:
        return images
    b = images.shape[0]
    scale = torch.ones(b)
    shift = torch.zeros(b, 2)
    flip = torch.ones(b)
    scale_y = None
    if "crop" in ops:
        scale = min_scale + (1 - min_scale) * torch.rand(b, generator=gen)
        shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (1 - scale)[:, None]
    if "rrc" in ops:  # side lengths from an area fraction and a log-uniform aspect ratio
        area = 0.35 + 0.65 * torch.rand(b, generator=gen)
        aspect = torch.exp((torch.rand(b, generator=gen) * 2 - 1) * math.log(4 / 3))
        scale = (area * aspect).sqrt().clamp(max=1.0)
        scale_y = (area / aspect).sqrt().clamp(max=1.0)
        shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (1 - torch.stack([scale, scale_y], 1))
    if "flip" in ops:
        flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    if "jitter" in ops:
        factors = (1 + (torch.rand(b, 3, generator=gen) * 2 - 1) * 0.4).to(images.device, images.dtype, non_blocking=True)
    if ops != ("jitter",):
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = scale * flip
        theta[:, 1, 1] = scale if scale_y is None else scale_y
        theta[:, :, 2] = shift
        theta = theta.to(images.device, images.dtype, non_blocking=True)  # no host sync on a GPU
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if "jitter" in ops:
        images = colour_jitter(images, factors)
    return images


def colour_jitter(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation per image: factors [B, 3], 1 = unchanged; result clamped to [0, 1]."""
    f = factors[:, :, None, None, None]
    x = images * f[:, 0]
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - grey.mean(dim=(2, 3), keepdim=True)) * f[:, 1] + grey.mean(dim=(2, 3), keepdim=True)
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - grey) * f[:, 2] + grey
    return x.clamp(0, 1)
