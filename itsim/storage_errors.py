"""Store errors as one safe line: what went wrong, on which URL, and never a credential.

botocore, aiobotocore, aiohttp, s3fs, gcsfs and fsspec each raise their own types, often chained
three deep; a user needs one line that names the URL and says which of a few things happened
(no bucket, no object, access denied, store unreachable). Messages may carry request details, so
anything that looks like a credential, a secret environment value or a storage option's value is
scrubbed, and the chain is dropped (`from None`) so a traceback printer cannot show it either.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Iterator, Mapping

from itsim.errors import UserError

_NOT_SECRET = {"endpoint_url", "region_name", "region", "project", "use_listings_cache", "skip_instance_cache"}
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "500", "502", "503", "504"}
_TRANSIENT_TYPES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ClientConnectorError", "ClientPayloadError", "ServerDisconnectedError", "FSTimeoutError",
                    "IncompleteRead", "ResponseStreamingError"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                 "TokenRefreshRequired", "AllAccessDisabled", "403", "Forbidden", "401"}
_DENIED_TYPES = {"NoCredentialsError", "PartialCredentialsError", "RefreshError", "DefaultCredentialsError"}
_SECRET_PATTERNS = [
    (re.compile(r"(?i)\b([\w-]*(?:secret|token|password|signature|credential|access[_-]?key)[\w-]*)"
                r"(['\"]?\s*[=:]\s*['\"]?)[^\s'\",;&}]+"), r"\1\2***"),
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{12,}\b"), "***"),  # AWS access key ids
    (re.compile(r"(://)[^/@\s]+@"), r"\1***@"),  # user:password@ in a URL
]


class StorageError(UserError):
    """A store operation failed. `reason`: not_found, no_bucket, denied, unreachable, unsupported,
    missing_library, changed or error; `transient` errors (unreachable, 5xx) may succeed when retried."""

    def __init__(self, message: str, reason: str = "error", transient: bool = False):
        super().__init__(message)
        self.reason, self.transient = reason, transient


class NotFound(StorageError, FileNotFoundError):
    """No such object (its bucket exists). Also a FileNotFoundError, so resume checks that catch OSError
    treat a missing remote file as they treat a missing local one; a missing bucket or refused
    credentials are deliberately not OSErrors, so such code never mistakes them for "not written yet"."""

    def __init__(self, message: str):
        StorageError.__init__(self, message, "not_found")


def _option_values(options: Mapping[str, Any]) -> Iterator[str]:
    for key, value in options.items():
        if isinstance(value, Mapping):
            yield from _option_values(value)
        elif key not in _NOT_SECRET:
            yield str(value)


def scrub(text: str, options: Mapping[str, Any] | None = None) -> str:
    """`text` without credential-looking values, secret environment values or storage option values."""
    values = list(_option_values(options or {}))
    values += [v for k, v in os.environ.items() if re.search(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", k)]
    for value in sorted((v for v in values if len(v) >= 4), key=len, reverse=True):
        text = text.replace(value, "***")
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    for _ in range(8):
        if exc is None:
            return
        yield exc
        exc = exc.__cause__ or exc.__context__


def _codes(exc: BaseException) -> list[str]:
    """Error codes along the chain: botocore ClientError codes, then HTTP statuses (aiohttp)."""
    codes = []
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            codes.append(str(response["Error"]["Code"]))
        if isinstance(getattr(e, "status", None), int):
            codes.append(str(e.status))
    return codes


def translate(exc: BaseException, url: str, options: Mapping[str, Any] | None = None) -> StorageError:
    """Any store error -> a one-line StorageError naming `url` (a StorageError passes through)."""
    if isinstance(exc, StorageError):
        return exc
    found, names = _codes(exc), {type(e).__name__ for e in _chain(exc)}
    codes = set(found)
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    label = next((c for c in found if not c.isdigit()), found[0] if found else type(exc).__name__)
    detail = f"{label}: {scrub(first, options)}" if first and first != label else label
    where = scrub(url)
    if "://" not in url:  # a local path: the OS error says it all
        return NotFound(f"{where}: not found") if isinstance(exc, FileNotFoundError) else \
            StorageError(f"{where}: {detail}")
    if "NoSuchBucket" in codes or "bucket does not exist" in first:
        bucket = url.partition("://")[2].split("/", 1)[0]
        return StorageError(f"{where}: bucket {scrub(bucket)!r} does not exist", "no_bucket")
    if codes & _DENIED_CODES or names & _DENIED_TYPES or isinstance(exc, PermissionError):
        return StorageError(f"{where}: access denied ({detail}); check the store's credentials (environment, "
                            "config files, instance role) and permissions", "denied")
    if isinstance(exc, FileNotFoundError) or codes & {"NoSuchKey", "404"}:
        return NotFound(f"{where}: not found")
    if codes & _TRANSIENT_CODES or names & _TRANSIENT_TYPES or isinstance(exc, (ConnectionError, TimeoutError)):
        return StorageError(f"{where}: store not reachable or failing ({detail})", "unreachable", True)
    return StorageError(f"{where}: {detail}")


@contextlib.contextmanager
def errors(url: str, options: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Run a block, turning any error into a StorageError for `url` (a StorageError passes through)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore, aiohttp, fsspec and OSError types all end here
        raise translate(exc, url, options) from None
