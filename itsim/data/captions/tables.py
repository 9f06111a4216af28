"""Generic caption tables: CSV/TSV/pipe-separated text with a header, and Parquet.

The image and caption columns are found by name (`IMAGE_COLUMNS`, `CAPTION_COLUMNS`) or named by
the caller (`--image-col`, `--caption-col`); an optional `split` column is kept. Line numbers are
1-based physical lines for text tables and 1-based row numbers for Parquet.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from itsim.data.captions.rows import ReadReport, Rows, csv_fields, data_lines, finish, split_of
from itsim.errors import UserError

IMAGE_COLUMNS = ("image", "image_name", "filename", "file_name", "path")
CAPTION_COLUMNS = ("caption", "comment", "text", "sentence")


def pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], kind: str,
                path: str) -> str:
    """The column named `wanted` (exact, else case-insensitive), else the first known candidate name."""
    lookup = {str(c).strip().lower(): c for c in columns}
    if wanted:
        if wanted in columns:
            return wanted
        if wanted.strip().lower() in lookup:
            return lookup[wanted.strip().lower()]
        raise UserError(f"{path}: no {kind} column {wanted!r}; the columns are {list(columns)}")
    for name in candidates:
        if name in lookup:
            return lookup[name]
    raise UserError(f"{path}: no {kind} column (tried {', '.join(candidates)}); the columns are "
                    f"{list(columns)}; name it with --{kind}-col")


def _delimiter(path: Path, first_line: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    if "\t" in first_line:
        return "\t"
    return "|" if "|" in first_line and "," not in first_line else ","


def read_table_text(text: str, rows: Rows, report: ReadReport, path: Path, image_col: str | None = None,
                    caption_col: str | None = None, **_: Any) -> None:
    """Generic CSV/TSV with a header; an optional `split` column is kept.

    Extra fields are joined back into the caption only when the caption is the last column
    (otherwise we cannot tell which field moved, and the row is skipped as `extra_columns`).
    """
    lines = data_lines(text, report)
    header_line = next(lines, None)
    if header_line is None:
        raise UserError(f"{path}: empty caption file")
    delim = _delimiter(path, header_line[1])
    header = [h.strip() for h in csv_fields(header_line[1], delim)]
    i_img = header.index(pick_column(header, image_col, IMAGE_COLUMNS, "image", str(path)))
    i_cap = header.index(pick_column(header, caption_col, CAPTION_COLUMNS, "caption", str(path)))
    lower = [h.lower() for h in header]
    i_split = lower.index("split") if "split" in lower else None
    caption_last = i_cap == len(header) - 1
    for number, line in lines:
        report.rows_in += 1
        fields = csv_fields(line, delim)
        if len(fields) > len(header):
            if not caption_last:
                report.skip("extra_columns", number)
                continue
            fields = fields[:i_cap] + [delim.join(fields[i_cap:])]
            report.recover("extra_columns", number)
        if len(fields) <= max(i_img, i_cap):
            report.skip("missing_delimiter", number)
            continue
        split = split_of(fields[i_split], report) if i_split is not None and i_split < len(fields) else None
        rows.add(fields[i_img], fields[i_cap], number, split=split)


def _as_text(value: object) -> str:
    """Parquet cells: strings as they are, numbers as text (ids), missing values as ''."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        return str(value)
    return ""


def read_parquet(path: Path, image_col: str | None, caption_col: str | None) -> tuple[pd.DataFrame, ReadReport]:
    """A Parquet caption table, read whole (pandas), with the same row accounting as text tables."""
    report = ReadReport(str(path), "table")
    if not path.exists():
        raise UserError(f"caption file not found: {path}")
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise UserError(f"cannot read {path} as Parquet: {exc}") from None
    columns = [str(c) for c in table.columns]
    image = pick_column(columns, image_col, IMAGE_COLUMNS, "image", str(path))
    caption = pick_column(columns, caption_col, CAPTION_COLUMNS, "caption", str(path))
    split_col = next((c for c in columns if c.strip().lower() == "split"), None)
    splits = table[split_col].tolist() if split_col else [None] * len(table)
    rows = Rows(report)
    for number, (img, cap, split) in enumerate(zip(table[image].tolist(), table[caption].tolist(), splits), 1):
        report.rows_in += 1
        rows.add(_as_text(img), _as_text(cap), number, split=split_of(split, report))
    return finish(rows, report)
