"""True/false image-caption pairs.

Two ways to turn a batch of images (each with its captions) into training pairs:
- balanced (the reference): per image one caption; with probability 0.5 it is replaced by a caption
  of a different image (label 0). One CNN pass per pair.
- in-batch: every image is encoded once and scored against its own caption and k captions of other
  images in the batch, random or hardest (VSE++). Many pairs per CNN pass.
Every random choice comes from a generator seeded by (seed, step, rank), so a resumed run draws the
same pairs as an uninterrupted one.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def step_generator(seed: int, step: int, rank: int, purpose: str = "pairs") -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{step}/{rank}/{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def pick_captions(n_captions: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One caption index per image, uniform over that image's captions."""
    u = torch.rand(n_captions.shape[0], generator=gen)
    return (u * n_captions.float()).long().clamp(max=n_captions - 1)


def other_index(key_ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each image, a random batch index holding a different image (or -1 when none exists)."""
    b = key_ids.shape[0]
    different = key_ids[:, None] != key_ids[None, :]
    weights = different.float() + 1e-12  # avoid an all-zero row; masked below
    choice = torch.multinomial(weights, 1, generator=gen).squeeze(1)
    ok = different[torch.arange(b), choice]
    return torch.where(ok, choice, torch.full_like(choice, -1))


def balanced_pairs(batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(caption ids [B,L], lengths [B], labels [B]) for the images in batch order."""
    n = batch["n_captions"]
    b = n.shape[0]
    own = pick_captions(n, gen)
    negative = torch.rand(b, generator=gen) < 0.5
    other = other_index(batch["key_ids"], gen)
    negative &= other >= 0
    src_img = torch.where(negative, other, torch.arange(b))
    src_cap = torch.where(negative, pick_captions(n[src_img.clamp(min=0)], gen), own)
    ids = batch["ids"][src_img, src_cap]
    lengths = batch["lengths"][src_img, src_cap]
    return ids, lengths, (~negative).float()


def in_batch_negatives(scores: torch.Tensor, key_ids: torch.Tensor, k: int, mode: str,
                       gen: torch.Generator) -> torch.Tensor:
    """Indices [B, k] of captions (batch positions) to pair with each image as negatives.

    `scores` [B, B]: image i against caption j (only read for mode="hard"). Same-image captions are
    never chosen; when fewer than k others exist, the remaining slots repeat valid ones.
    """
    b = key_ids.shape[0]
    valid = key_ids[:, None] != key_ids[None, :]
    k = max(1, min(k, b - 1))
    if mode == "hard":
        ranked = scores.detach().float().masked_fill(~valid, float("-inf"))
    elif mode == "random":
        ranked = torch.rand((b, b), generator=gen).masked_fill(~valid, float("-inf"))
    else:
        raise ValueError(f"unknown negatives mode {mode!r} (random|hard)")
    top = ranked.topk(k, dim=1)
    # Rows with fewer than k valid captions: replace -inf picks by the row's best valid pick.
    fallback = top.indices[:, :1].expand(-1, k)
    return torch.where(torch.isfinite(top.values), top.indices, fallback)


def fixed_balanced_pairs(caption_image: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed evaluation pairs over a set of captions: comparable across runs and models.

    `caption_image[c]` is the image index of caption c. Returns (image_idx, caption_idx, label): for
    each caption, its own image (label 1) or, with probability 0.5, another image (label 0); the
    choices depend only on `seed` and the set, never on a model.
    """
    caption_image = np.asarray(caption_image)
    n = caption_image.shape[0]
    rng = np.random.default_rng(seed)
    n_images = int(caption_image.max()) + 1 if n else 0
    label = (rng.random(n) < 0.5).astype(np.int64)
    if n_images < 2:
        label[:] = 1
    offset = rng.integers(1, max(2, n_images), size=n)  # a non-zero shift lands on a different image
    other = (caption_image + offset) % max(1, n_images)
    image_idx = np.where(label == 1, caption_image, other)
    return image_idx, np.arange(n), label
