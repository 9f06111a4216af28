"""build-shards against an object store: inputs fetched through `itsim.storage`, an output prefix kept
consistent for readers.

A store has no rename, so the order of uploads is what keeps a reader safe: each shard is uploaded
whole by its worker, then its stats; the small files (vocab, build config, failures, indexes) are
written to a local staging folder during the build and uploaded at the end, `manifest.json` last. A
manifest from an earlier build is deleted before any shard is written or removed, so a reader that
sees a manifest sees every shard it names.
"""
from __future__ import annotations

import logging
import os
import posixpath
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from itsim import storage, storage_stream
from itsim.data.shards.pool import complete_stats
from itsim.data.shards.writer import ShardTask

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INDEX_SUFFIX = ".wids.json"  # OUT/{split}.wids.json: webdataset's wids shard index of one split


def basename(path: str) -> str:
    """The file name of a path or URL."""
    return posixpath.basename(path.rstrip("/")) if storage.is_url(path) else os.path.basename(path)


def fetch(path: str | None, staging: Path, options: Mapping[str, Any] | None) -> str | None:
    """A local path for an input: a local path as it is, a URL downloaded once into `staging` under its
    own file name (caption formats are detected from it)."""
    if not path or not storage.is_url(path):
        return path
    local = staging / "inputs" / basename(path)
    storage_stream.download(path, str(local), options)
    return str(local)


def exists(path: str, options: Mapping[str, Any] | None, folder: bool = False) -> bool:
    """A local file (folder), or anything at a URL: an object or a prefix with objects below it."""
    if storage.is_url(path):
        return storage.exists(path, options)
    return Path(path).is_dir() if folder else Path(path).is_file()


def prepare(out: str, options: Mapping[str, Any] | None, tasks: list[ShardTask], overwrite: bool,
            check_manifest: Callable[[str, str], None], ours: re.Pattern) -> dict[str, dict]:
    """Get the prefix `out` ready for this build; returns the stats of shards already complete there.

    `check_manifest(text, url)` refuses an earlier manifest of a different build (unless `overwrite`).
    Our files of other builds (`ours` matches names; group `shard`) are removed, every one of ours on
    `overwrite`; the manifest goes first whenever anything is removed or still to be written.
    """
    manifest = storage.join(out, MANIFEST)
    has_manifest = storage.exists(manifest, options)  # also the first request: no bucket, no access
    if has_manifest and not overwrite:
        check_manifest(storage.read_text(manifest, options), manifest)
    planned = {t.name for t in tasks}
    names = [basename(url) for url in storage.ls(out, options)]
    stale = [n for n in names if (m := ours.match(n)) and (overwrite or m["shard"] not in planned)]
    if overwrite:
        stale += [n for n in names if n == "failures.jsonl" or n.endswith(INDEX_SUFFIX)]
    done = {} if overwrite else complete_stats(tasks)
    if has_manifest and (overwrite or stale or len(done) < len(tasks)):
        storage.delete(manifest, options)
    for name in stale:
        log.info("removing %s", storage.join(out, name))
        storage.delete(storage.join(out, name), options)
    return done


def publish(staging_out: Path, out: str, options: Mapping[str, Any] | None, indexes: dict[str, str]) -> None:
    """Upload the small files written in `staging_out`, manifest.json last; indexes of splits that have
    no shards any more are removed before it."""
    keep = set(indexes.values())
    for url in storage.ls(out, options):
        if url.endswith(INDEX_SUFFIX) and basename(url) not in keep:
            storage.delete(url, options)
    storage.upload_tree(str(staging_out), out, options, last=(MANIFEST,))
