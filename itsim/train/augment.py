"""Image augmentation on the device, for a whole batch at once.

Random scale-crop and horizontal flip are one affine warp (`grid_sample`), so the batch is warped in
one call instead of a Python loop per image. Flips are off by default: captions with "left"/"right"
(the synthetic data has them) would then describe the wrong side.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OPS = ("crop", "flip")


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
    if "crop" in ops:
        scale = min_scale + (1 - min_scale) * torch.rand(b, generator=gen)
        shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (1 - scale)[:, None]
    if "flip" in ops:
        flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    theta = theta.to(images.device, images.dtype, non_blocking=True)  # no host sync on a GPU
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
