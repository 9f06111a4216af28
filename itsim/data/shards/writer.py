"""Writing shards: one shard is the unit of work that processes and Ray tasks run, and of resume.

A shard is written to a temporary name and renamed only when complete, then its `_stats.json` is
written the same way; a shard counts as done only when both exist and the stats name the same plan
(`plan_hash`) and byte size. Everything that goes into the tar is a pure function of the task
(fixed member order, mtime 0, fixed owner), so the bytes do not depend on which worker wrote it.

Kept free of torch/webdataset imports so that worker processes start fast.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from itsim.io import atomic_write, ray_session, temp_name
from itsim.images import ImageError, encode_jpeg, load_image, safe_path_in
from itsim.progress import every_tenth, progress
from itsim.text import Vocab

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_KEY_MAX = 60  # USTAR member names are limited to 100 characters; key + ".lengths.npy" must fit
# A sample's members, in the order written (sorted, as webdataset's TarWriter orders them). `txt` (the
# first caption) is for other readers (open_clip `--wds-caption-key txt`, img2dataset-style pipelines);
# `json` keeps every caption; itsim's own readers use json and the token arrays.
MEMBERS = ("ids.npy", "jpg", "json", "lengths.npy", "txt")


@dataclasses.dataclass(frozen=True)
class ShardItem:
    """One image and all its (non-empty) captions."""

    image: str
    key: str
    captions: tuple[str, ...]
    caption_idx: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """Everything needed to write one shard, picklable for processes and Ray."""

    name: str
    split: str
    out_dir: str
    images_root: str
    source: str
    items: tuple[ShardItem, ...]
    vocab_words: tuple[str, ...]
    image_size: int = 299
    resize: str = "stretch"
    max_len: int = 100
    jpeg_quality: int = 95
    max_pixels: int = 64 * 1024 * 1024

    @property
    def tar_path(self) -> Path:
        return Path(self.out_dir) / f"{self.name}.tar"

    @property
    def stats_path(self) -> Path:
        return Path(self.out_dir) / f"{self.name}_stats.json"

    def plan_hash(self) -> str:
        """Identifies what this shard should contain; independent of where OUT lives."""
        # The JSON of the task's fields without asdict's deep copy of every item (a measurable share of a
        # shard's time); the hash is stored in _stats.json, so it changes only when a shard's content does.
        fields: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.pop("out_dir")
        fields["items"] = [{f.name: getattr(item, f.name) for f in dataclasses.fields(item)} for item in self.items]
        fields["vocab_words"] = hashlib.sha256("\n".join(self.vocab_words).encode()).hexdigest()
        # What a sample holds is part of the plan: shards written before a member was added are rewritten.
        fields["members"] = list(MEMBERS)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def make_keys(names: list[str]) -> dict[str, str]:
    """Image name -> unique WebDataset key of letters, digits, `_` and `-` (no dots).

    The key is the name without its extension when that is already safe and unique; otherwise a
    short hash of the full name is appended, so `a b.jpg`, `a_b.jpg` and `a.png` never collide.
    """
    def digest(name: str, n: int = 8) -> str:
        return hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:n]

    def base(name: str) -> tuple[str, bool]:
        stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
        safe = _UNSAFE.sub("_", stem).strip("_")[:_KEY_MAX]
        return safe, safe == stem

    unique = sorted(set(names))
    bases = {name: base(name) for name in unique}
    counts: dict[str, int] = {}
    for safe, _ in bases.values():
        counts[safe] = counts.get(safe, 0) + 1
    keys = {}
    for name, (safe, clean) in bases.items():
        if clean and safe and counts[safe] == 1:
            keys[name] = safe
        else:
            keys[name] = f"{safe or 'img'}-{digest(name)}"
    taken: dict[str, int] = {}
    for key in keys.values():
        taken[key] = taken.get(key, 0) + 1
    for name, key in keys.items():  # a clean name that happens to look like `x-<hash>`
        if taken[key] > 1:
            # 47 + 1 + 40 characters: `<key>.lengths.npy` stays within USTAR's 100-character names
            keys[name] = f"{base(name)[0][:47] or 'img'}-{digest(name, 40)}"
    return keys


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """Our members: a regular file, mtime 0, read-only, owner `itsim` (nothing from the writer's machine)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = "itsim"
    return info


def _header_parts() -> tuple[bytes, bytes, bytes, int]:
    """The fields every member header shares, cut from a header tarfile made: mode/uid/gid, mtime, and
    everything after the checksum (type, owner names, magic...), plus the byte sum of the last."""
    buf = _tarinfo("x", 0).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    return buf[100:124], buf[136:148], buf[156:], sum(buf[156:])


_MODE_IDS, _MTIME, _AFTER_CHKSUM, _AFTER_CHKSUM_SUM = _header_parts()


def _tar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header `tarfile` writes for `_tarinfo(name, size)`, in a few microseconds
    instead of its ~17 (four members per image). Only name, size and checksum differ between members;
    a name over 100 bytes or a size over 8 GiB goes to tarfile itself (which splits or refuses it).
    """
    raw = name.encode(tarfile.ENCODING, "surrogateescape")
    if len(raw) > 100 or size >= 8 ** 11:
        return _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    head = raw.ljust(100, tarfile.NUL) + _MODE_IDS + b"%011o\0" % size + _MTIME
    checksum = sum(head) + 8 * ord(" ") + _AFTER_CHKSUM_SUM  # the checksum field counts as 8 spaces
    return head + b"%06o\0 " % checksum + _AFTER_CHKSUM


class _TarOut:
    """Writes a USTAR archive exactly as `tarfile.open(mode="w", format=USTAR_FORMAT)` does for our
    members (same headers, 512-byte padding, two zero blocks, 10240-byte record), hashing the bytes as
    they go out, so the finished shard is never read back for its SHA-256.
    """

    def __init__(self, fh: Any):
        self.fh = fh
        self.sha = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False)  # what a wids shard index records (`md5sum`)
        self.size = 0

    def _write(self, data: bytes) -> None:
        self.fh.write(data)
        self.sha.update(data)
        self.md5.update(data)
        self.size += len(data)

    @staticmethod
    def member(name: str, data: bytes) -> list[bytes]:
        """Header, data and padding of one member."""
        return [_tar_header(name, len(data)), data, tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)]

    def add(self, members: list[tuple[str, bytes]]) -> None:
        """One sample's members, in the order given, in a single write."""
        self._write(b"".join(part for name, data in members for part in self.member(name, data)))

    def finish(self) -> None:
        """End of archive: two zero blocks, then zeros up to a whole record (`tar -b20`)."""
        end = 2 * tarfile.BLOCKSIZE
        self._write(tarfile.NUL * (end + (-(self.size + end) % tarfile.RECORDSIZE)))


def read_complete_stats(task: ShardTask) -> dict | None:
    """The stats of a finished shard of this exact plan, or None when it must be (re)written."""
    try:
        stats = json.loads(task.stats_path.read_text())
        size = task.tar_path.stat().st_size
    except (OSError, ValueError):
        return None
    if stats.get("plan_hash") != task.plan_hash() or stats.get("bytes") != size:
        return None
    return stats


def _failure(task: ShardTask, item: ShardItem, reason: str, detail: str) -> dict:
    return {"image": item.image, "reason": reason, "detail": detail,
            "caption_rows": len(item.captions), "shard": task.name}


def write_shard(task: ShardTask, progress: Callable[[int], None] | None = None) -> dict:
    """Write one complete shard and its stats; returns the stats (failures included).

    A bad image is recorded and skipped; only an output error (disk full) makes this raise.
    """
    start = time.perf_counter()
    vocab = Vocab(task.vocab_words)
    root = Path(task.images_root).resolve()  # once per shard, not per image (safe_path would redo it)
    task.stats_path.unlink(missing_ok=True)  # a stale stats file must never vouch for a new tar
    tmp = temp_name(task.tar_path)
    failures: list[dict] = []
    images_ok = captions = 0
    try:
        with open(tmp, "wb") as fh:
            tar = _TarOut(fh)
            for item in task.items:
                try:
                    path = safe_path_in(root, item.image)
                    img = load_image(path, task.image_size, task.resize, task.max_pixels)
                    jpg = encode_jpeg(img, task.jpeg_quality)
                except ImageError as exc:
                    failures.append(_failure(task, item, exc.reason, str(exc).removeprefix(f"{exc.reason}: ")))
                except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the build
                    log.debug("unexpected error on %s", item.image, exc_info=True)
                    failures.append(_failure(task, item, "unexpected_error", f"{type(exc).__name__}: {exc}"))
                else:
                    ids, lengths = vocab.encode(list(item.captions), task.max_len)
                    meta = {"image": item.image, "captions": list(item.captions),
                            "caption_idx": list(item.caption_idx), "split": task.split, "source": task.source}
                    tar.add([(f"{item.key}.ids.npy", _npy_bytes(ids)),  # the order of MEMBERS
                             (f"{item.key}.jpg", jpg),
                             (f"{item.key}.json", json.dumps(meta, ensure_ascii=False).encode()),
                             (f"{item.key}.lengths.npy", _npy_bytes(lengths)),
                             (f"{item.key}.txt", item.captions[0].encode())])
                    images_ok += 1
                    captions += len(item.captions)
                if progress is not None:
                    progress(1)
            tar.finish()
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, task.tar_path)
    except BaseException:  # a full disk (or Ctrl-C) must not leave a partial temp file behind
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - start
    by_reason: dict[str, int] = {}
    for f in failures:
        by_reason[f["reason"]] = by_reason.get(f["reason"], 0) + 1
    stats = {
        "shard": task.name, "split": task.split, "plan_hash": task.plan_hash(),
        "images_planned": len(task.items), "images_ok": images_ok, "captions": captions,
        "caption_rows_failed": sum(f["caption_rows"] for f in failures),
        "failures_by_reason": dict(sorted(by_reason.items())), "failures": failures,
        "bytes": tar.size, "sha256": tar.sha.hexdigest(), "md5": tar.md5.hexdigest(),
        "seconds": round(seconds, 3), "images_per_second": round(len(task.items) / max(seconds, 1e-9), 1),
    }
    atomic_write(task.stats_path, json.dumps(stats, indent=1))
    return stats


# ---- running many shards ----------------------------------------------------------------------

def _init_worker() -> None:
    """One thread per worker: parallelism comes from the workers, not from BLAS/torch threads."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _mp_context() -> multiprocessing.context.BaseContext:
    """A fork server where there is one (safe when the caller has threads), else spawn.

    The fork server imports this module (numpy, PIL) once, so each worker forked from it starts ready
    instead of spending ~0.15 s importing it, on every build. `__main__` stays preloaded as by default.
    This only affects a fork server this process has not started yet.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", __name__])
    return ctx


def start_workers_early() -> None:
    """Start the fork server now, so that it imports while the caller reads captions and plans shards.

    Costs an idle process when the plan turns out to need no pool; saves its start-up when it does.
    """
    if _mp_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _run_processes(todo: list[ShardTask], workers: int, bar: Any) -> list[dict]:
    if workers <= 1:
        return [write_shard(task, progress=bar.update) for task in todo]
    results = []
    pool = cf.ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_init_worker)
    try:
        futures = [pool.submit(write_shard, task) for task in todo]
        for future in cf.as_completed(futures):
            stats = future.result()
            bar.update(stats["images_planned"])
            results.append(stats)
    finally:  # on Ctrl-C or an error, do not start the queued shards
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _run_ray(todo: list[ShardTask], workers: int, address: str | None, bar: Any) -> list[dict]:
    with ray_session(address, num_cpus=workers or None) as ray:
        remote = ray.remote(num_cpus=1, max_retries=2)(write_shard)
        pending = [remote.remote(task) for task in todo]
        results = []
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for stats in ray.get(done):
                bar.update(stats["images_planned"])
                results.append(stats)
        return results


def run_shards(tasks: list[ShardTask], workers: int = 0, engine: str = "processes",
               ray_address: str | None = None) -> tuple[list[dict], int, float]:
    """Write the shards that are not complete yet, with `workers` processes (0 = all CPUs) or Ray tasks.

    Returns the stats of every task in plan order, the images written now and the seconds taken.
    """
    done = {t.name: s for t in tasks if (s := read_complete_stats(t)) is not None}
    # Largest shards first, so the last few small ones fill in around them (output order is the plan's).
    todo = sorted((t for t in tasks if t.name not in done), key=lambda t: -len(t.items))
    if done:
        log.info("resuming: %d of %d shards already complete, %d to write", len(done), len(tasks), len(todo))
    n_workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    n_images = sum(len(t.items) for t in todo)
    start = time.perf_counter()
    with progress(n_images, "build-shards", "img", logger=log, every=every_tenth(n_images), smoothing=0.1,
                  mininterval=0.5) as bar:
        if todo and engine == "ray":
            results = _run_ray(todo, workers, ray_address, bar)
        else:
            results = _run_processes(todo, n_workers, bar)
    done.update({s["shard"]: s for s in results})
    return [done[t.name] for t in tasks], n_images, time.perf_counter() - start
