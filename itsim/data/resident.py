"""The train split held in memory, decoded once: `itsim train --data-on-device`.

Why: streaming decodes every stored JPEG again in every epoch, about 900 images/s per core at 299 px,
which is what limits an H200 (launch/README.md, sizing note). A split that fits is decoded once into
one uint8 tensor [N, H, W, 3] on the training device (in RAM on a CPU); each step gathers its batch
there, and the trainer augments it there. Streaming (data/loader.py) stays the default: it has no
size limit.

Batches have the streaming loader's dict format (`images`, `ids`, `lengths`, `n_captions`, `key_ids`,
`keys`, `worker`, `bad_samples`), so the training step is the same for both. The images are on the
device; the captions stay on the host, where the step's pairs are drawn and where packing needs the
lengths (a step's token ids are about 100 KB).

Order, a pure function of (seed, epoch, rank): each epoch a `torch.randperm` of the N images from a
CPU generator seeded by (seed, epoch); rank r takes every world_size-th entry; its batch j is the
entries j*B .. j*B+B-1 of that slice, the last batch wrapping to the slice's start (one pass within
one batch per rank, and every batch the same shape). Resuming at batch g starts at
(epoch, j) = divmod(g, batches_per_epoch): nothing to skip or replay.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import psutil
import torch

from itsim.data.loader import SAMPLE_KEYS, _seed, decode_sample, key_id, shard_samples, split_shards
from itsim.errors import UserError
from itsim.images import ImageError

log = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.6  # of the free device memory / available RAM; the rest is for activations and optimizer


@dataclass
class ResidentSplit:
    """A decoded split: images on the device, captions on the host."""

    images: torch.Tensor  # uint8 [N, H, W, 3], on the training device
    ids: torch.Tensor  # int32 [N, C, L]; C = the most captions of any image (padding rows have length 1)
    lengths: torch.Tensor  # int32 [N, C]
    n_captions: torch.Tensor  # int64 [N]
    key_ids: torch.Tensor  # int64 [N]
    keys: list[str]
    skipped: int  # samples that could not be read or decoded (logged)

    def __len__(self) -> int:
        return len(self.keys)


def memory_budget(device: torch.device, budget_gb: float = 0.0, local_ranks: int = 1) -> tuple[float, str]:
    """(bytes the split may take, where that number comes from).

    `budget_gb` > 0 is taken as stated; otherwise a fraction of what is free now: the CUDA device's
    free memory (one GPU per rank), or the available RAM shared by the machine's local ranks.
    """
    if budget_gb > 0:
        return budget_gb * 1e9, f"--device-memory-gb {budget_gb:g}"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return DEFAULT_FRACTION * free, f"{DEFAULT_FRACTION:.0%} of {device}'s {free / 1e9:.1f} GB free"
    available = psutil.virtual_memory().available
    return (DEFAULT_FRACTION * available / max(1, local_ranks),
            f"{DEFAULT_FRACTION:.0%} of the {available / 1e9:.1f} GB of available RAM / {local_ranks} local rank(s)")


def check_fits(n_images: int, image_size: int, budget: float, source: str) -> int:
    """The split's image bytes; a UserError when they exceed the budget."""
    need = n_images * image_size * image_size * 3
    if need > budget:
        raise UserError(f"--data-on-device: the train split needs {need / 1e9:.2f} GB ({n_images} images x "
                        f"{image_size}x{image_size}x3 bytes), more than the {budget / 1e9:.2f} GB budget ({source}); "
                        "train without --data-on-device (streaming) or state a budget with --device-memory-gb")
    return need


def _decode(raw: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return decode_sample(raw) if all(k in raw for k in SAMPLE_KEYS) else None
    except (ImageError, ValueError, KeyError, OSError) as exc:
        log.warning("skipping bad sample %s in %s: %s", raw.get("__key__"), raw.get("__url__"), exc)
        return None


def load_split(shard_dir: str | Path, split: str, n_images: int, image_size: int, device: torch.device,
               threads: int = 1, chunk: int = 512, options: Mapping[str, Any] | None = None) -> ResidentSplit:
    """Decode a split once (`threads` decoding in parallel: Pillow releases the GIL) into a tensor of
    `n_images` (the manifest's count, an upper bound) on `device`; bad samples are logged and skipped."""
    images = torch.empty((n_images, image_size, image_size, 3), dtype=torch.uint8, device=device)
    skipped = [0]

    def on_error(exc: Exception) -> bool:
        skipped[0] += 1
        log.warning("skipping unreadable shard data: %s", exc)
        return True

    raw = shard_samples(split_shards(shard_dir, split, options), on_error, options)
    keys: list[str] = []
    ids: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        while block := list(islice(raw, chunk)):
            decoded = [d for d in pool.map(_decode, block) if d is not None]
            skipped[0] += len(block) - len(decoded)
            if not decoded:
                continue
            if len(keys) + len(decoded) > n_images:
                raise UserError(f"{shard_dir}: the {split} split holds more samples than its manifest says ({n_images})")
            shapes = {d["image"].shape for d in decoded} - {(image_size, image_size, 3)}
            if shapes:
                raise UserError(f"{shard_dir}: images of size {shapes} in a {image_size} px split (mixed shard settings)")
            images[len(keys):len(keys) + len(decoded)].copy_(torch.from_numpy(np.stack([d["image"] for d in decoded])))
            keys += [d["key"] for d in decoded]
            ids += [d["ids"] for d in decoded]
            lengths += [d["lengths"] for d in decoded]
    return _with_captions(images[:len(keys)], keys, ids, lengths, skipped[0])


def _with_captions(images: torch.Tensor, keys: list[str], ids: list[np.ndarray], lengths: list[np.ndarray],
                   skipped: int) -> ResidentSplit:
    """Pad every image's captions to the split's most (as `loader.collate` pads a batch's)."""
    n, caps = len(keys), max((x.shape[0] for x in ids), default=1)
    max_len = ids[0].shape[1] if ids else 1
    ids_all = np.zeros((n, caps, max_len), dtype=np.int32)
    lengths_all = np.ones((n, caps), dtype=np.int32)
    for i, (x, l) in enumerate(zip(ids, lengths)):
        ids_all[i, :x.shape[0]], lengths_all[i, :x.shape[0]] = x, l
    return ResidentSplit(images=images, ids=torch.from_numpy(ids_all), lengths=torch.from_numpy(lengths_all),
                         n_captions=torch.tensor([x.shape[0] for x in ids], dtype=torch.int64),
                         key_ids=torch.tensor([key_id(k) for k in keys], dtype=torch.int64), keys=keys,
                         skipped=skipped)


class ResidentBatches:
    """Endless batches for one rank from a `ResidentSplit`, starting at global batch `start_batch`."""

    def __init__(self, data: ResidentSplit, batch_size: int, batches_per_epoch: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0):
        if len(data) < world_size:
            raise UserError(f"--data-on-device: {len(data)} train images for {world_size} ranks")
        self.data, self.batch_size, self.per_epoch = data, batch_size, batches_per_epoch
        self.seed, self.rank, self.world_size, self.start_batch = seed, rank, world_size, start_batch
        self._epoch: tuple[int, torch.Tensor] | None = None

    def indices(self, index: int) -> torch.Tensor:
        """Image indices (host, int64) of this rank's global batch `index`."""
        epoch, j = divmod(index, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed(_seed(self.seed, epoch, "resident") >> 1)
            self._epoch = (epoch, torch.randperm(len(self.data), generator=gen)[self.rank::self.world_size])
        mine = self._epoch[1]
        return mine[(j * self.batch_size + torch.arange(self.batch_size)) % len(mine)]

    def batch(self, index: int) -> dict[str, Any]:
        idx = self.indices(index)
        data = self.data
        images = data.images.index_select(0, idx.to(data.images.device, non_blocking=True))
        return {"images": images, "ids": data.ids[idx], "lengths": data.lengths[idx],
                "n_captions": data.n_captions[idx], "key_ids": data.key_ids[idx],
                "keys": [data.keys[i] for i in idx.tolist()], "worker": 0, "bad_samples": data.skipped}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index = self.start_batch
        while True:
            yield self.batch(index)
            index += 1


def decode_threads(workers: int) -> int:
    """Decoding threads for `load_split`: the loader workers a streaming run would have used, at least 1."""
    return max(1, min(workers or 1, os.cpu_count() or 1))
