"""True/false image-caption pairs for one training step.

A step first picks the captions it will encode (`step_captions`): by default every caption of every
image in the batch, which is what the reference's epoch covers ("for each image-caption pair"), or
N random ones per image. Each image goes through the CNN once and each caption through the LSTM
once; the pairs are index pairs into those vectors, so one CNN pass serves many pairs:
- balanced (the reference): each caption is paired with its own image, and with probability 0.5 its
  text is replaced by a caption of a different image (label 0);
- in-batch: each caption is a positive for its image, and each image also meets k captions of other
  images in the batch, random or hardest (VSE++); positives and negatives weigh half each.
Every random choice comes from a generator seeded by (seed, step, rank), so a resumed run draws the
same pairs as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import numpy as np
import torch


def step_generator(seed: int, step: int, rank: int, purpose: str = "pairs") -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{step}/{rank}/{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass
class StepCaptions:
    """The captions a step encodes: token ids [N, L], lengths [N], and the batch index of each one's image."""

    ids: torch.Tensor
    lengths: torch.Tensor
    image: torch.Tensor


@dataclass
class Pairs:
    """Pairs p = (image_index[p], text_index[p]) into the step's images and captions, with labels and
    loss weights (summing to 1, or 0.5 when a batch has no valid negative)."""

    image_index: torch.Tensor
    text_index: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor

    def to(self, device: torch.device | str) -> "Pairs":
        return Pairs(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})

    def __len__(self) -> int:
        """Pairs that count (weight > 0); read it while `weights` is on the host (on a GPU it is a sync)."""
        return int((self.weights > 0).sum())


def step_captions(batch: dict, per_image: int, gen: torch.Generator) -> StepCaptions:
    """Every caption of every image (per_image <= 0), or `per_image` distinct random ones per image."""
    n = batch["n_captions"]
    b, c = batch["ids"].shape[:2]
    valid = torch.arange(c)[None, :] < n[:, None]
    if 0 < per_image < c:
        # The per_image valid slots with the smallest uniform draws: a uniform subset of that image's captions.
        draw = torch.rand((b, c), generator=gen).masked_fill(~valid, 2.0)
        chosen = torch.zeros_like(valid)
        chosen.scatter_(1, draw.argsort(dim=1)[:, :per_image], True)
        valid &= chosen
    image, slot = valid.nonzero(as_tuple=True)
    return StepCaptions(batch["ids"][image, slot], batch["lengths"][image, slot], image)


def balanced_pairs(caps: StepCaptions, key_ids: torch.Tensor, gen: torch.Generator) -> Pairs:
    """One pair per caption: its own image (label 1) or, with probability 0.5, the text of a caption of
    another image in the batch (label 0): the other image uniform among the batch's other distinct
    images (by key: a repeated image is not "other"), then one of its captions uniformly. A batch
    holding a single image keeps every pair positive.

    O(n log n) in the step's captions (a sort), never an n x n matrix: the other image is the caption's
    own image plus a uniform offset in [1, U) modulo the U distinct images.
    """
    n = caps.image.shape[0]
    keys, owner = torch.unique(key_ids[caps.image], return_inverse=True)  # distinct image of each caption
    u = keys.numel()
    negative = (torch.rand(n, generator=gen) < 0.5) & (u > 1)
    other_image = (owner + torch.randint(1, max(2, u), (n,), generator=gen)) % max(1, u)
    counts = torch.bincount(owner, minlength=u)  # >= 1: every distinct image here has a caption
    starts = counts.cumsum(0) - counts
    by_image = torch.argsort(owner, stable=True)  # captions grouped by distinct image
    n_other = counts[other_image]
    pick = torch.minimum((torch.rand(n, generator=gen) * n_other).long(), n_other - 1)  # uniform in [0, n_other)
    other = by_image[starts[other_image] + pick]
    text = torch.where(negative, other, torch.arange(n))
    return Pairs(caps.image, text, (~negative).float(), torch.full((n,), 1.0 / max(1, n)))


def in_batch_negatives(scores: torch.Tensor | None, valid: torch.Tensor, k: int, mode: str,
                       gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [B, k], usable [B, k]): for each image, k captions among the `valid` ones [B, N].

    mode "hard" takes the highest `scores` (image i against caption j), "random" a uniform draw, "itc"
    a draw without replacement in proportion to softmax(scores) over the valid captions (Gumbel top-k;
    ALBEF's negatives from the contrastive similarities). When an image has fewer than k valid
    captions its extra slots are marked unusable. `valid` is on the host and so is `usable` (counted
    from it, not read from the scores); the indices are on the scores' device, so hard negatives never
    copy the logits to the host.
    """
    k = max(1, min(k, valid.shape[1]))
    usable = torch.arange(k)[None, :] < valid.sum(dim=1, keepdim=True)
    if mode in ("hard", "itc"):
        if scores is None:
            raise ValueError(f"{mode} negatives need the step's scores")
        ranked = scores.detach().float()
        if mode == "itc":
            uniform = torch.rand(valid.shape, generator=gen).clamp(1e-12, 1 - 1e-7)
            ranked = ranked - torch.log(-torch.log(uniform)).to(ranked.device, non_blocking=True)
        ranked = ranked.masked_fill(~valid.to(ranked.device, non_blocking=True), float("-inf"))
    elif mode == "random":
        ranked = torch.rand(valid.shape, generator=gen).masked_fill(~valid, float("-inf"))
    else:
        raise ValueError(f"unknown negatives mode {mode!r} (random|hard|itc)")
    return ranked.topk(k, dim=1).indices, usable


def in_batch_pairs(caps: StepCaptions, key_ids: torch.Tensor, k: int, mode: str, gen: torch.Generator,
                   scores: torch.Tensor | None = None) -> Pairs:
    """Every caption with its own image (positives, half the loss) and each image with k captions of
    other images (negatives, the other half). `scores` [B, N] is needed for modes "hard" and "itc"; then
    `text_index` is on its device and everything else on the host."""
    b, n = key_ids.shape[0], caps.image.shape[0]
    valid = key_ids[:, None] != key_ids[caps.image][None, :]
    neg, usable = in_batch_negatives(scores, valid, k, mode, gen)
    usable = usable.reshape(-1)
    n_neg = int(usable.sum())
    pos_w = torch.full((n,), 0.5 / max(1, n))
    neg_w = torch.where(usable, torch.tensor(0.5 / max(1, n_neg)), torch.tensor(0.0))
    return Pairs(image_index=torch.cat([caps.image, torch.arange(b).repeat_interleave(neg.shape[1])]),
                 text_index=torch.cat([torch.arange(n).to(neg.device, non_blocking=True), neg.reshape(-1)]),
                 labels=torch.cat([torch.ones(n), torch.zeros(neg.numel())]),
                 weights=torch.cat([pos_w, neg_w]))


def drop_words(ids: torch.Tensor, lengths: torch.Tensor, p: float, gen: torch.Generator, unk_id: int = 1) -> torch.Tensor:
    """Word dropout: each token within its caption's length becomes `unk_id` with probability p (a copy)."""
    positions = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    hit = (torch.rand(ids.shape, generator=gen) < p) & positions
    return ids.masked_fill(hit, unk_id)


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
