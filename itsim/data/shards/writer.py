"""Writing ONE shard: the unit of work that processes and Ray tasks run (`pool`), and of resume.

A shard is written to a temporary name and renamed only when complete, then its `_stats.json` is
written the same way; a shard counts as done only when both exist and the stats name the same plan
(`plan_hash`) and byte size. Everything that goes into the tar is a pure function of the task
(fixed member order, mtime 0, fixed owner), so the bytes do not depend on which worker wrote it.

With a URL as `out_dir` the worker writes the tar into a temp folder of its own machine, uploads it
(visible only once complete), records the object's ETag in the stats and uploads the stats after it;
with a URL as `images_root` it reads images from that prefix, a few requests in flight at a time.

Kept free of torch/webdataset imports so that worker processes start fast.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from itsim import storage
from itsim.io import atomic_write, temp_name
from itsim.images import ImageError, encode_jpeg, load_image, safe_path_in
from itsim.text import Vocab

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_KEY_MAX = 60  # USTAR member names are limited to 100 characters; key + ".lengths.npy" must fit
# A sample's members, in the order written (sorted, as webdataset's TarWriter orders them). `txt` (the
# first caption) is for other readers (open_clip `--wds-caption-key txt`, img2dataset-style pipelines);
# `json` keeps every caption; itsim's own readers use json and the token arrays.
MEMBERS = ("ids.npy", "jpg", "json", "lengths.npy", "txt")
FETCH_AHEAD = 8  # image requests in flight per worker when images come from a store


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
    # For URLs in out_dir / images_root; may hold credentials: never in repr, the plan hash or the stats.
    storage_options: Mapping[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def remote(self) -> bool:
        return storage.is_url(self.out_dir)

    @property
    def tar_path(self) -> str:
        """The shard's path, or URL when `out_dir` is one."""
        return storage.join(self.out_dir, f"{self.name}.tar")

    @property
    def stats_path(self) -> str:
        return storage.join(self.out_dir, f"{self.name}_stats.json")

    def plan_hash(self) -> str:
        """Identifies what this shard should contain; independent of where OUT lives."""
        # The JSON of the task's fields without asdict's deep copy of every item (a measurable share of a
        # shard's time); the hash is stored in _stats.json, so it changes only when a shard's content does.
        fields: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.pop("out_dir")
        fields.pop("storage_options")
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
    """The stats of a finished shard of this exact plan, or None when it must be (re)written.

    On a store: the stats object (uploaded after the shard) and one HEAD of the shard, whose size and
    ETag must be the ones recorded at upload. The recorded SHA-256 was computed from the very bytes
    uploaded; re-reading every shard to recompute it would download the whole dataset on each resume.
    A missing bucket or refused credentials raise (a StorageError) rather than mean "not written yet".
    """
    try:
        stats = json.loads(storage.read_text(task.stats_path, task.storage_options))
        info = storage.object_info(task.tar_path, task.storage_options)
    except (OSError, ValueError):  # storage.NotFound is an OSError too
        return None
    if stats.get("plan_hash") != task.plan_hash() or stats.get("bytes") != info["size"]:
        return None
    if task.remote and stats.get("etag") != info["etag"]:
        return None
    return stats


def _failure(task: ShardTask, item: ShardItem, reason: str, detail: str) -> dict:
    return {"image": item.image, "reason": reason, "detail": detail,
            "caption_rows": len(item.captions), "shard": task.name}


def _remote_image(root: str, name: str, options: Mapping[str, Any] | None) -> bytes:
    """An image's bytes from a store prefix; names that would leave the prefix are refused as a local
    path escaping its folder is, a missing object is `missing` as a missing file is."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise ImageError("bad_name", repr(name))
    clean = posixpath.normpath(name)
    if name.startswith("/") or "://" in name or clean == ".." or clean.startswith("../"):
        raise ImageError("path_escape", f"{name!r} is outside the image prefix")
    url = storage.join(root, clean)
    try:
        data = storage.read_bytes(url, options)
    except storage.NotFound:
        raise ImageError("missing", url) from None
    if not data:
        raise ImageError("empty_file", url)
    return data


def _image_sources(task: ShardTask) -> Iterator[tuple[ShardItem, Any]]:
    """(item, path or bytes or the error met finding it), in the task's order.

    Local images are opened by `load_image` as the loop reaches them. Images on a store are fetched
    FETCH_AHEAD at a time by threads, so a shard does not wait out one round trip per image; a store
    error other than a missing object (denied, unreachable) raises: the shard fails, nothing is lost.
    """
    if not storage.is_url(task.images_root):
        root = Path(task.images_root).resolve()  # once per shard, not per image (safe_path would redo it)
        for item in task.items:
            try:
                source: Any = safe_path_in(root, item.image)
            except Exception as exc:  # noqa: BLE001 - recorded by the caller, as any error on this image
                source = exc
            yield item, source
        return

    def fetch(item: ShardItem) -> Any:
        try:
            return _remote_image(task.images_root, item.image, task.storage_options)
        except ImageError as exc:
            return exc

    with cf.ThreadPoolExecutor(FETCH_AHEAD) as pool:
        pending: collections.deque = collections.deque()
        items = iter(task.items)
        for item in items:
            pending.append((item, pool.submit(fetch, item)))
            if len(pending) >= FETCH_AHEAD:
                break
        while pending:
            item, future = pending.popleft()
            nxt = next(items, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fetch, nxt)))
            yield item, future.result()


def _write_tar(task: ShardTask, path: Path, progress: Callable[[int], None] | None) -> dict:
    """Write the tar at `path` (a temp name renamed when complete); returns its stats."""
    start = time.perf_counter()
    vocab = Vocab(task.vocab_words)
    tmp = temp_name(path)
    failures: list[dict] = []
    images_ok = captions = 0
    try:
        with open(tmp, "wb") as fh:
            tar = _TarOut(fh)
            for item, source in _image_sources(task):
                try:
                    if isinstance(source, Exception):
                        raise source
                    img = load_image(source, task.image_size, task.resize, task.max_pixels)
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
        os.replace(tmp, path)
    except BaseException:  # a full disk (or Ctrl-C) must not leave a partial temp file behind
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - start
    by_reason: dict[str, int] = {}
    for f in failures:
        by_reason[f["reason"]] = by_reason.get(f["reason"], 0) + 1
    return {
        "shard": task.name, "split": task.split, "plan_hash": task.plan_hash(),
        "images_planned": len(task.items), "images_ok": images_ok, "captions": captions,
        "caption_rows_failed": sum(f["caption_rows"] for f in failures),
        "failures_by_reason": dict(sorted(by_reason.items())), "failures": failures,
        "bytes": tar.size, "sha256": tar.sha.hexdigest(), "md5": tar.md5.hexdigest(),
        "seconds": round(seconds, 3), "images_per_second": round(len(task.items) / max(seconds, 1e-9), 1),
    }


def write_shard(task: ShardTask, progress: Callable[[int], None] | None = None) -> dict:
    """Write one complete shard and its stats; returns the stats (failures included).

    A bad image is recorded and skipped; only an output error (disk full, the store failing) makes
    this raise. A stale stats file is removed first: it must never vouch for a new tar.
    """
    if not task.remote:
        Path(task.stats_path).unlink(missing_ok=True)
        stats = _write_tar(task, Path(task.tar_path), progress)
        atomic_write(task.stats_path, json.dumps(stats, indent=1))
        return stats
    options = task.storage_options
    storage.delete(task.stats_path, options)
    with tempfile.TemporaryDirectory(prefix=f"itsim-{task.name}-") as staging:
        local = Path(staging) / f"{task.name}.tar"
        stats = _write_tar(task, local, progress)
        storage.upload_file(str(local), task.tar_path, options)
    info = storage.object_info(task.tar_path, options)
    if info["size"] != stats["bytes"]:
        raise storage.StorageError(f"{task.tar_path}: the store holds {info['size']} bytes after an upload of "
                                   f"{stats['bytes']}", "changed")
    stats["etag"] = info["etag"]
    storage.write_text(task.stats_path, json.dumps(stats, indent=1), options)
    return stats
