"""itsim/train/augment.py: what crop and flip do to the pixels, checked on images whose content is known."""
from __future__ import annotations

import pytest
import torch

from itsim.train.augment import augment, parse_ops

B, H, W = 16, 24, 32


def _ramps() -> torch.Tensor:
    """Channel 0 rises linearly left to right, channel 1 top to bottom (values = the normalised pixel-centre
    coordinate), channel 2 constant: where a pixel came from can be read off its value."""
    x = (2 * torch.arange(W) + 1) / W - 1
    y = (2 * torch.arange(H) + 1) / H - 1
    img = torch.stack([x.expand(H, W), y[:, None].expand(H, W), torch.full((H, W), 0.25)])
    return img.expand(B, 3, H, W).clone()


def _fit(values: torch.Tensor, coords: torch.Tensor) -> tuple[float, float]:
    """Least-squares (slope, intercept) of values against coordinates."""
    a = torch.stack([coords, torch.ones_like(coords)], 1).double()
    sol = torch.linalg.lstsq(a, values.double()[:, None]).solution
    return float(sol[0]), float(sol[1])


def test_no_ops_return_the_batch_unchanged():
    images = torch.rand(2, 3, H, W)
    assert augment(images, (), torch.Generator().manual_seed(0)) is images
    assert parse_ops(" crop , flip ") == ("crop", "flip") and parse_ops("") == ()
    with pytest.raises(ValueError, match="unknown augmentation"):
        parse_ops("crop,rotate")


def test_flip_gives_each_image_or_its_exact_mirror_and_both_occur():
    images = torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(1))
    out = augment(images, ("flip",), torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    mirrored = []
    for i in range(B):
        same = torch.allclose(out[i], images[i], atol=1e-5)
        mirror = torch.allclose(out[i], torch.flip(images[i], dims=[2]), atol=1e-5)
        assert same != mirror, f"image {i} is neither itself nor its mirror"
        mirrored.append(mirror)
    assert 0 < sum(mirrored) < B
    # Seeded: the same generator state flips the same images.
    again = augment(images, ("flip",), torch.Generator().manual_seed(0))
    assert torch.equal(again, out)


def test_crop_keeps_the_size_zooms_in_and_shifts_the_content():
    """Each output pixel samples input coordinate scale * u + shift (u its own coordinate), the same scale
    on both axes: scale in [0.8, 1] (a crop of 80-100% of the side, enlarged back to the full size) and a
    shift that keeps the crop inside the image."""
    images = _ramps()
    out = augment(images, ("crop",), torch.Generator().manual_seed(3))
    assert out.shape == images.shape
    u = (2 * torch.arange(W) + 1) / W - 1
    v = (2 * torch.arange(H) + 1) / H - 1
    inner_x, inner_y = slice(2, W - 2), slice(2, H - 2)  # the border pixels may clamp
    shifts = []
    for i in range(B):
        sx, tx = _fit(out[i, 0, H // 2, inner_x], u[inner_x])
        sy, ty = _fit(out[i, 1, inner_y, W // 2], v[inner_y])
        assert 0.8 - 1e-4 <= sx <= 1 + 1e-4 and sx == pytest.approx(sy, abs=1e-4), (i, sx, sy)
        assert abs(tx) <= 1 - sx + 1e-4 and abs(ty) <= 1 - sy + 1e-4, (i, tx, ty)
        # Rows all shifted alike (no rotation or shear), and the constant channel untouched.
        assert torch.allclose(out[i, 0], out[i, 0, :1].expand(H, W), atol=1e-5)
        assert torch.allclose(out[i, 2], torch.full((H, W), 0.25), atol=1e-6)
        shifts.append((tx, ty))
    assert len({round(t, 3) for s in shifts for t in s}) > B  # the crops differ from image to image
    assert max(abs(t) for s in shifts for t in s) > 0.01  # and some content really moved


def test_crop_and_flip_together_mirror_the_crop():
    images = _ramps()
    out = augment(images, ("crop", "flip"), torch.Generator().manual_seed(5))
    u = (2 * torch.arange(W) + 1) / W - 1
    signs = []
    for i in range(B):
        sx, _ = _fit(out[i, 0, H // 2, 2:W - 2], u[2:W - 2])
        sy, _ = _fit(out[i, 1, 2:H - 2, W // 2], ((2 * torch.arange(H) + 1) / H - 1)[2:H - 2])
        assert 0.8 - 1e-4 <= abs(sx) <= 1 + 1e-4 and abs(sx) == pytest.approx(sy, abs=1e-4)
        signs.append(sx < 0)  # a flipped image reads the ramp backwards
    assert 0 < sum(signs) < B
