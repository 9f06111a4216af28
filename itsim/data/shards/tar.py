"""Reading itsim's tar shards member by member, shared by the training loader and the scorer.

Both read in stream mode (`r|*`: one pass, works on pipes and object-store streams) and both must
notice a shard that did not really end: tarfile stops without raising at an invalid header after
the first member, and at a file cut on a header boundary, which would silently drop the rest of a
shard.
"""
from __future__ import annotations

import tarfile
from typing import IO, Any, Callable, Iterator

from webdataset.tariterators import base_plus_ext


class ShardEndError(tarfile.ReadError):
    """The members read so far are whole, but the archive did not end: the rest of the shard is lost."""


def tar_end_problem(tar: tarfile.TarFile) -> str | None:
    """Why a stream-mode tar that has just run out of members did not really end, or None.

    A real end is a zero block followed by nothing but zeros. This reads on from where tarfile
    stopped and stops at the first non-zero chunk, so it costs at most the archive's end padding
    (one 10 KiB record) on a healthy shard.
    """
    stream = tar.fileobj  # tarfile's _Stream: `pos` counts the bytes it has consumed
    if stream.pos - tar.offset < tarfile.BLOCKSIZE:
        return f"cut off at byte {stream.pos} (no end-of-archive marker)"
    while chunk := stream.read(tarfile.RECORDSIZE):
        if chunk.strip(b"\0"):
            return f"invalid tar header at byte {tar.offset}; the rest of the shard cannot be read"
    return None


def iter_members(fileobj: IO[bytes], select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular member (that `select` keeps), in order; raises `ShardEndError`
    after the last one when the archive did not really end."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for info in tar:
            tar.members = []  # stream mode would keep every TarInfo of the shard
            if info.isreg() and (select is None or select(info.name)):
                yield info.name, tar.extractfile(info).read()
        problem = tar_end_problem(tar)
    if problem:
        raise ShardEndError(problem)


def iter_samples(fileobj: IO[bytes]) -> Iterator[dict[str, Any]]:
    """Members grouped into samples by key (`{"__key__": key, ext: bytes, ...}`), as webdataset groups them."""
    sample: dict[str, Any] | None = None
    try:
        for name, data in iter_members(fileobj):
            key, ext = base_plus_ext(name)
            if key is None:
                continue
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key}
            sample[ext.lower()] = data
    except Exception:  # ShardEndError, or a member cut mid-data (tarfile.ReadError): the rest is lost ...
        if sample is not None:  # ... but the members read so far are whole: keep the sample they make
            yield sample
        raise
    if sample is not None:
        yield sample
