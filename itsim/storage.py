"""Where bytes live: local paths and object-store URLs (`s3://`, `gs://`, `file://`) behind one small API.

Every place that takes a path must also take a URL, and refuse one it cannot handle rather than write
a local folder `s3:` (what `Path("s3://b/x")` becomes). Stores are reached through fsspec and their own
library (s3fs, gcsfs), credentials coming from that library's usual sources, never from itsim.
A local path keeps plain `os` calls and temp-name-then-`os.replace` writes. On a store a PUT, or a
multipart upload (aborted on failure), shows the object whole or not at all; never `fs.open(url, "wb")`
in a `with` block, whose `__exit__` commits even when the block raised. Filesystems are looked up per
call (fsspec caches one per process and drops the cache after a fork), so DataLoader workers and Ray
tasks never share a parent's event loop. Errors are one-line `StorageError`s (`storage_errors`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob as _glob
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

from itsim.storage_errors import NotFound, StorageError, errors, scrub, translate

log = logging.getLogger(__name__)

ENV_OPTIONS = "ITSIM_STORAGE_OPTIONS"
# protocol -> (library, pip extra). Anything else with `://` is refused.
REMOTE = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
_MANGLED = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/(?!/)")  # `s3:/b/x`: a URL that went through pathlib.Path


def is_url(path: Any) -> bool:
    """True for anything with a scheme (`s3://...`, `file://...`); pathlib.Path objects are never URLs."""
    return isinstance(path, str) and "://" in path


def options_for(protocol: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The library's keyword arguments: `$ITSIM_STORAGE_OPTIONS` (a JSON object) < `options`.

    In each, flat keys apply to every store and a key naming a protocol (`{"s3": {...}, "gs": {...}}`)
    to that one. Listing caches are off unless asked for: another process (a worker, a resumed run) may
    have written since this process last listed.
    """
    out: dict[str, Any] = {"use_listings_cache": False}
    for source, name in ((os.environ.get(ENV_OPTIONS), ENV_OPTIONS), (options, "storage options")):
        if isinstance(source, str):
            with contextlib.suppress(json.JSONDecodeError):
                source = json.loads(source)
            if not isinstance(source, dict):
                raise StorageError(f"{name} must be a JSON object", "unsupported")
        source = source or {}
        out.update({k: v for k, v in source.items() if k not in REMOTE})
        for key in dict.fromkeys(({"s3a": "s3", "gcs": "gs"}.get(protocol, protocol), protocol)):
            out.update(source.get(key) or {})
    return out


@dataclasses.dataclass(frozen=True)
class Location:
    """A resolved place: `fs` is None for a local path (plain `os` calls), else the store's filesystem."""

    url: str  # as given, for messages
    protocol: str  # "" for local
    path: str  # local path, or the store's path without protocol (`bucket/key`)
    fs: Any = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)


def resolve(path: Any, options: Mapping[str, Any] | None = None) -> Location:
    """A path or URL -> Location; unsupported schemes, chained URLs and `s3:/x` are StorageErrors."""
    text = os.fspath(path)
    if not is_url(text):
        if _MANGLED.match(text):
            raise StorageError(f"{text}: looks like a URL that lost a '/' (passed through pathlib.Path?)",
                               "unsupported")
        return Location(text, "", os.path.expanduser(text))
    protocol, _, rest = text.partition("://")
    protocol = protocol.lower()
    if protocol == "file" and "::" not in rest:
        return Location(text, "", rest)
    if protocol not in REMOTE or "::" in rest or not rest.split("/", 1)[0]:
        raise StorageError(f"{scrub(text)}: unsupported storage URL (supported: a local path, file://, "
                           f"{', '.join(p + '://' for p in REMOTE)} with a bucket)", "unsupported")
    library, extra = REMOTE[protocol]
    opts = options_for(protocol, options)
    try:
        import fsspec

        fs = fsspec.filesystem(protocol, **opts)
    except ImportError:
        raise StorageError(f"{scrub(text)}: {protocol}:// needs {library}, which is not installed: "
                           f"pip install 'itsim[{extra}]'", "missing_library") from None
    except Exception as exc:  # noqa: BLE001 - a bad option (TypeError), a credentials file error, ...
        raise translate(exc, text, opts) from None
    return Location(text, protocol, fs._strip_protocol(text), fs, opts)


def join(base: str, *names: str) -> str:
    """`base/name/...` for a path or URL; names must be relative and stay below `base` (no `..`)."""
    for name in names:
        if not name or name.startswith("/") or "://" in name or ".." in name.split("/"):
            raise StorageError(f"{scrub(base)}: unsafe name {name!r}", "unsupported")
    if not is_url(base):
        return os.path.join(base, *names)
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])


def _url(loc: Location, path: str) -> str:
    return f"{loc.protocol}://{path}" if loc.protocol else path


def exists(url: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether a file/object exists; a missing bucket or refused credentials raise instead of saying no."""
    loc = resolve(url, options)
    try:
        with errors(url, loc.options):
            return os.path.exists(loc.path) if loc.fs is None else bool(loc.fs.info(loc.path))
    except NotFound:
        return False


def size_of(url: str, options: Mapping[str, Any] | None = None) -> int:
    loc = resolve(url, options)
    with errors(url, loc.options):
        return os.path.getsize(loc.path) if loc.fs is None else int(loc.fs.info(loc.path)["size"])


def read_bytes(url: str, options: Mapping[str, Any] | None = None) -> bytes:
    loc = resolve(url, options)
    with errors(url, loc.options):
        return Path(loc.path).read_bytes() if loc.fs is None else loc.fs.cat_file(loc.path)


def read_text(url: str, options: Mapping[str, Any] | None = None) -> str:
    return read_bytes(url, options).decode("utf-8")


@contextlib.contextmanager
def atomic_local(path: str) -> Iterator[BinaryIO]:
    """A file to write at a per-writer temp name beside `path` (parents created), fsynced and renamed
    over `path` when the block ends without error, removed when it raises."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(url: str, data: bytes, options: Mapping[str, Any] | None = None) -> None:
    """Write `data` so that readers see the old content, or the new content whole, never a part."""
    loc = resolve(url, options)
    with errors(url, loc.options):
        if loc.fs is not None:
            loc.fs.pipe_file(loc.path, data)  # one PUT (multipart above 100 MiB, aborted on failure)
        else:
            with atomic_local(loc.path) as f:
                f.write(data)


def write_text(url: str, text: str, options: Mapping[str, Any] | None = None) -> None:
    write_bytes(url, text.encode("utf-8"), options)


def upload_file(local: str, url: str, options: Mapping[str, Any] | None = None,
                chunk_size: int | None = None) -> None:
    """Copy a finished local file to `url`, visible only when complete: one PUT, or above 2 x `chunk_size`
    (the library's default: 50 MiB) a multipart upload, which S3 shows only once it is completed."""
    loc = resolve(url, options)
    with errors(url, loc.options):
        if loc.fs is not None:
            loc.fs.put_file(local, loc.path, **({"chunksize": chunk_size} if chunk_size else {}))
        else:
            with open(local, "rb") as src, atomic_local(loc.path) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def ls(url: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """Direct children (files and folders/prefixes) as sorted paths or URLs; [] when there are none."""
    loc = resolve(url, options)
    try:
        with errors(url, loc.options):
            if loc.fs is None:
                return sorted(os.path.join(loc.path, n) for n in os.listdir(loc.path))
            # a folder marker (an empty `prefix/` object, as pyarrow's S3 create_dir writes) is not a child
            found = {p.rstrip("/") for p in loc.fs.ls(loc.path, detail=False)} - {loc.path.rstrip("/")}
            return sorted(_url(loc, p) for p in found)
    except NotFound:
        return []


def glob(pattern: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """Sorted matches of a glob pattern, as paths or URLs."""
    loc = resolve(pattern, options)
    with errors(pattern, loc.options):
        if loc.fs is None:
            return sorted(_glob.glob(loc.path, recursive=True))
        return sorted(_url(loc, p) for p in loc.fs.glob(loc.path))


def delete(url: str, options: Mapping[str, Any] | None = None, recursive: bool = False) -> None:
    """Remove a file/object (a whole folder/prefix with `recursive`); nothing there is not an error."""
    loc = resolve(url, options)
    try:
        with errors(url, loc.options):
            if loc.fs is not None:
                loc.fs.rm(loc.path, recursive=recursive)
            elif recursive and os.path.isdir(loc.path):
                shutil.rmtree(loc.path)
            else:
                os.unlink(loc.path)
    except NotFound:
        pass


def require_local(path: Any, what: str) -> str:
    """`path` unchanged when it is a local path; a URL is refused for a place that takes only local paths
    (rather than becoming a local folder named `s3:`)."""
    text = os.fspath(path)
    if is_remote(text):
        raise StorageError(f"{what}: {scrub(text)}: this takes a local path, not a URL", "unsupported")
    return resolve(text).path


def files_under(url: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """Every file below a folder/prefix, as sorted `/`-separated paths relative to it; [] when none."""
    loc = resolve(url, options)
    try:
        with errors(url, loc.options):
            if loc.fs is None:
                root = Path(loc.path)
                return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            base = loc.path.rstrip("/") + "/"
            found = loc.fs.find(loc.path)
            return sorted(p[len(base):] for p in found if p.startswith(base) and not p.endswith("/"))
    except NotFound:
        return []


def upload_tree(local_dir: str, url: str, options: Mapping[str, Any] | None = None,
                last: tuple[str, ...] = ()) -> list[str]:
    """Copy every file below `local_dir` to `url`, the relative paths in `last` after all others (in that
    order): a reader that waits for the last one (a checksummed state file) never sees a part."""
    root = Path(local_dir)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    ordered = [n for n in names if n not in last] + [n for n in last if n in names]
    for name in ordered:
        upload_file(str(root / name), join(url, name), options)
    return ordered


def object_info(url: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`{"size": bytes, "etag": str | None}` of one file/object in one request (HEAD on a store).

    The ETag (S3's, GCS's `md5Hash`/`etag`) changes whenever an object is replaced, so one recorded
    at upload tells a resume check that the object is still the one uploaded without reading it;
    local files have none (None)."""
    loc = resolve(url, options)
    with errors(url, loc.options):
        if loc.fs is None:
            return {"size": os.path.getsize(loc.path), "etag": None}
        info = loc.fs.info(loc.path)
        if info.get("type") == "directory":
            raise NotFound(f"{scrub(url)}: not found")
        etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
        return {"size": int(info["size"]), "etag": str(etag).strip('"') if etag else None}


class _QuietAbandonedRequests(logging.Filter):
    """asyncio logs "Task exception was never retrieved", with a traceback, for an aiohttp request task
    that a failed call left behind (the store went away mid-request). The failure itself reaches the
    caller as a one-line StorageError, so that record becomes one debug line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__module__.startswith("aiohttp") and "never retrieved" in record.getMessage():
            log.debug("a store request abandoned after a failure: %s: %s", type(exc).__name__, exc)
            return False
        return True


logging.getLogger("asyncio").addFilter(_QuietAbandonedRequests())


class PortableOptions(dict):
    """Storage options that travel to other processes (Ray tasks and actors, maybe on other nodes); the
    repr hides the values, so a task's arguments printed in a log or an error never show a credential."""

    def __repr__(self) -> str:
        return f"PortableOptions(<{len(self)} stores, values not shown>)"


def portable_options(options: Mapping[str, Any] | None = None) -> PortableOptions:
    """This process's options for every remote store (`$ITSIM_STORAGE_OPTIONS` < `options`), keyed by
    protocol and merged as `options_for` merges them: what a process elsewhere needs to reach the same
    stores as this one even without this process's environment. The stores' own credential sources
    (environment, config files, instance roles) still apply on each node."""
    return PortableOptions({protocol: options_for(protocol, options) for protocol in ("s3", "gs")})


def is_remote(path: Any) -> bool:
    """True for a store URL (`s3://...`); a local path and a `file://` URL are not remote."""
    return is_url(path) and not path.lower().startswith("file://")


def location(path: str) -> str:
    """A store URL as written (checked, without a trailing `/`), a local path or `file://` URL as an
    absolute local path: how a command keeps an input or output place it hands on to other code."""
    if is_remote(path):
        resolve(path)  # an unsupported scheme is refused here, before any work
        return path.rstrip("/")
    return str(Path(resolve(path).path).resolve())
