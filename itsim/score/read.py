"""Inputs of `itsim score`: files and globs -> a Ray Datasource whose rows carry a stable `row_id`.

`row_id = file_index << 32 | row_index`, where `file_index` is the file's place in the sorted,
expanded input list and `row_index` its row's place in read order: the same inputs always give the
same ids, and an output row can be traced to its source line. Each read task streams one file (a
Parquet file: a range of row groups) in blocks, so the driver never holds the data. Rows the reader
cannot parse become rows with a `READ_ERROR` reason, never disappear. The readers live beside this
module: `tables` (CSV/TSV/Parquet: column checks, `Utf8Replaced`, headerless `TableColumns`)
and `shards` (itsim shard tars); this module expands the inputs, picks the format and plans
the read tasks.

Inputs may be store URLs (`s3://b/pairs/*.parquet`, a shard folder's URL): they are listed on the
driver and each read task streams its file through `storage_stream.open_input` (retries, one-line errors),
with the driver's storage options (`storage.portable_options`) so a task on another node reaches the
same store. Files are `Path`s (local, resolved) or `str` URLs.
"""
from __future__ import annotations

import functools
import glob
import json
import posixpath
from pathlib import Path
from typing import Any, Mapping

import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from itsim import storage
from itsim.errors import UserError
from itsim.score.columns import JPG, READ_ERROR, RESERVED, ROW_ID
from itsim.score.shards import SHARD_SCHEMA, read_shard_blocks
from itsim.score.tables import (TableColumns, Utf8Replaced, check_tables, open_table, read_csv_blocks,
                                read_parquet_blocks, table_columns)

__all__ = ["ROW_ID", "JPG", "READ_ERROR", "RESERVED", "SUFFIXES", "SHARD_COLUMNS", "SHARD_SCHEMA",
           "TableColumns", "Utf8Replaced", "check_tables", "table_columns", "expand_inputs", "detect_format",
           "ScoreInputs"]

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet", ".tar": "shards"}
SHARD_COLUMNS = ("image", "caption", "caption_idx", "split", "key", "shard")
_PARQUET_ROWS_PER_TASK = 1 << 16

InputFile = Path | str  # a local file (resolved) or a store URL


def _suffix(f: InputFile) -> str:
    return posixpath.splitext(str(f))[1].lower()


def _manifest_shards(manifest: dict[str, Any], split: str | None) -> list[str]:
    splits = manifest.get("splits", {})
    wanted = [split] if split else list(splits)
    return [name for s in wanted for name in splits.get(s, {}).get("shards", [])]


def _expand_url(pattern: str, split: str | None, options: Mapping[str, Any] | None) -> list[str]:
    """A URL glob (files with a known suffix), a shard folder (its manifest), a folder of tables/tars, or
    one object. Listing also checks the bucket and credentials before any Ray work."""
    if glob.has_magic(pattern):
        found = [u for u in storage.glob(pattern, options) if _suffix(u) in SUFFIXES]
        if not found:
            raise UserError(f"{storage.scrub(pattern)}: no .csv, .tsv, .parquet or .tar object matches")
        return found
    if _suffix(pattern) in SUFFIXES and storage.exists(pattern, options):  # one table or tar (the usual case)
        return [pattern]
    manifest = storage.join(pattern, "manifest.json")
    if storage.exists(manifest, options):
        return [storage.join(pattern, n) for n in _manifest_shards(json.loads(storage.read_text(manifest, options)), split)]
    children = storage.ls(pattern, options)
    if children:
        found = [u for u in children if _suffix(u) in SUFFIXES and not posixpath.basename(u).startswith(".")]
        if not found:
            raise UserError(f"{storage.scrub(pattern)}: no .csv, .tsv, .parquet or .tar files under this prefix")
        return found
    if not storage.exists(pattern, options):
        raise UserError(f"{storage.scrub(pattern)}: no such file")
    return [pattern]


def _expand_one(pattern: str, split: str | None, options: Mapping[str, Any] | None = None) -> list[InputFile]:
    if storage.is_url(pattern) and storage.resolve(pattern, options).fs is not None:
        return _expand_url(pattern, split, options)
    path = Path(storage.resolve(pattern).path)
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.is_file():  # an itsim shard folder: its manifest lists the shards per split
            return [path / name for name in _manifest_shards(json.loads(manifest.read_text()), split)]
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
        if not found:
            raise UserError(f"{path}: no .csv, .tsv, .parquet or .tar files in this folder")
        return found
    if glob.has_magic(pattern):
        found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not found:
            raise UserError(f"{pattern}: no file matches")
        return found
    if not path.is_file():
        raise UserError(f"{pattern}: no such file")
    return [path]


def expand_inputs(patterns: list[str] | tuple[str, ...], split: str | None = None,
                  options: Mapping[str, Any] | None = None) -> list[InputFile]:
    """Files, folders (a shard folder's manifest, else its tables/tars) and globs, as paths or URLs
    (`options`: storage options) -> unique files, each pattern's sorted."""
    if not patterns:
        raise UserError("--input is required")
    files: dict[InputFile, None] = {}
    for pattern in patterns:
        for f in _expand_one(pattern, split, options):
            files.setdefault(f.resolve() if isinstance(f, Path) else f, None)
    out = list(files)
    if split:  # shard names are {split}-{i:06d}.tar; tables have no split to filter on
        out = [f for f in out if _suffix(f) != ".tar" or posixpath.basename(str(f)).startswith(f"{split}-")]
    if not out:
        raise UserError(f"no input files{' for split ' + split if split else ''}")
    return out


def detect_format(files: list[InputFile], fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    kinds = {SUFFIXES.get(_suffix(f)) for f in files}
    if None in kinds:
        odd = next(f for f in files if _suffix(f) not in SUFFIXES)
        raise UserError(f"{odd}: cannot tell the format from the name; pass --format csv|tsv|parquet|shards")
    if len(kinds) > 1:
        raise UserError(f"inputs mix formats ({', '.join(sorted(kinds))}); score each format separately")
    return kinds.pop()


# --- the datasource -----------------------------------------------------------------------------

class ScoreInputs(Datasource):
    """One read task per file (per group of row groups for Parquet), each streaming blocks of rows.

    `per_image=True` (shards only) yields one row per image instead of one per caption.
    """

    def __init__(self, files: list[InputFile], fmt: str, block_rows: int,
                 columns: dict[InputFile, TableColumns] | None = None, per_image: bool = False,
                 options: Mapping[str, Any] | None = None):
        super().__init__()
        self.files, self.fmt, self.block_rows = list(files), fmt, block_rows
        self.columns = columns or {}
        self.per_image = per_image
        self.options = storage.portable_options(options)  # what each read task, maybe on another node, uses
        self._plan: list[tuple[Any, int | None, int]] | None = None
        self._sizes: dict[str, int] = {}

    def _size(self, path: InputFile) -> int:
        if str(path) not in self._sizes:
            self._sizes[str(path)] = storage.size_of(str(path), self.options)
        return self._sizes[str(path)]

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(self._size(f) for f in self.files)

    def _parquet_tasks(self, index: int, path: InputFile) -> list[tuple[Any, int, int]]:
        with open_table(path, self.options) as source:
            meta = pq.ParquetFile(source).metadata
        tasks, groups, first, rows = [], [], 0, 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= _PARQUET_ROWS_PER_TASK or g == meta.num_row_groups - 1:
                fn = functools.partial(read_parquet_blocks, str(path), index, groups, first, self.block_rows,
                                       self.options)
                tasks.append((fn, rows, self._size(path) * rows // max(1, meta.num_rows)))
                groups, first, rows = [], first + rows, 0
        return tasks

    def read_plan(self) -> list[tuple[Any, int | None, int]]:
        """(read function, rows or None when unknown, approximate bytes) per task."""
        if self._plan is not None:
            return self._plan
        plan: list[tuple[Any, int | None, int]] = []
        for index, path in enumerate(self.files):
            if self.fmt == "parquet":
                plan += self._parquet_tasks(index, path)
            elif self.fmt in ("csv", "tsv"):
                cols = self.columns.get(path) or TableColumns(tuple(table_columns(path, self.fmt, self.options)))
                plan.append((functools.partial(read_csv_blocks, str(path), index, self.fmt, cols, self.block_rows,
                                               self.options), None, self._size(path)))
            elif self.fmt == "shards":
                plan.append((functools.partial(read_shard_blocks, str(path), index, self.block_rows, self.per_image,
                                               self.options), None, self._size(path)))
            else:
                raise UserError(f"unknown input format {self.fmt!r}")
        self._plan = plan
        return plan

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(fn, BlockMetadata(num_rows=rows, size_bytes=size, exec_stats=None, input_files=None))
                for fn, rows, size in self.read_plan()]
