"""One training step's loss: a batch -> the step's captions and pairs -> logits -> weighted BCE.

Kept apart from the training loop so the loop stays a loop, and so the GPU benchmark runs the very
same step (`benchmarks/gpu.py`).
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from itsim.data.pairs import Pairs, balanced_pairs, drop_words, in_batch_pairs, step_captions
from itsim.text import UNK_ID


class PairsConfig(Protocol):
    """The fields of `TrainConfig` a step's pairs depend on."""

    pairs: str
    negatives: str
    negatives_k: int
    captions_per_image: int
    label_smoothing: float
    itc_weight: float
    word_dropout: float


def step_loss(model: torch.nn.Module, images: torch.Tensor, batch: dict[str, Any], cfg: PairsConfig,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(loss, correctly classified pairs, pairs) for one batch; `images` already on the device.

    The model is called exactly once (DDP needs one forward per backward): hard negatives score every
    image against every caption and then pick from those logits, on the device. Nothing here waits for
    the GPU: captions, lengths and pair counts stay on the host (lengths go to the model as a NumPy
    array, which DDP does not move), host tensors go to the device without blocking, and the loss and
    the correct count come back as device tensors for the caller to read when it logs.
    """
    device = images.device
    caps = step_captions(batch, cfg.captions_per_image, gen)
    word_dropout = getattr(cfg, "word_dropout", 0.0)
    caption_ids = drop_words(caps.ids, caps.lengths, word_dropout, gen, UNK_ID) if word_dropout > 0 else caps.ids
    lengths = caps.lengths.clamp(1, caps.ids.shape[1])
    ids = caption_ids[:, :int(lengths.max())].to(device, non_blocking=True)  # padding beyond the longest: never read
    lengths = lengths.numpy()
    key_ids = batch["key_ids"]
    itc_weight = getattr(cfg, "itc_weight", 0.0)
    sim = None
    if itc_weight > 0 or cfg.negatives == "itc":
        chosen: list[Pairs] = []

        def select(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # in-batch "hard" and "itc" negatives come from the contrastive similarities here
            if cfg.pairs == "balanced":
                found = balanced_pairs(caps, key_ids, gen)
            else:
                found = in_batch_pairs(caps, key_ids, cfg.negatives_k, cfg.negatives, gen,
                                       scores=similarity.float().cpu())
            chosen.append(found)
            chosen.append(found.to(device))
            return chosen[1].image_index, chosen[1].text_index

        logits, sim = model(images, ids, lengths, select=select)
        n_pairs = len(chosen[0])
        pairs = chosen[1]
    elif cfg.pairs == "balanced":
        pairs = balanced_pairs(caps, key_ids, gen)
        n_pairs = len(pairs)
        pairs = pairs.to(device)
        logits = model(images, ids, lengths, pairs.image_index, pairs.text_index)
    elif cfg.negatives == "hard":
        b, n = images.shape[0], caps.image.shape[0]
        every_image = torch.arange(b, device=device).repeat_interleave(n)
        every_caption = torch.arange(n, device=device).repeat(b)
        all_logits = model(images, ids, lengths, every_image, every_caption).view(b, n)
        pairs = in_batch_pairs(caps, key_ids, cfg.negatives_k, "hard", gen, scores=all_logits.detach())
        n_pairs = len(pairs)
        pairs = pairs.to(device)
        logits = all_logits[pairs.image_index, pairs.text_index]
    else:
        pairs = in_batch_pairs(caps, key_ids, cfg.negatives_k, cfg.negatives, gen)
        n_pairs = len(pairs)
        pairs = pairs.to(device)
        logits = model(images, ids, lengths, pairs.image_index, pairs.text_index)
    logits = logits.float()
    target = pairs.labels * (1 - 2 * cfg.label_smoothing) + cfg.label_smoothing
    loss = (pairs.weights * F.binary_cross_entropy_with_logits(logits, target, reduction="none")).sum()
    if sim is not None and itc_weight > 0:
        positive = (key_ids[:, None] == key_ids[caps.image][None, :]).to(device)
        loss = loss + itc_weight * itc_loss(sim.float(), positive)
    counted = pairs.weights > 0
    correct = (((logits > 0).float() == pairs.labels) & counted).float().sum()
    return loss, correct, n_pairs


def itc_loss(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch: sim [B images, N captions] (temperature-scaled), positive [B, N]
    marks each image's own captions. Each row (image -> captions) and each column (caption -> images)
    is a softmax cross-entropy against the uniform distribution over its positives; the mean of both."""
    target = positive.float()
    i2t = -(target / target.sum(1, keepdim=True).clamp(min=1) * F.log_softmax(sim, dim=1)).sum(1)
    t2i = -(target / target.sum(0, keepdim=True).clamp(min=1) * F.log_softmax(sim, dim=0)).sum(0)
    return 0.5 * (i2t[target.sum(1) > 0].mean() + t2i[target.sum(0) > 0].mean())
