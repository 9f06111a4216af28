"""Training batches from WebDataset shards, built per rank and per DataLoader worker.

Why not `accelerator.prepare(dataloader)`: Accelerate re-shards or broadcasts iterable datasets,
which either feeds every rank from rank 0 or drops data when combined with node splitting. Here each
rank opens its own pipeline, splits shards explicitly by rank and by worker, and produces a fixed
number of batches per epoch, so no rank waits on another at an epoch's end.

Exact resume: the batch stream is a pure function of (seed, epoch, rank, logical worker). Logical
worker w owns the rank's global batch indices g with g % W == w, counted across epochs (an epoch of
B batches need not be a multiple of W: B = ceil(images / (batch x ranks)), one pass within one
batch per rank). In epoch e a worker makes its owned batches from its own shards of that epoch, in
order. On resume at batch j the physical workers are rotated so that the DataLoader's round-robin
(which always starts at worker 0) asks first for batch j. Batches already consumed are skipped as
raw bytes, before any JPEG is decoded.

Security: only the `jpg`, `json`, `ids.npy` and `lengths.npy` members are read from a tar; nothing
is unpickled (`np.load(allow_pickle=False)`); any other member (a planted `.pyd`/`.pickle`) is
never even read.

Shards on disk or in an object store (`--shards s3://...`) are listed and opened by `data/source.py`
(each rank and worker opens its own, with retries on transient store errors); its names are
re-exported here for the loader's callers.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle

from itsim.data.source import (SAMPLE_KEYS, load_vocab, one_line_errors, read_manifest, shard_samples,
                               split_shards)
from itsim.errors import UserError
from itsim.images import DEFAULT_MAX_PIXELS, ImageError, decode_rgb

__all__ = ["SAMPLE_KEYS", "StreamSpec", "ShardStream", "batch_nbytes", "batches_per_epoch", "collate", "decode_sample",
           "iter_split", "key_id", "load_vocab", "make_loader", "one_line_errors", "owned_batches", "plan_prefetch",
           "read_manifest", "read_split", "shard_samples", "shm_free", "split_shards"]

log = logging.getLogger(__name__)


def _seed(*parts: Any) -> int:
    """Stable seed from parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def key_id(key: str) -> int:
    """Integer id of a sample key, so batches can mask same-image negatives without strings."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=7).digest(), "little")


def _complete(sample: dict[str, Any]) -> bool:
    return all(k in sample for k in SAMPLE_KEYS)


def decode_sample(sample: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Raw tar members -> arrays. Raises ValueError/ImageError on a bad sample."""
    ids = np.load(io.BytesIO(sample["ids.npy"]), allow_pickle=False)
    lengths = np.load(io.BytesIO(sample["lengths.npy"]), allow_pickle=False)
    if ids.ndim != 2 or lengths.shape != (ids.shape[0],) or ids.shape[0] == 0:
        raise ValueError(f"bad token arrays {ids.shape} / {lengths.shape}")
    meta = json.loads(sample["json"])
    return {"key": sample["__key__"], "image": decode_rgb(sample["jpg"], max_pixels), "ids": ids.astype(np.int32),
            "lengths": lengths.astype(np.int32), "meta": meta}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """uint8 images [B,H,W,3], ids [B,C,L] (C = most captions in the batch), lengths [B,C], n_captions [B]."""
    n_caps = max(s["ids"].shape[0] for s in samples)
    max_len = samples[0]["ids"].shape[1]
    ids = np.zeros((len(samples), n_caps, max_len), dtype=np.int32)
    lengths = np.ones((len(samples), n_caps), dtype=np.int32)
    for i, s in enumerate(samples):
        n = s["ids"].shape[0]
        ids[i, :n], lengths[i, :n] = s["ids"], s["lengths"]
    return {
        "images": torch.from_numpy(np.stack([s["image"] for s in samples])),
        "ids": torch.from_numpy(ids),
        "lengths": torch.from_numpy(lengths),
        "n_captions": torch.tensor([s["ids"].shape[0] for s in samples], dtype=torch.int64),
        "key_ids": torch.tensor([key_id(s["key"]) for s in samples], dtype=torch.int64),
        "keys": [s["key"] for s in samples],
    }


@dataclass
class StreamSpec:
    shards: list[str]
    batch_size: int
    batches_per_epoch: int  # per rank (`batches_per_epoch()`)
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle_buffer: int = 1000
    start_batch: int = 0  # global batch index on this rank to start from (resume)
    max_pixels: int = DEFAULT_MAX_PIXELS
    options: Mapping[str, Any] | None = field(default=None, repr=False)  # storage options (may hold secrets)


class ShardStream(IterableDataset):
    """Endless, deterministic stream of batches for one rank (epochs follow each other)."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def _cycle_shards(self, epoch: int, cycle: int, logical: int, n_workers: int) -> list[str]:
        """This worker's shards for one pass (`cycle`) of `epoch`."""
        spec = self.spec
        slots = spec.world_size * n_workers
        slot = spec.rank * n_workers + logical
        if len(spec.shards) >= slots:
            order = list(spec.shards)
            random.Random(_seed(spec.seed, epoch, cycle, "shards")).shuffle(order)
            return order[slot::slots]
        # Fewer shards than ranks x workers: resample with replacement rather than leave a worker idle.
        rng = random.Random(_seed(spec.seed, epoch, cycle, slot, "resample"))
        return [rng.choice(spec.shards) for _ in range(len(spec.shards))]

    def _samples(self, epoch: int, logical: int, n_workers: int, stats: dict[str, int]) -> Iterator[dict]:
        """Shuffled raw samples of this worker's shards; passes repeat until the epoch's batches are made.

        Each pass has its own shuffle buffer, so within an epoch's first pass the ranks' samples stay
        disjoint (a buffer spanning passes would pull in the next pass's shards early).
        """
        spec = self.spec

        def on_error(exc: Exception) -> bool:
            stats["bad_samples"] += 1
            log.warning("skipping unreadable shard data: %s", exc)
            return True

        for cycle in range(1 << 30):
            urls = self._cycle_shards(epoch, cycle, logical, n_workers)
            found = [0]

            def complete(it):
                for s in it:
                    if _complete(s):
                        found[0] += 1
                        yield s
                    else:
                        stats["bad_samples"] += 1
                        log.warning("skipping incomplete sample %s in %s", s.get("__key__"), s.get("__url__"))

            raw = shard_samples(urls, on_error, spec.options)
            rng = random.Random(_seed(spec.seed, epoch, cycle, spec.rank, logical, "samples"))
            yield from _shuffle(complete(raw), bufsize=spec.shuffle_buffer, initial=min(100, spec.shuffle_buffer),
                                rng=rng)
            if found[0] == 0:
                raise RuntimeError(f"no readable samples in shards {urls[:3]}...: check the shard files")

    def _raw_batches(self, epoch: int, logical: int, n_workers: int, stats: dict[str, int]) -> Iterator[list[dict]]:
        samples = self._samples(epoch, logical, n_workers, stats)
        while True:
            yield list(islice(samples, self.spec.batch_size))

    def _decode_batch(self, raw: list[dict], stats: dict[str, int]) -> dict[str, Any] | None:
        decoded = []
        for s in raw:
            try:
                decoded.append(decode_sample(s, self.spec.max_pixels))
            except (ImageError, ValueError, KeyError, OSError) as exc:
                stats["bad_samples"] += 1
                log.warning("skipping bad sample %s in %s: %s", s.get("__key__"), s.get("__url__"), exc)
        if not decoded:
            return None
        shapes = {d["image"].shape for d in decoded}
        if len(shapes) > 1:
            raise RuntimeError(f"images of different sizes in one batch {shapes}: shards built with mixed settings")
        return collate(decoded)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        info = get_worker_info()
        n_workers, physical = (info.num_workers, info.id) if info else (1, 0)
        # Rotate so that physical worker 0 makes global batch `start_batch` (see module docstring).
        logical = (physical + spec.start_batch) % n_workers
        stats = {"bad_samples": 0}
        epoch = spec.start_batch // spec.batches_per_epoch
        while True:
            owned = owned_batches(epoch, logical, n_workers, spec.batches_per_epoch)
            raw_batches = self._raw_batches(epoch, logical, n_workers, stats) if len(owned) else iter(())
            for index, raw in zip(owned, raw_batches):  # zip stops before reading past the owned batches
                if index < spec.start_batch:
                    continue
                batch = self._decode_batch(raw, stats)
                if batch is not None:
                    batch["bad_samples"] = stats["bad_samples"]
                    batch["worker"] = logical
                    yield batch
            epoch += 1


def owned_batches(epoch: int, logical: int, n_workers: int, per_epoch: int) -> range:
    """The global batch indices of `epoch` that logical worker `logical` makes: g % n_workers == logical."""
    lo = epoch * per_epoch
    return range(lo + (logical - lo) % n_workers, lo + per_epoch, n_workers)


def batches_per_epoch(n_images: int, batch_size: int, world_size: int, workers: int = 0) -> int:
    """Per-rank batches of one epoch: one pass over the images, within one batch per rank.

    Not rounded to the loader workers (that made Flickr8k on 8 GPUs x 8 workers 2.24 passes per
    "epoch"): workers own batch indices modulo their count across epochs (`owned_batches`), so any
    count works with exact resume. `workers` is accepted for callers and ignored.
    """
    return max(1, -(-n_images // (batch_size * world_size)))


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the main process, which finishes its step and checkpoints.

    Schedulers (SLURM, Kubernetes, `timeout`) signal the whole process group; a worker dying first
    would make the main process fail instead of saving a checkpoint. Workers exit with the main process.
    """
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


SHM = "/dev/shm"


def batch_nbytes(batch_size: int, image_size: int, captions_per_image: int, max_len: int) -> int:
    """Bytes of one collated batch: uint8 images plus token ids and lengths (int32)."""
    return batch_size * (image_size * image_size * 3 + captions_per_image * (max_len + 1) * 4 + 16)


def shm_free(path: str = SHM) -> int | None:
    """Free bytes of the shared-memory filesystem DataLoader workers pass batches through; None without one."""
    return shutil.disk_usage(path).free if os.path.isdir(path) else None


def plan_prefetch(batch_bytes: int, workers: int, local_ranks: int, free: int | None, wanted: int = 4) -> int:
    """The DataLoader prefetch factor whose batches fit this rank's share of /dev/shm.

    Each worker's finished batches wait in shared memory: `workers x prefetch` per rank, plus the one
    the main process holds and the one being pinned. At 299 px a batch of 256 is 69 MB, so 8 ranks x
    8-12 workers x prefetch 4 want 17-26 GB, while containers get 64 MB by default and workers then
    die with a bus error mid-run. Lowers the factor (with a warning) to fit, or raises a UserError
    naming the `--shm-size` the job needs. Every local rank gets an equal share of what is free now.
    """
    if workers <= 0 or free is None:
        return wanted
    share = free * 0.9 / max(1, local_ranks)  # a margin for the allocator and other users

    def need(prefetch: int) -> int:
        return (workers * prefetch + 2) * batch_bytes

    fits = [p for p in range(wanted, 0, -1) if need(p) <= share]
    if not fits:
        full = local_ranks * need(wanted) / 0.9
        raise UserError(
            f"{SHM} has {free / 1e9:.2f} GB free; {local_ranks} rank(s) x {workers} loader workers with batches of "
            f"{batch_bytes / 1e6:.1f} MB need {local_ranks * need(1) / 0.9 / 1e9:.2f} GB even at prefetch 1 "
            f"({full / 1e9:.1f} GB at {wanted}): run the container with --shm-size={int(-(-full // 1e9))}g or "
            "--ipc=host, or lower --workers / --batch-size, or use --data-on-device")
    if fits[0] < wanted:
        log.warning("loader prefetch lowered from %d to %d batches per worker: %s has %.2f GB free for %d rank(s) "
                    "(batches of %.1f MB); give the job more shared memory (--shm-size, --ipc=host) for the full "
                    "prefetch", wanted, fits[0], SHM, free / 1e9, local_ranks, batch_bytes / 1e6)
    return fits[0]


def make_loader(spec: StreamSpec, workers: int = 2, pin_memory: bool = False, prefetch: int = 4) -> DataLoader:
    # Its own generator: starting the workers must not draw from the global torch RNG, whose state is
    # part of a checkpoint (dropout) and must be the same whether a run was resumed or not.
    return DataLoader(ShardStream(spec), batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, prefetch_factor=prefetch if workers > 0 else None,
                      generator=torch.Generator().manual_seed(spec.seed),
                      worker_init_fn=_ignore_stop_signals if workers > 0 else None)


def iter_split(shard_dir: str | Path, split: str, skipped: dict[str, int] | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS,
               options: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Every decodable sample of a split in shard order (validation, evaluation, scoring).

    Bad data (also a shard gone since the listing) is logged with its shard and counted by reason in
    `skipped`; nothing is unpickled. `shard_dir` may be a store URL (`options`: its storage options).
    """
    skipped = {} if skipped is None else skipped

    def count(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    def on_error(exc: Exception) -> bool:
        count("unreadable_shard_data")
        log.warning("skipping unreadable shard data: %s", exc)
        return True

    for raw in shard_samples(split_shards(shard_dir, split, options), on_error, options):
        if not _complete(raw):
            reason = "incomplete_sample"
        else:
            try:
                yield decode_sample(raw, max_pixels)
                continue
            except ImageError as exc:
                reason = f"image_{exc.reason}"
            except (ValueError, KeyError, OSError):
                reason = "bad_sample"
        count(reason)
        log.warning("skipping sample %s in %s: %s", raw.get("__key__"), raw.get("__url__"), reason)


def read_split(shard_dir: str | Path, split: str, max_images: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The first `max_images` samples of a split, in memory."""
    return list(islice(iter_split(shard_dir, split, max_pixels=max_pixels, options=options), max_images))
