"""Score image-caption pairs with a trained model: the in-process `Scorer` and the row preprocessing
that the Ray job (`itsim score`, in `itsim.score.ray_job`) runs on its CPU workers.

Ray and in-process scores are the same numbers because both run the same two steps:
`prepare_rows` (decode, resize, tokenise through `itsim.images` and `itsim.text`; every bad row gets
an error reason instead of raising) and `Scorer.score_prepared` (the model, batched). Scoring sets
repeat images (five captions per photo) and the CNN is most of a row's cost, so `prepare_rows` gives
each row a key of its image and `score_prepared` encodes each distinct image of a batch once. Error reasons
are `ImageError.reason` codes (`missing`, `decode_error`, `not_an_image`, `too_many_pixels`,
`path_escape`, `bad_name`, ...) or the caption codes `empty_caption` (nothing left after
normalisation) and `not_text` (not a string, e.g. null).
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from itsim import storage
from itsim.images import DEFAULT_MAX_PIXELS, ImageError, image_url, load_image, read_url, safe_path, to_array
from itsim.model import ItsimModel, Preprocess, encode_captions, encode_images, load_model, resolve_device
from itsim.model.encode import autocast, rows_to_device, to_device
from itsim.text import Vocab, normalize

log = logging.getLogger(__name__)

FETCH_THREADS = 16  # concurrent reads of a batch's stored images (see `_fetch_all`)

__all__ = ["Scorer", "Prepared", "prepare_rows", "prepare_images", "prepare_images_keyed", "prepare_captions",
           "caption_error"]


@dataclass
class Prepared:
    """A batch ready for the model; rows with an error hold zeros and are never scored.

    `image_keys` names each row's image (see `_image_source`): rows with the same key hold the same pixels,
    so the model encodes that image once. The keys are global strings, not row offsets, because the
    Ray job may regroup rows between preprocessing and scoring. None (the whole list, or one row):
    the row's image is encoded on its own.
    """

    pixels: np.ndarray  # uint8 [n, S, S, 3]
    ids: np.ndarray  # int32 [n, max_len]
    lengths: np.ndarray  # int32 [n]
    errors: list[str | None]
    image_keys: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.errors)

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


def caption_error(caption: object) -> str | None:
    if not isinstance(caption, str):
        return "not_text"
    if not normalize(caption):
        return "empty_caption"
    return None


@dataclass(frozen=True)
class _Remote:
    """An image in a store, read (`images.read_url`) only when its key is first met in a batch."""

    url: str


def _image_source(source: Any, images_root: str | Path | None, base_dir: str | Path | None) -> tuple[Any, str]:
    """(what `load_image` reads, or a `_Remote` to read first; its image key).

    The key is what makes a repeated image decode and encode once: `path:` and the resolved path,
    `url:` and the URL of an image in a store (a URL in the table without `images_root`, or a name
    under a URL `images_root`), `bytes:` and a digest of the encoded bytes (the same JPEG in many
    shard rows), or `pil:` and the object's id (only meaningful while the caller holds the images,
    i.e. within one batch). The prefixes keep a file literally named like a digest from meeting one.
    """
    if isinstance(source, Image.Image):
        return source, f"pil:{id(source)}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return data, "bytes:" + hashlib.blake2b(data, digest_size=16).hexdigest()
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise ImageError("bad_name", repr(source))
    root = os.fspath(images_root) if images_root is not None else None
    if storage.is_url(root) or (root is None and storage.is_url(source)):
        url = image_url(root, source)
        if not url.lower().startswith("file://"):  # a store (an unsupported scheme fails when read)
            return _Remote(url), f"url:{url}"
        root, source = (root[len("file://"):], source) if root else (None, url[len("file://"):])
    if root is not None:
        path = safe_path(root, source)
    else:
        path = Path(base_dir or ".") / source
    return path, f"path:{path}"


def prepare_images(images: Sequence[Any], pre: Preprocess, images_root: str | Path | None = None,
                   max_pixels: int = DEFAULT_MAX_PIXELS, errors: Sequence[str | None] | None = None,
                   base_dir: str | Path | None = None,
                   options: Mapping[str, Any] | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Images (relative path, path, bytes or PIL) -> uint8 [n, S, S, 3] and an error per row.

    `prepare_images_keyed` without the keys (for callers that encode each image row anyway).
    """
    pixels, errors, _ = prepare_images_keyed(images, pre, images_root, max_pixels, errors, base_dir, options)
    return pixels, errors


def prepare_images_keyed(images: Sequence[Any], pre: Preprocess, images_root: str | Path | None = None,
                         max_pixels: int = DEFAULT_MAX_PIXELS, errors: Sequence[str | None] | None = None,
                         base_dir: str | Path | None = None, options: Mapping[str, Any] | None = None
                         ) -> tuple[np.ndarray, list[str | None], list[str | None]]:
    """Images -> (uint8 [n, S, S, 3], error per row, image key per row; None where the row has an error).

    Relative paths resolve safely under `images_root` (`path_escape` otherwise); without a root,
    paths are taken as written, relative ones against `base_dir` (default: the current directory).
    A URL `images_root`, or URLs in `images` without a root, are read from the store (`options`:
    storage options); a store failure is the row's error (`missing`, `store_denied`, ...).
    Rows whose `errors` entry is already set are skipped. An image repeated in the batch (five
    captions of one photo) is decoded once, and its rows share a key (see `_image_source`).
    """
    errors = list(errors) if errors is not None else [None] * len(images)
    keys: list[str | None] = [None] * len(images)
    pixels = np.zeros((len(images), pre.image_size, pre.image_size, 3), dtype=np.uint8)
    sources: dict[int, tuple[Any, str]] = {}
    for row, source in enumerate(images):
        if errors[row] is None:
            try:
                sources[row] = _image_source(source, images_root, base_dir)
            except ImageError as exc:
                errors[row] = exc.reason
    fetched = _fetch_all(list(dict.fromkeys(s.url for s, _ in sources.values() if isinstance(s, _Remote))), options)
    cache: dict[str, np.ndarray | str] = {}
    for row, (readable, key) in sources.items():
        if key not in cache:
            cache[key] = _decode(fetched[readable.url] if isinstance(readable, _Remote) else readable, key, pre,
                                 max_pixels)
        value = cache[key]
        if isinstance(value, str):
            errors[row] = value
        else:
            pixels[row] = value
            keys[row] = key
    return pixels, errors, keys


def _fetch_all(urls: list[str], options: Mapping[str, Any] | None) -> dict[str, bytes | ImageError]:
    """Each distinct stored image of a batch, fetched concurrently: one GET at a time would make a store's
    latency (20 ms an image from a local S3 server, 28x a local file) the job's pace."""
    def fetch(url: str) -> bytes | ImageError:
        try:
            return read_url(url, options)
        except ImageError as exc:
            return exc

    if not urls:
        return {}
    with ThreadPoolExecutor(min(FETCH_THREADS, len(urls))) as pool:
        return dict(zip(urls, pool.map(fetch, urls)))


def _decode(readable: Any, key: str, pre: Preprocess, max_pixels: int) -> np.ndarray | str:
    """One image as the model's uint8 input, or the reason it cannot be used."""
    try:
        if isinstance(readable, ImageError):
            raise readable
        return to_array(load_image(readable, pre.image_size, pre.resize, max_pixels))
    except ImageError as exc:
        return exc.reason
    except Exception:  # noqa: BLE001 - a decoder bug must cost one row, not the job
        log.debug("unexpected error loading %r", key, exc_info=True)
        return "unexpected_error"


def prepare_captions(captions: Sequence[Any], pre: Preprocess, vocab: Vocab,
                     errors: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Captions -> (ids, lengths, error per row); rows with an error are encoded as empty."""
    errs: list[str | None] = list(errors) if errors is not None else [None] * len(captions)
    for row, caption in enumerate(captions):
        if errs[row] is None:
            errs[row] = caption_error(caption)
    ids, lengths = vocab.encode([c if e is None else "" for c, e in zip(captions, errs)], pre.max_len)
    return ids, lengths, errs


def prepare_rows(images: Sequence[Any], captions: Sequence[Any], pre: Preprocess, vocab: Vocab,
                 images_root: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 errors: Sequence[str | None] | None = None, base_dir: str | Path | None = None,
                 options: Mapping[str, Any] | None = None) -> Prepared:
    """Pairs -> model inputs; the one preprocessing path of `Scorer` and of the Ray job.

    The caption is checked first (cheap), so a row with a bad caption never decodes its image.
    `errors` carries reasons found earlier (a broken shard sample) and keeps them.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    ids, lengths, errs = prepare_captions(captions, pre, vocab, errors)
    pixels, errs, keys = prepare_images_keyed(images, pre, images_root, max_pixels, errs, base_dir, options)
    return Prepared(pixels, ids, lengths, errs, keys)


def _column(batch: Any, name: str) -> list:
    """One column of a dict of columns, a pandas DataFrame or a pyarrow Table, as a Python list."""
    if hasattr(batch, "column_names") and hasattr(batch, "column"):  # pyarrow.Table
        return batch.column(name).to_pylist()
    values = batch[name]
    if hasattr(values, "tolist"):
        values = values.tolist()
    values = list(values)
    # pandas/numpy turn a missing string into NaN; a missing value is a null, not a float.
    return [None if isinstance(v, float) and np.isnan(v) else v for v in values]


def _distinct_images(rows: np.ndarray, keys: Sequence[str | None] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(one row per distinct image among `rows`, each row's position in it); the index is None when
    every image is distinct. A row without a key is an image of its own."""
    if keys is None:
        return rows, None
    first: dict[str, int] = {}
    image_rows: list[int] = []
    index = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        key = keys[row]
        pos = first.get(key) if key is not None else None
        if pos is None:
            pos = len(image_rows)
            image_rows.append(int(row))
            if key is not None:
                first[key] = pos
        index[i] = pos
    if len(image_rows) == len(rows):
        return rows, None
    return np.asarray(image_rows, dtype=np.int64), index


class Scorer:
    """A loaded model that scores image-caption pairs (probability that the caption fits the image).

    `score` for Python callers; `score_rows` for a table batch (what the Ray actors run, through
    `prepare_rows` + `score_prepared`). fp32 on CPU; on CUDA the encoders run in bf16, the head in fp32.
    """

    def __init__(self, model: ItsimModel, vocab: Vocab, pre: Preprocess, device: torch.device, *,
                 images_root: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 batch_size: int = 256, storage_options: Mapping[str, Any] | None = None):
        self.model = model.eval()
        self.vocab = vocab
        self.pre = pre
        self.device = device
        self.images_root = images_root
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        self.storage_options = storage_options  # for a URL model, images_root or image URLs

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "auto", **kwargs: Any) -> "Scorer":
        """The model of a model folder or a store URL (`s3://bucket/run/model`; pass `storage_options=`
        for settings such as an endpoint; credentials come from the store's usual sources)."""
        dev = resolve_device(device)
        model, vocab, pre = load_model(model_dir, dev, kwargs.get("storage_options"))
        return cls(model, vocab, pre, dev, **kwargs)

    # --- tensors ------------------------------------------------------------------------------

    def _chunks(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.batch_size):
            yield slice(start, min(n, start + self.batch_size))

    def encode_images(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [n, S, S, 3] -> float32 image vectors [n, image_dim] on the device."""
        return encode_images(self.model, pixels, self.device, self.batch_size)

    def encode_texts(self, ids: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        return encode_captions(self.model, ids, lengths, self.device, self.batch_size)

    def matrix_from_vectors(self, image_vecs: torch.Tensor, text_vecs: torch.Tensor) -> np.ndarray:
        """Probabilities [n_img, n_txt] from encoded vectors, running only the head over every pair."""
        logits = self.model.score_matrix(image_vecs, text_vecs)  # the head in fp32 (see score_all_pairs)
        return torch.sigmoid(logits).cpu().numpy()

    # --- rows -----------------------------------------------------------------------------------

    def prepare(self, images: Sequence[Any], captions: Sequence[Any],
                errors: Sequence[str | None] | None = None) -> Prepared:
        return prepare_rows(images, captions, self.pre, self.vocab, self.images_root, self.max_pixels, errors,
                            options=self.storage_options)

    def score_prepared(self, prep: Prepared) -> np.ndarray:
        """float32 probabilities, NaN where the row has an error.

        Per chunk of rows, the CNN runs once per distinct image key and its vectors are indexed per
        row; in eval mode that gives the per-row numbers. The encoders run under `autocast` (bf16 on
        CUDA), the head in fp32 on every device (`ItsimModel.head`), as `itsim eval` and top-k do.
        """
        scores = np.full(len(prep), np.nan, dtype=np.float32)
        ok = np.flatnonzero(prep.ok)
        with torch.inference_mode():
            for s in self._chunks(len(ok)):
                rows = ok[s]
                image_rows, image_index = _distinct_images(rows, prep.image_keys)
                with autocast(self.device):
                    image_vec = self.model.encode_image(rows_to_device(prep.pixels, image_rows, self.device))
                    text_vec = self.model.encode_text(rows_to_device(prep.ids, rows, self.device), prep.lengths[rows])
                if image_index is not None:
                    image_vec = image_vec[to_device(image_index, self.device)]
                scores[rows] = torch.sigmoid(self.model.head(image_vec, text_vec)).cpu().numpy()
        return scores

    def score_rows(self, batch: Any, image_col: str = "image", caption_col: str = "caption",
                   image_bytes_col: str | None = None) -> tuple[np.ndarray, list[str | None]]:
        """A table batch (dict of columns, DataFrame, pyarrow Table) -> (scores, error per row).

        With `image_bytes_col`, images come from that column's encoded bytes (shard rows) instead
        of the paths in `image_col`.
        """
        images = _column(batch, image_bytes_col or image_col)
        prep = self.prepare(images, _column(batch, caption_col))
        return self.score_prepared(prep), prep.errors

    def score(self, images: Sequence[Any], captions: Sequence[Any]) -> np.ndarray:
        """Probabilities for (images[i], captions[i]); NaN (and a warning) for rows that cannot be scored.

        Images are PIL images, paths (relative ones under `images_root` when set) or encoded bytes.
        """
        prep = self.prepare(list(images), list(captions))
        bad = Counter(e for e in prep.errors if e is not None)
        if bad:
            log.warning("%d of %d pairs not scored: %s", sum(bad.values()), len(prep),
                        ", ".join(f"{k}={v}" for k, v in sorted(bad.items())))
        return self.score_prepared(prep)

    def score_matrix(self, images: Sequence[Any], captions: Sequence[Any]) -> np.ndarray:
        """Probabilities for every image x every caption [n_img, n_txt]; NaN rows/columns for bad inputs."""
        pixels, img_err = prepare_images(list(images), self.pre, self.images_root, self.max_pixels,
                                         options=self.storage_options)
        ids, lengths, txt_err = prepare_captions(list(captions), self.pre, self.vocab)
        txt_ok = np.array([e is None for e in txt_err], dtype=bool)
        img_ok = np.array([e is None for e in img_err], dtype=bool)
        out = np.full((len(images), len(captions)), np.nan, dtype=np.float32)
        if img_ok.any() and txt_ok.any():
            img_vecs = self.encode_images(pixels[img_ok])
            txt_vecs = self.encode_texts(ids[txt_ok], lengths[txt_ok])
            out[np.ix_(img_ok, txt_ok)] = self.matrix_from_vectors(img_vecs, txt_vecs)
        return out
