"""Inputs of `itsim score`: files and globs -> a Ray Datasource whose rows carry a stable `row_id`.

`row_id = file_index << 32 | row_index`, where `file_index` is the file's place in the sorted,
expanded input list and `row_index` its row's place in read order: the same inputs always give the
same ids, and an output row can be traced to its source line. Each read task streams one file (a
Parquet file: a range of row groups) in blocks, so the driver never holds the data. Rows the reader
cannot parse (a CSV line with the wrong number of fields, a broken shard sample) become rows with a
`READ_ERROR` reason, never disappear; a shard whose tar stream ends early (cut, or an invalid header
in the middle) adds one `bad_shard` row. CSV/TSV bytes that are not UTF-8 are replaced by U+FFFD,
as `data/captions.py` does, so one bad byte costs one character, not the file. Headerless tables
are read with names given by `--columns` (`TableColumns(names, header=False)`).
"""
from __future__ import annotations

import codecs
import csv
import functools
import io
import glob
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from webdataset.tariterators import base_plus_ext

from itsim.data.loader import tar_end_problem
from itsim.errors import UserError

log = logging.getLogger(__name__)

ROW_ID = "row_id"
JPG = "__jpg"  # encoded image bytes of a shard row (dropped before writing)
READ_ERROR = "__read_error"  # a reason found while reading (kept as the row's error)
RESERVED = (ROW_ID, "score", "error")
SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet", ".tar": "shards"}
SHARD_COLUMNS = ("image", "caption", "caption_idx", "split", "key", "shard")
_CSV_BLOCK = 4 << 20
_REPLACEMENT = "\ufffd"
_PARQUET_ROWS_PER_TASK = 1 << 16


def _expand_one(pattern: str, split: str | None) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.is_file():  # an itsim shard folder: its manifest lists the shards per split
            splits = json.loads(manifest.read_text()).get("splits", {})
            wanted = [split] if split else list(splits)
            return [path / name for s in wanted for name in splits.get(s, {}).get("shards", [])]
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


def expand_inputs(patterns: list[str] | tuple[str, ...], split: str | None = None) -> list[Path]:
    """Files, folders (a shard folder's manifest, else its tables/tars) and globs -> sorted unique files."""
    if not patterns:
        raise UserError("--input is required")
    files: dict[Path, None] = {}
    for pattern in patterns:
        for f in _expand_one(pattern, split):
            files.setdefault(f.resolve(), None)
    out = list(files)
    if split:  # shard names are {split}-{i:06d}.tar; tables have no split to filter on
        out = [f for f in out if f.suffix != ".tar" or f.name.startswith(f"{split}-")]
    if not out:
        raise UserError(f"no input files{' for split ' + split if split else ''}")
    return out


def detect_format(files: list[Path], fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    kinds = {SUFFIXES.get(f.suffix.lower()) for f in files}
    if None in kinds:
        odd = next(f for f in files if f.suffix.lower() not in SUFFIXES)
        raise UserError(f"{odd}: cannot tell the format from the name; pass --format csv|tsv|parquet|shards")
    if len(kinds) > 1:
        raise UserError(f"inputs mix formats ({', '.join(sorted(kinds))}); score each format separately")
    return kinds.pop()


# --- tables -------------------------------------------------------------------------------------

def _csv_parse(fmt: str, bad_rows: list[str] | None = None) -> pv.ParseOptions:
    def handler(row: Any) -> str:
        if bad_rows is not None:
            bad_rows.append(row.text)
        return "skip"

    return pv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True,
                           invalid_row_handler=handler)


@dataclass(frozen=True)
class TableColumns:
    """A table's column names, and whether its first line is a header (False: names from `--columns`)."""

    names: tuple[str, ...]
    header: bool = True


def _first_record(path: Path, fmt: str) -> list[str] | None:
    """The first CSV/TSV record, decoded as the reader decodes the file (BOM dropped, bad bytes replaced)."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        return next(csv.reader(fh, delimiter="\t" if fmt == "tsv" else ","), None)


def table_columns(path: Path, fmt: str) -> list[str]:
    """Column names of a table, read from its header or Parquet footer only."""
    try:
        if fmt == "parquet":
            return list(pq.read_schema(path).names)
        names = _first_record(path, fmt)
    except (pa.ArrowException, OSError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read as {fmt} ({exc})") from None
    if not names:
        raise UserError(f"{path}: empty file (no header line)")
    return names


def _given_columns(path: Path, fmt: str, names: tuple[str, ...]) -> None:
    """A headerless table must have as many fields as `--columns` names, or every row would be a bad_row."""
    if fmt not in ("csv", "tsv"):
        raise UserError(f"{path}: --columns names the columns of headerless CSV/TSV tables, not {fmt} files")
    try:
        first = _first_record(path, fmt)
    except (OSError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read as {fmt} ({exc})") from None
    if first is not None and len(first) != len(names):
        raise UserError(f"{path}: the first line has {len(first)} fields but --columns names {len(names)} "
                        f"({', '.join(names)})")
    if first is not None and [f.strip() for f in first] == list(names):
        log.warning("%s: the first line equals --columns; it is scored as data (drop --columns for a header)", path)


def check_tables(files: list[Path], fmt: str, needed: tuple[str, ...],
                 names: Sequence[str] | None = None) -> dict[Path, TableColumns]:
    """Each table's columns, checked for `needed` and for clashes with the output's own columns.

    `names` (from `--columns`) are the columns of headerless CSV/TSV tables: the first line is data.
    """
    given = tuple(n.strip() for n in names) if names else None
    if given is not None and (not all(given) or len(set(given)) != len(given)):
        raise UserError(f"--columns {','.join(given)}: names must be non-empty and distinct")
    columns = {}
    for f in files:
        if given is not None:
            _given_columns(f, fmt, given)
        cols = TableColumns(given, header=False) if given is not None else TableColumns(tuple(table_columns(f, fmt)))
        missing = [c for c in needed if c not in cols.names]
        if missing:
            where = "--columns" if given is not None else f"{f}:"
            raise UserError(f"{where} no column {', '.join(map(repr, missing))}; columns are {', '.join(cols.names)} "
                            "(choose with --image-col/--caption-col)")
        clash = [c for c in RESERVED if c in cols.names]
        if clash:
            raise UserError(f"{f}: has column(s) {', '.join(clash)}, which the output adds; rename them first")
        columns[f] = cols
    return columns


class Utf8Replaced(io.RawIOBase):
    """A file read as UTF-8 with undecodable bytes replaced by U+FFFD (and handed on re-encoded).

    pyarrow's CSV reader rejects invalid UTF-8 in string columns, and also in the text of a malformed
    row before our handler sees it, so the bytes are made valid before pyarrow parses them. It streams:
    one chunk is decoded at a time, and the incremental decoder keeps a character split across chunks.
    """

    def __init__(self, path: str, chunk: int = _CSV_BLOCK):
        super().__init__()
        self._fh = open(path, "rb")
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = b""
        self._eof = False
        self._chunk = chunk
        self._decoded = self._in_file = 0  # U+FFFD decoded; U+FFFD the file itself holds (valid UTF-8)
        self._tail = b""  # last bytes read, to find one of those split across reads

    @property
    def replaced(self) -> int:
        """Undecodable byte sequences replaced so far."""
        return self._decoded - self._in_file

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while not self._eof and (size < 0 or len(self._pending) < size):
            raw = self._fh.read(self._chunk if size < 0 else max(size, self._chunk))
            self._eof = not raw
            text = self._decoder.decode(raw, final=self._eof)
            window = self._tail + raw
            self._in_file += window.count(_REPLACEMENT.encode())
            self._tail = window[-2:]
            self._decoded += text.count(_REPLACEMENT)
            self._pending += text.encode()
        size = len(self._pending) if size < 0 else size
        out, self._pending = self._pending[:size], self._pending[size:]
        return out

    def close(self) -> None:
        self._fh.close()
        super().close()


def _with_ids(table: pa.Table, file_index: int, start: int) -> pa.Table:
    ids = pa.array(range((file_index << 32) + start, (file_index << 32) + start + table.num_rows), pa.int64())
    return table.add_column(0, ROW_ID, ids)


def _read_csv(path: str, file_index: int, fmt: str, columns: TableColumns, block_rows: int) -> Iterator[pa.Table]:
    bad: list[str] = []
    names = list(columns.names)
    read = pv.ReadOptions(block_size=_CSV_BLOCK, column_names=None if columns.header else names)
    with Utf8Replaced(path) as source:
        # Every column as text: types inferred from the first block can break on a later row.
        reader = pv.open_csv(source, read_options=read, parse_options=_csv_parse(fmt, bad),
                             convert_options=pv.ConvertOptions(column_types={n: pa.string() for n in names}))
        schema = reader.schema.append(pa.field(READ_ERROR, pa.string()))
        row = 0
        for batch in reader:
            table = pa.Table.from_batches([batch]).append_column(READ_ERROR, pa.nulls(batch.num_rows, pa.string()))
            if bad:
                log.warning("%s: %d malformed line(s) kept as error rows, e.g. %r", path, len(bad), bad[0][:200])
                nulls = {n: pa.nulls(len(bad), schema.field(n).type) for n in names}
                errors = pa.array(["bad_row"] * len(bad), pa.string())
                table = pa.concat_tables([table, pa.table({**nulls, READ_ERROR: errors}, schema=schema)])
                bad.clear()
            for start in range(0, table.num_rows, block_rows):
                piece = table.slice(start, block_rows)
                yield _with_ids(piece, file_index, row)
                row += piece.num_rows
    if source.replaced:
        log.warning("%s: %d byte sequence(s) that are not UTF-8 replaced by U+FFFD", path, source.replaced)


def _read_parquet(path: str, file_index: int, row_groups: list[int], first_row: int,
                  block_rows: int) -> Iterator[pa.Table]:
    row = first_row
    for batch in pq.ParquetFile(path).iter_batches(batch_size=block_rows, row_groups=row_groups):
        table = pa.Table.from_batches([batch])
        table = table.append_column(READ_ERROR, pa.nulls(table.num_rows, pa.string()))
        yield _with_ids(table, file_index, row)
        row += table.num_rows


# --- shards -------------------------------------------------------------------------------------

SHARD_SCHEMA = pa.schema([(ROW_ID, pa.int64()), ("image", pa.string()), ("caption", pa.string()),
                          ("caption_idx", pa.int64()), ("split", pa.string()), ("key", pa.string()),
                          ("shard", pa.string()), (JPG, pa.binary()), (READ_ERROR, pa.string())])


def _samples(path: str) -> Iterator[dict[str, Any]]:
    """Tar members grouped into samples by key, as webdataset groups them.

    Raises `tarfile.ReadError` after the last sample when the stream ended early: tarfile itself stops
    without an error at an invalid header, which would silently drop the rest of the shard.
    """
    sample: dict[str, Any] | None = None
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            tar.members = []  # stream mode would keep every TarInfo of the shard
            if not member.isfile():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key}
            sample[ext.lower()] = tar.extractfile(member).read()
        if sample is not None:
            yield sample
        problem = tar_end_problem(tar)
    if problem:
        raise tarfile.ReadError(problem)


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


def _read_shard(path: str, file_index: int, block_rows: int, per_image: bool = False) -> Iterator[pa.Table]:
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
        for sample in _samples(path):
            rows.extend(_sample_rows(sample, path, per_image))
            if len(rows) >= block_rows:
                yield flush()
    except (tarfile.TarError, OSError, EOFError) as exc:
        log.warning("%s: shard unreadable after %d rows (%s)", path, row + len(rows), exc)
        rows.append({"image": None, "caption": None, "caption_idx": None, "split": None, "key": None,
                     "shard": path, JPG: None, READ_ERROR: "bad_shard"})
    if rows:
        yield flush()


# --- the datasource -----------------------------------------------------------------------------

class ScoreInputs(Datasource):
    """One read task per file (per group of row groups for Parquet), each streaming blocks of rows.

    `per_image=True` (shards only) yields one row per image instead of one per caption.
    """

    def __init__(self, files: list[Path], fmt: str, block_rows: int, columns: dict[Path, TableColumns] | None = None,
                 per_image: bool = False):
        super().__init__()
        self.files, self.fmt, self.block_rows = list(files), fmt, block_rows
        self.columns = columns or {}
        self.per_image = per_image
        self._plan: list[tuple[Any, int | None, int]] | None = None

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(f.stat().st_size for f in self.files)

    def _parquet_tasks(self, index: int, path: Path) -> list[tuple[Any, int, int]]:
        meta = pq.ParquetFile(path).metadata
        tasks, groups, first, rows = [], [], 0, 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= _PARQUET_ROWS_PER_TASK or g == meta.num_row_groups - 1:
                fn = functools.partial(_read_parquet, str(path), index, groups, first, self.block_rows)
                tasks.append((fn, rows, path.stat().st_size * rows // max(1, meta.num_rows)))
                groups, first, rows = [], first + rows, 0
        return tasks

    def read_plan(self) -> list[tuple[Any, int | None, int]]:
        """(read function, rows or None when unknown, approximate bytes) per task."""
        if self._plan is not None:
            return self._plan
        plan: list[tuple[Any, int | None, int]] = []
        for index, path in enumerate(self.files):
            size = path.stat().st_size
            if self.fmt == "parquet":
                plan += self._parquet_tasks(index, path)
            elif self.fmt in ("csv", "tsv"):
                cols = self.columns.get(path) or TableColumns(tuple(table_columns(path, self.fmt)))
                plan.append((functools.partial(_read_csv, str(path), index, self.fmt, cols, self.block_rows),
                             None, size))
            elif self.fmt == "shards":
                plan.append((functools.partial(_read_shard, str(path), index, self.block_rows, self.per_image),
                             None, size))
            else:
                raise UserError(f"unknown input format {self.fmt!r}")
        self._plan = plan
        return plan

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(fn, BlockMetadata(num_rows=rows, size_bytes=size, exec_stats=None, input_files=None))
                for fn, rows, size in self.read_plan()]
