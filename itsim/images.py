"""Images: safe open, convert to RGB, resize, JPEG encode/decode.

One module so the shard builder, the trainer's loader and the scorer decode and resize images
the same way. Every failure is an `ImageError` with a short machine-readable reason, so callers can
record it (failures.jsonl, the scorer's `error` column) instead of crashing.
"""
from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from itsim import storage
from itsim.storage_errors import NotFound, StorageError

RESIZE_MODES = ("stretch", "center_crop", "pad")
# 64 Mpx: well above any real photograph, far below what a decompression bomb expands to.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


# EXIF orientations that ImageOps.exif_transpose acts on; any other value leaves the pixels as stored.
_TURNED = frozenset(range(2, 9))


class ImageError(Exception):
    """An image that cannot be used; `reason` is a short code, str(self) the detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def safe_path(root: str | Path, name: str) -> Path:
    """Resolve `name` under `root`, refusing anything that escapes it (`../`, absolute, symlinks)."""
    return safe_path_in(Path(root).resolve(), name)


def safe_path_in(resolved_root: Path, name: str) -> Path:
    """`safe_path` for a root the caller already resolved (`Path(root).resolve()`).

    Resolving the root walks every component of it; a caller that checks many names under the same
    root (a shard of 1,000 images) resolves it once and passes it here.
    """
    if not isinstance(name, str) or not name.strip():
        raise ImageError("bad_name", repr(name))
    if "\x00" in name:
        raise ImageError("bad_name", "NUL byte in name")
    candidate = Path(name)
    if candidate.is_absolute():
        raise ImageError("path_escape", f"absolute path {name!r}")
    resolved = (resolved_root / candidate).resolve()
    if not resolved.is_relative_to(resolved_root):
        raise ImageError("path_escape", f"{name!r} resolves outside the image root")
    return resolved


def read_bytes(path: str | Path) -> bytes:
    p = Path(path)
    if not p.exists():
        raise ImageError("missing", str(p))
    if not p.is_file():
        raise ImageError("not_a_file", str(p))
    data = p.read_bytes()
    if not data:
        raise ImageError("empty_file", str(p))
    return data


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit scaled down, transparency composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Decode bytes to an upright RGB image, refusing oversized ones before decoding pixels.

    `draft_size` lets the JPEG decoder downscale by 1/2..1/8 while decoding (much faster) as long
    as the result stays at least that large on both sides.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError("too_many_pixels", f"{width}x{height} exceeds the limit of {max_pixels} pixels")
            if width < 1 or height < 1:
                raise ImageError("decode_error", f"empty image {width}x{height}")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
            if draft_size and img.format == "JPEG" and orientation in (1, None):
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            # exif_transpose returns a full copy when there is nothing to turn; skip it then.
            if img.getexif().get(0x0112, 1) in _TURNED:
                img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_many_pixels", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "unrecognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError) as exc:
        raise ImageError("decode_error", f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL plugins raise other types on hostile bytes
        # e.g. TypeError("Missing dimensions") from a TIFF whose second frame has no size: still
        # a bad image, which every caller records, never a crash of the training or evaluation.
        raise ImageError("decode_error", f"{type(exc).__name__}: {exc}") from None


def resize(img: Image.Image, size: int, mode: str = "stretch") -> Image.Image:
    """Square output of `size` px. `stretch` is the reference's (aspect not kept)."""
    if mode == "stretch":
        return img.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    if mode == "center_crop":
        return ImageOps.fit(img, (size, size), Image.BICUBIC)
    if mode == "pad":
        return ImageOps.pad(img, (size, size), Image.BICUBIC, color=(0, 0, 0))
    raise ValueError(f"unknown resize mode {mode!r}; choose one of {RESIZE_MODES}")


def load_image(source: str | Path | bytes | Image.Image, size: int, mode: str = "stretch",
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Path, bytes or PIL image -> resized RGB image; the one entry point for every stage."""
    if isinstance(source, Image.Image):
        width, height = source.size
        if width * height > max_pixels:
            raise ImageError("too_many_pixels", f"{width}x{height} exceeds the limit of {max_pixels} pixels")
        img = _to_rgb(ImageOps.exif_transpose(source) or source)
    else:
        data = source if isinstance(source, bytes) else read_bytes(source)
        img = open_image(data, max_pixels=max_pixels, draft_size=size)
    return resize(img, size, mode)


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """JPEG/PNG bytes from a shard -> uint8 array [H, W, 3]."""
    return np.asarray(open_image(data, max_pixels=max_pixels))


def to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8)


def image_url(root: str | None, name: Any) -> str:
    """The URL of image `name`: `name` itself when it is a URL and there is no root, else `name` under the
    URL `root`, refusing a name that would leave it (`..`, absolute, a URL) as `safe_path` does for a folder."""
    if not isinstance(name, str) or not name.strip():
        raise ImageError("bad_name", repr(name))
    if root is None:
        return name
    try:
        return storage.join(root, name)
    except StorageError:
        raise ImageError("path_escape", f"{name!r} is not a name under {storage.scrub(root)}") from None


def read_url(url: str, options: Mapping[str, Any] | None = None) -> bytes:
    """An image's bytes from a store; a missing object is `missing` as for a file, any other store failure
    `store_<reason>` (`store_denied`, `store_unreachable`, ...), so it costs its row, not the job."""
    options = dict(options or {})
    # s3fs sends a HEAD before each GET to decide on a ranged, concurrent download (only worth it for
    # objects over 50 MiB): for an image that doubles the requests; one stream per object skips it.
    options["s3"] = {**(options.get("s3") or {}), "max_concurrency": 1}
    try:
        data = storage.read_bytes(url, options)
    except NotFound:
        raise ImageError("missing", storage.scrub(url)) from None
    except StorageError as exc:
        raise ImageError(f"store_{exc.reason}", str(exc)) from None
    if not data:
        raise ImageError("empty_file", storage.scrub(url))
    return data
