"""Where `itsim score` writes: a local folder or a store URL (`s3://bucket/scores/`), each part whole or absent.

A reader never sees a part file as final before it is complete, on either kind of output:
- each Parquet part is written to a temp file and then shown whole: renamed into a local folder, or
  uploaded to a store as one PUT (a multipart upload above 100 MiB, which S3 shows only once it is
  completed); a failed or killed write task leaves no object under the part's name. Ray Data's own
  `write_parquet` through an fsspec filesystem would not: pyarrow closes its output stream when a
  write raises, and closing an s3fs file commits what was written so far;
- `_summary.json` is written last, after every part is in place and counted: a reader that waits for it
  (as for a `_SUCCESS` marker) sees the complete output; `--overwrite` deletes the old one first.
"""
from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from itsim import storage
from itsim.errors import UserError
from itsim.score.config import OUR_OUTPUTS
from itsim.score.tables import open_table

log = logging.getLogger(__name__)

SUMMARY = "_summary.json"


def _ours(name: str) -> bool:
    """Names a score run writes: its parts (and a killed writer's temp parts), summary, config, top-k."""
    return name in OUR_OUTPUTS or name.endswith(".parquet") or (".parquet." in name and name.endswith(".tmp"))


def prepare_output(out: str | Path, overwrite: bool, options: Mapping[str, Any] | None = None) -> None:
    """Refuse an output holding anything (without `--overwrite`) or anything a score run did not write;
    with `--overwrite` delete an earlier run's outputs, its `_summary.json` first. On a store, listing
    it also checks the bucket and the credentials before any Ray work."""
    out = os.fspath(out)
    if not storage.is_url(out) and os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output {out} is a file")
    existing = storage.ls(out, options)
    if existing and not overwrite:
        raise UserError(f"--output {storage.scrub(out)} is not empty; pass --overwrite to replace an earlier score run")
    names = {url: posixpath.basename(url.rstrip("/")) for url in existing}
    for url, name in sorted(names.items(), key=lambda item: item[1] != SUMMARY):
        if not _ours(name):
            raise UserError(f"--output {storage.scrub(out)} holds {name}, which itsim score did not write; "
                            "choose another folder")
        storage.delete(url, options, recursive=True)
    if not storage.is_url(out):
        os.makedirs(out, exist_ok=True)


def write_table(out: str | Path, name: str, table: pa.Table, options: Mapping[str, Any] | None = None) -> str:
    """One small Parquet file (top-k results, error records) written whole at `out/name`."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    url = storage.join(os.fspath(out), *name.split("/"))
    storage.write_bytes(url, buf.getvalue(), options)
    return url


def write_text(out: str | Path, name: str, text: str, options: Mapping[str, Any] | None = None) -> None:
    storage.write_text(storage.join(os.fspath(out), name), text, options)


class PartSink(Datasink):
    """Ray Data sink: each write task's rows -> one Parquet part, shown whole (see the module doc).

    Parts are `part-{run}-{task:06d}.parquet`: a task Ray retries rewrites its own part whole.
    `options` are `storage.portable_options`, for write tasks on other nodes.
    """

    def __init__(self, out: str | Path, rows_per_file: int, options: Mapping[str, Any] | None = None):
        self.out, self.rows_per_file = os.fspath(out), rows_per_file
        self.options = storage.portable_options(options)
        self.run = uuid.uuid4().hex[:8]

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"file": None, "rows": 0}
        table = pa.concat_tables(tables, promote_options="default")
        name = f"part-{self.run}-{ctx.task_idx:06d}.parquet"
        final = storage.join(self.out, name)
        if storage.is_url(self.out):
            with tempfile.TemporaryDirectory(prefix="itsim-part-") as tmp:
                pq.write_table(table, os.path.join(tmp, name))
                storage.upload_file(os.path.join(tmp, name), final, self.options)
        else:
            tmp = f"{final}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                pq.write_table(table, tmp)
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return {"file": name, "rows": table.num_rows}


def count_output(out: str | Path, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Rows, scored rows and errors by reason, reading only those two columns of the parts back."""
    rows = scored = 0
    errors: Counter[str] = Counter()
    for part in storage.glob(storage.join(os.fspath(out), "*.parquet"), options):
        with open_table(part, options) as source:
            for batch in pq.ParquetFile(source).iter_batches(columns=["score", "error"]):
                rows += batch.num_rows
                scored += batch.num_rows - batch.column("score").null_count
                for item in pc.value_counts(batch.column("error")).to_pylist():
                    if item["values"] is not None:
                        errors[item["values"]] += item["counts"]
    return {"rows": rows, "scored": scored, "errors": dict(sorted(errors.items()))}


def write_summary(out: str | Path, summary: dict[str, Any], options: Mapping[str, Any] | None = None) -> None:
    """`_summary.json`, the last thing a run writes: its presence says the output is complete."""
    write_text(out, SUMMARY, json.dumps(summary, indent=1), options)
