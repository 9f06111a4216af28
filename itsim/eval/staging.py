"""Where `itsim eval` reads stored inputs and writes its outputs when they are store URLs.

Plots, the report and metrics.json are written by libraries that take local paths (matplotlib, the
report writer), so a URL `--out` is a local staging folder uploaded at the end, metrics.json last:
a reader that finds metrics.json in the store finds the report and plots beside it, and a failed run
uploads nothing. A stored pair file or training log is downloaded first.
"""
from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from itsim import storage, storage_stream

log = logging.getLogger(__name__)


def parent(location: str) -> str:
    """The folder or prefix holding `location` (a `storage.location`)."""
    return posixpath.dirname(location) if storage.is_remote(location) else str(Path(location).parent)


@contextlib.contextmanager
def output_folder(out: str, options: Mapping[str, Any] | None) -> Iterator[Path]:
    """The local folder to write the outputs into: `out` itself, or for a store URL a staging folder
    uploaded when the block ends without error, metrics.json last. The store is listed first: a
    missing bucket or refused credentials stop the run before any work."""
    if not storage.is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
        yield Path(out)
        return
    storage.ls(out, options)
    with tempfile.TemporaryDirectory(prefix="itsim-eval-") as stage:
        yield Path(stage)
        storage.upload_tree(stage, out, options, last=("metrics.json",))
        log.info("uploaded to %s", storage.scrub(out))


def fetch(location: str, folder: str, options: Mapping[str, Any] | None, optional: bool = False) -> str:
    """A local copy (in `folder`) of a stored file, else the local path itself. A missing object is a
    StorageError naming its URL, or with `optional` a path that does not exist (the caller skips it
    as it skips a missing local file)."""
    if not storage.is_remote(location):
        return location
    local = os.path.join(folder, posixpath.basename(location) or "input")
    try:
        storage_stream.download(location, local, options)
    except storage.NotFound:
        if not optional:
            raise
    return local
