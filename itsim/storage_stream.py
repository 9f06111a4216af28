"""Streaming reads of one object, local or in a store, that ride out a store's hiccups.

Training and scoring read shards and tables for minutes at a time; one dropped connection must not end
the job, and a reader must never splice two versions of an object that changed under it. `open_input`
reopens at the same offset after a transient error and checks the object's size and ETag each time.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import time
from typing import Any, BinaryIO, Mapping

from itsim.storage import Location, atomic_local, files_under, join, resolve
from itsim.storage_errors import StorageError, errors, scrub

log = logging.getLogger(__name__)


class _RetryingReader(io.RawIOBase):
    """Sequential reads of one object; on a transient error, reopen at the same offset after a pause.

    The object must keep its size (and ETag, where the store gives one) across reopens: a changed or
    deleted object is a StorageError naming the URL, never a silent mix of two versions.
    """

    def __init__(self, loc: Location, retries: int, wait: float, block_size: int):
        self.loc, self.retries, self.wait, self.block_size = loc, retries, wait, block_size
        self.pos, self.info, self._f = 0, None, None
        self._retry(self._open)

    def _open(self) -> None:
        self._f = self.loc.fs.open(self.loc.path, "rb", block_size=self.block_size, cache_type="readahead")
        now, self.info = self._f.details, self.info or self._f.details
        if now.get("size") != self.info.get("size") or now.get("ETag") != self.info.get("ETag"):
            raise StorageError(f"{scrub(self.loc.url)}: changed while being read", "changed")
        self._f.seek(self.pos)

    def _retry(self, fn: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                with errors(self.loc.url, self.loc.options):
                    return fn()
            except StorageError as exc:
                if not exc.transient:
                    raise
                if attempt == self.retries:
                    raise StorageError(f"{exc} (gave up after {self.retries} retries)", exc.reason, True) from None
                log.warning("%s (retry %d of %d at byte %d)", exc, attempt + 1, self.retries, self.pos)
                self._close_inner()
                time.sleep(self.wait * 2 ** attempt)

    def _read(self, n: int) -> bytes:
        if self._f is None:
            self._open()
        return self._f.read(n)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:  # Parquet footers, PIL: reads resume from wherever `pos` is
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = max(0, {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.info["size"]}[whence] + offset)
        if self._f is not None:
            self._f.seek(self.pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        data = self._retry(lambda: self._read(len(buffer)))
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def _close_inner(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()

    def close(self) -> None:
        self._close_inner()
        super().close()


def open_input(url: str, options: Mapping[str, Any] | None = None, retries: int = 4, wait: float = 1.0,
               block_size: int = 8 << 20) -> BinaryIO:
    """A buffered binary stream of `url`, read in order (a tar shard for tarfile/webdataset) or seeking
    (a Parquet footer, an image).

    Remote objects are fetched `block_size` bytes per request; a transient failure (store unreachable,
    5xx, a dropped connection) is retried `retries` times with waits of `wait`, 2*`wait`, ... seconds
    from the same offset, then raised as a StorageError naming the URL. Open it in the process that
    reads it (after any fork).
    """
    loc = resolve(url, options)
    if loc.fs is None:
        with errors(url):
            return open(loc.path, "rb")
    return io.BufferedReader(_RetryingReader(loc, retries, wait, block_size), buffer_size=1 << 20)


def sha256_of(url: str, options: Mapping[str, Any] | None = None) -> str:
    """SHA-256 of the bytes (streamed; the whole object is read)."""
    h = hashlib.sha256()
    with open_input(url, options) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def download(url: str, local: str, options: Mapping[str, Any] | None = None) -> None:
    """Copy `url` to a local file, through a temp name (a failed download leaves no partial file)."""
    with open_input(url, options) as src, errors(local), atomic_local(local) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def download_tree(url: str, local_dir: str, options: Mapping[str, Any] | None = None) -> str:
    """Copy every file below `url` into `local_dir` (each through a temp name); returns `local_dir`."""
    for name in files_under(url, options):
        download(join(url, name), os.path.join(local_dir, *name.split("/")), options)
    return local_dir
