"""Helpers every stage shares for writing files and starting Ray, kept in one place.

- `atomic_write`: a reader sees the old file or the whole new one, never a torn one (manifests,
  stats, model config, synthetic captions, checkpoint state).
- `sha256_file`: the checksums shards and checkpoints record.
- `write_error`: one line for a failed write that names a full disk however the writer reported it.
- `ray_session`: the one way itsim starts (or joins) Ray.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


def temp_name(path: Path) -> Path:
    """A temp name per writer: an orphaned worker of a killed job may still be writing the same file."""
    return path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def atomic_write(path: str | Path, data: str | bytes, fsync: bool = False) -> Path:
    """Write `data` to a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_disk_full(exc: BaseException, directory: str | Path, needed: int = 0) -> bool:
    """A full disk reaches us as OSError(ENOSPC), as safetensors' "No space left on device (os error
    28)" or as torch.save's "unexpected pos ...", which says nothing about space: so a failed write
    with less free space than `needed` (or 1 MiB) counts as a full disk too."""
    text = str(exc)
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        return True
    try:
        return shutil.disk_usage(directory).free < max(needed, 1 << 20)
    except OSError:
        return False


def write_error(exc: BaseException, directory: str | Path, needed: int = 0) -> str:
    """The failure in words: `disk full (N bytes free in DIR; ...)` or the error's first line."""
    text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    if not is_disk_full(exc, directory, needed):
        return text
    try:
        free = f"{shutil.disk_usage(directory).free:,} bytes free in {directory}; "
    except OSError:
        free = ""
    return f"disk full ({free}{text})"


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Reuse a running Ray (tests, notebooks), connect to `address`, or start a private local one with
    `num_cpus` (default: every CPU) and shut it down afterwards.

    Ray is imported here, not at the top: it costs about a second, and only jobs that use it pay.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    if address:
        ray.init(address=address)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster needs no token
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()
