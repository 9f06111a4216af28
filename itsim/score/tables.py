"""Table inputs of `itsim score`: CSV/TSV/Parquet columns checked up front, then rows streamed in blocks.

Each block gets its stable `row_id` (`file_index << 32 | row_index`) and a `READ_ERROR` column. A
CSV/TSV line with the wrong number of fields becomes a row whose `READ_ERROR` is `bad_row`, never
disappears. CSV/TSV bytes that are not UTF-8 are replaced by U+FFFD (`Utf8Replaced`), as
`data/captions.py` does, so one bad byte costs one character, not the file. Headerless tables are
read with names given by `--columns` (`TableColumns(names, header=False)`). A table may be a store
URL: it is streamed through `storage_stream.open_input` (`options`: storage options).
"""
from __future__ import annotations

import codecs
import contextlib
import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq

from itsim import storage, storage_stream
from itsim.errors import UserError
from itsim.storage_errors import NotFound
from itsim.score.columns import READ_ERROR, RESERVED, ROW_ID

log = logging.getLogger(__name__)

_CSV_BLOCK = 4 << 20
_REPLACEMENT = "\ufffd"


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


@contextlib.contextmanager
def open_table(path: Path | str, options: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """What pyarrow reads: a local path as itself (read natively), a store URL as a seekable stream."""
    if not storage.is_url(str(path)):
        yield path
        return
    with storage_stream.open_input(str(path), options) as stream:
        yield stream


def _first_record(path: Path | str, fmt: str, options: Mapping[str, Any] | None = None) -> list[str] | None:
    """The first CSV/TSV record, decoded as the reader decodes the file (BOM dropped, bad bytes replaced)."""
    with storage_stream.open_input(str(path), options) as raw, \
            io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="") as fh:
        return next(csv.reader(fh, delimiter="\t" if fmt == "tsv" else ","), None)


def table_columns(path: Path | str, fmt: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """Column names of a table, read from its header or Parquet footer only."""
    try:
        if fmt == "parquet":
            with open_table(path, options) as source:
                return list(pq.read_schema(source).names)
        names = _first_record(path, fmt, options)
    except NotFound:
        raise UserError(f"{storage.scrub(str(path))}: no such file") from None
    except (pa.ArrowException, OSError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read as {fmt} ({exc})") from None
    if not names:
        raise UserError(f"{path}: empty file (no header line)")
    return names


def _given_columns(path: Path | str, fmt: str, names: tuple[str, ...], options: Mapping[str, Any] | None) -> None:
    """A headerless table must have as many fields as `--columns` names, or every row would be a bad_row."""
    if fmt not in ("csv", "tsv"):
        raise UserError(f"{path}: --columns names the columns of headerless CSV/TSV tables, not {fmt} files")
    try:
        first = _first_record(path, fmt, options)
    except (OSError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read as {fmt} ({exc})") from None
    if first is not None and len(first) != len(names):
        raise UserError(f"{path}: the first line has {len(first)} fields but --columns names {len(names)} "
                        f"({', '.join(names)})")
    if first is not None and [f.strip() for f in first] == list(names):
        log.warning("%s: the first line equals --columns; it is scored as data (drop --columns for a header)", path)


def check_tables(files: list[Path | str], fmt: str, needed: tuple[str, ...], names: Sequence[str] | None = None,
                 options: Mapping[str, Any] | None = None) -> dict[Path | str, TableColumns]:
    """Each table's columns, checked for `needed` and for clashes with the output's own columns.

    `names` (from `--columns`) are the columns of headerless CSV/TSV tables: the first line is data.
    """
    given = tuple(n.strip() for n in names) if names else None
    if given is not None and (not all(given) or len(set(given)) != len(given)):
        raise UserError(f"--columns {','.join(given)}: names must be non-empty and distinct")
    columns = {}
    for f in files:
        if given is not None:
            _given_columns(f, fmt, given, options)
        cols = (TableColumns(given, header=False) if given is not None
                else TableColumns(tuple(table_columns(f, fmt, options))))
        missing = [c for c in needed if c not in cols.names]
        if missing:
            where = "--columns" if given is not None else f"{f}:"
            raise UserError(f"{where} no column {', '.join(map(repr, missing))}; columns are {', '.join(cols.names)} "
                            "(choose with --image-col/--caption-col)")
        clash = [c for c in RESERVED if c in cols.names]
        if clash:
            raise UserError(f"{f}: has column(s) {', '.join(clash)}, which the output or the job's stages use; rename them first")
        columns[f] = cols
    return columns


class Utf8Replaced(io.RawIOBase):
    """A file read as UTF-8 with undecodable bytes replaced by U+FFFD (and handed on re-encoded).

    pyarrow's CSV reader rejects invalid UTF-8 in string columns, and also in the text of a malformed
    row before our handler sees it, so the bytes are made valid before pyarrow parses them. It streams:
    one chunk is decoded at a time, and the incremental decoder keeps a character split across chunks.
    """

    def __init__(self, path: str, chunk: int = _CSV_BLOCK, options: Mapping[str, Any] | None = None):
        super().__init__()
        self._fh = storage_stream.open_input(path, options)
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


def read_csv_blocks(path: str, file_index: int, fmt: str, columns: TableColumns, block_rows: int,
                    options: Mapping[str, Any] | None = None) -> Iterator[pa.Table]:
    """One CSV/TSV file as blocks of at most `block_rows` rows; malformed lines become `bad_row` rows."""
    bad: list[str] = []
    names = list(columns.names)
    read = pv.ReadOptions(block_size=_CSV_BLOCK, column_names=None if columns.header else names)
    with Utf8Replaced(path, options=options) as source:
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


def read_parquet_blocks(path: str, file_index: int, row_groups: list[int], first_row: int, block_rows: int,
                        options: Mapping[str, Any] | None = None) -> Iterator[pa.Table]:
    """Some row groups of one Parquet file as blocks; `first_row` is the first group's row index in the file."""
    row = first_row
    with open_table(path, options) as source:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=block_rows, row_groups=row_groups):
            table = pa.Table.from_batches([batch])
            table = table.append_column(READ_ERROR, pa.nulls(table.num_rows, pa.string()))
            yield _with_ids(table, file_index, row)
            row += table.num_rows
