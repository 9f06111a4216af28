"""Where the loader's shards come from: a shard folder on local disk or in an object store.

The manifest, the vocab and a split's shard list come through `itsim.storage` (never pathlib on a
URL); `shard_samples` opens each shard with `storage_stream.open_input` (a local file, or a store object read
in blocks with retries on transient errors) in the process that reads it (a rank or a DataLoader worker).

A shard that is gone or changed when read (deleted after the listing) is recorded
and skipped like a corrupt local shard; a store that stays unreachable, or refuses the credentials,
ends the run with one line naming the shard (`one_line_errors` strips the worker's traceback).

Damaged shards: tarfile ends its iteration without an error at an invalid header in the middle of a
shard, or at a file cut on a header boundary, so `_tar_files` checks that each tar really ended
(`shards.tar.tar_end_problem`) and reports the rest of the shard as unreadable shard data.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from webdataset.tariterators import group_by_keys

from itsim import storage, storage_stream
from itsim.data.shards.tar import iter_members
from itsim.errors import UserError
from itsim.images import ImageError, safe_path
from itsim.storage import NotFound, StorageError
from itsim.text import Vocab

log = logging.getLogger(__name__)

SAMPLE_KEYS = ("jpg", "json", "ids.npy", "lengths.npy")
# Store errors about the store itself rather than one shard: they end the run (one line naming the shard)
# instead of being skipped like a damaged shard, since every other shard would fail the same way.
STORE_FAILURES = frozenset({"unreachable", "denied", "no_bucket", "missing_library", "unsupported"})


def _local_dir(shard_dir: str | Path) -> str | None:
    """The local folder of a path or `file://` URL; None for a store URL."""
    loc = storage.resolve(shard_dir)
    return loc.path if loc.fs is None else None


def read_manifest(shard_dir: str | Path, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The shard folder's manifest.json (a local folder or a store URL)."""
    url = storage.join(os.fspath(shard_dir), "manifest.json")
    try:
        text = storage.read_text(url, options)
    except NotFound:
        raise UserError(f"{shard_dir}: no manifest.json (build shards first with `itsim build-shards`)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{url}: not valid JSON ({exc})") from None


def load_vocab(shard_dir: str | Path, options: Mapping[str, Any] | None = None) -> Vocab:
    """The shards' vocab.json (a local folder or a store URL)."""
    local = _local_dir(shard_dir)
    if local is not None:
        return Vocab.load(Path(local) / "vocab.json")
    with tempfile.TemporaryDirectory(prefix="itsim-vocab-") as tmp:
        local_vocab = os.path.join(tmp, "vocab.json")
        storage_stream.download(storage.join(os.fspath(shard_dir), "vocab.json"), local_vocab, options)
        return Vocab.load(local_vocab)


def split_shards(shard_dir: str | Path, split: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """Paths (URLs in a store) of one split's shards as listed in the manifest; missing files or escaping
    names are errors. In a store one listing of the folder, not a request per shard, finds the missing."""
    splits = read_manifest(shard_dir, options).get("splits") or {}
    names = [str(name) for name in (splits.get(split) or {}).get("shards") or []]
    local = _local_dir(shard_dir)
    try:
        if local is not None:
            paths = [str(safe_path(local, name)) for name in names]
        else:
            paths = [storage.join(os.fspath(shard_dir), name) for name in names]
    except (ImageError, StorageError) as exc:
        raise UserError(f"{shard_dir}/manifest.json: bad shard name ({exc})") from None
    if local is not None:
        missing = [p for p in paths if not os.path.isfile(p)]
    else:
        present = set(storage.files_under(os.fspath(shard_dir), options)) if names else set()
        missing = [p for p, name in zip(paths, names) if name not in present]
    if missing:
        raise UserError(f"{len(missing)} shard(s) of split {split!r} listed in the manifest are missing, "
                        f"e.g. {missing[0]}")
    return paths


def select(name: str) -> bool:
    """The tar members the loader reads (`SAMPLE_KEYS`); any other member is never read."""
    base = name.rsplit("/", 1)[-1]
    return "." in base and base.split(".", 1)[1].lower() in SAMPLE_KEYS


def _store_failure(exc: BaseException) -> bool:
    return isinstance(exc, StorageError) and exc.reason in STORE_FAILURES


def _open_shards(urls: Iterable[str], handler: Any, options: Mapping[str, Any] | None) -> Iterator[dict[str, Any]]:
    """webdataset's `url_opener` through `storage_stream.open_input` (local files, or store objects read with
    retries): a shard that cannot be opened goes to the handler, unless the store itself failed."""
    for url in urls:
        try:
            stream = storage_stream.open_input(url, options)
        except Exception as exc:  # noqa: BLE001 - as webdataset's opener: the handler decides
            if _store_failure(exc):
                raise
            if handler(exc):
                continue
            return
        yield {"url": url, "stream": stream}


def _tar_files(sources: Iterator[dict[str, Any]], handler: Any) -> Iterator[dict[str, Any]]:
    """webdataset's `tar_file_expander` with `select`, plus the end check, and one handler call per bad
    shard (webdataset's calls it for a failed read and again for the iteration that follows it)."""
    for source in sources:
        url = source["url"]
        try:
            for name, data in iter_members(source["stream"], select):
                yield {"fname": name, "data": data, "__url__": url}
        except Exception as exc:  # as webdataset's expander: the handler decides (ours log, count, go on)
            if _store_failure(exc):
                raise
            if not handler(ValueError(f"{url}: {exc}")):
                return
        finally:
            source["stream"].close()
        yield {}  # end of shard: group_by_keys never mixes two shards' members into one sample


def shard_samples(urls: list[str], handler: Any, options: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__`, `__url__`, the `SAMPLE_KEYS` members) of shards (paths or URLs) in order; bad
    shard data, or a shard gone since it was listed, goes to `handler(exception)` with the shard named in
    its message; a store that fails (unreachable after retries, access denied) raises a StorageError."""
    return group_by_keys(_tar_files(_open_shards(urls, handler, options), handler), handler=handler)


def one_line_errors(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The batches of a loader; a UserError (a StorageError naming a shard) raised in a DataLoader worker
    reaches the caller as its own one line. torch re-raises a worker's exception with the worker's whole
    traceback as its message ("Caught X in DataLoader worker process 0. Original Traceback ..."), whose
    last line is the original `module.Class: message`.

    Closing the generator ends the DataLoader's workers at once rather than whenever its iterator is
    collected: a reference cycle (a caught exception's traceback holds the caller's frames) can keep it
    alive until the exit handlers, which then wait forever for workers that ignore SIGTERM.
    """
    it = iter(batches)
    try:
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UserError as exc:
                text = str(exc)
                if text.startswith("Caught ") and "Traceback" in text:
                    text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
                if isinstance(exc, StorageError):
                    raise StorageError(text, exc.reason, exc.transient) from None
                raise UserError(text) from None
            yield batch
    finally:
        getattr(it, "_shutdown_workers", lambda: None)()  # torch's DataLoader iterator; others have none
