"""Shard inputs of `itsim score`: itsim WebDataset tars -> one row per caption (or per image), streamed.

A sample that cannot be understood becomes one row whose `READ_ERROR` is `bad_sample`; a shard whose
tar stream ends early (cut, or an invalid header in the middle) adds one `bad_shard` row, so no
input disappears unseen. A shard may be a store URL, streamed through `storage_stream.open_input`; a store
failure that outlasts its retries (or a shard deleted since it was listed) is a `bad_shard` row too.
"""
from __future__ import annotations

import json
import logging
import tarfile
from typing import Any, Iterator, Mapping

import pyarrow as pa

from itsim import storage_stream
from itsim.data.shards.tar import iter_samples
from itsim.score.columns import JPG, READ_ERROR, ROW_ID
from itsim.storage_errors import StorageError

log = logging.getLogger(__name__)

SHARD_SCHEMA = pa.schema([(ROW_ID, pa.int64()), ("image", pa.string()), ("caption", pa.string()),
                          ("caption_idx", pa.int64()), ("split", pa.string()), ("key", pa.string()),
                          ("shard", pa.string()), (JPG, pa.binary()), (READ_ERROR, pa.string())])


def _sample_rows(sample: dict[str, Any], shard: str, per_image: bool = False) -> list[dict[str, Any]]:
    """One row per caption (per image with `per_image`); a sample that cannot be understood is one
    `bad_sample` row."""
    key = sample["__key__"].rsplit("/", 1)[-1]
    base = {"key": key, "shard": shard, JPG: sample.get("jpg"), READ_ERROR: None}
    try:
        meta = json.loads(sample["json"])
        captions = meta["captions"]
        if not isinstance(captions, list):
            raise TypeError("captions is not a list")
        idx = meta.get("caption_idx") or list(range(len(captions)))
    except (KeyError, ValueError, TypeError) as exc:
        log.warning("%s: sample %s unreadable (%s)", shard, key, exc)
        return [{**base, "image": key, "caption": None, "caption_idx": None, "split": None, READ_ERROR: "bad_sample"}]
    image = meta.get("image") if isinstance(meta.get("image"), str) else key
    split = meta.get("split") if isinstance(meta.get("split"), str) else None
    image_error = None if isinstance(sample.get("jpg"), bytes) else "bad_sample"
    if per_image:
        return [{**base, "image": image, "caption": None, "caption_idx": None, "split": split, READ_ERROR: image_error}]
    idx = list(idx) + [None] * (len(captions) - len(idx))
    return [{**base, "image": image, "caption": c if isinstance(c, str) else None,
             "caption_idx": i if isinstance(i, int) else None, "split": split,
             READ_ERROR: image_error or (None if isinstance(c, str) else "not_text")}
            for c, i in zip(captions, idx)]


def read_shard_blocks(path: str, file_index: int, block_rows: int, per_image: bool = False,
                      options: Mapping[str, Any] | None = None) -> Iterator[pa.Table]:
    """One shard as blocks of rows; a tar stream that breaks off ends with one `bad_shard` row."""
    rows: list[dict[str, Any]] = []
    row = 0

    def flush() -> pa.Table:
        nonlocal row
        table = pa.Table.from_pylist([{ROW_ID: (file_index << 32) + row + i, **r} for i, r in enumerate(rows)],
                                     schema=SHARD_SCHEMA)
        row += len(rows)
        rows.clear()
        return table

    try:
        with storage_stream.open_input(path, options) as f:
            for sample in iter_samples(f):
                rows.extend(_sample_rows(sample, path, per_image))
                if len(rows) >= block_rows:
                    yield flush()
    except (tarfile.TarError, OSError, EOFError, StorageError) as exc:
        log.warning("%s: shard unreadable after %d rows (%s)", path, row + len(rows), exc)
        rows.append({"image": None, "caption": None, "caption_idx": None, "split": None, "key": None,
                     "shard": path, JPG: None, READ_ERROR: "bad_shard"})
    if rows:
        yield flush()
