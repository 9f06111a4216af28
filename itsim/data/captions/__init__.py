"""Caption files in every common layout -> one table: image, caption_idx, caption, split.

This module detects the layout and hands the file to its reader; the readers live beside it:
`flickr` (Flickr30k `results.csv`, `*.token.txt`, Kaggle Flickr8k `captions.txt`),
`tables` (generic CSV/TSV/Parquet tables), `json_files` (Karpathy, COCO) and
`labelled_pairs` (`read_pairs`, evaluation pair files). What they share, the `ReadReport` and the
row collector, is in `rows`.

Public caption files are messy (a row with a missing `|`, quoted commas, a BOM, CRLF or stray
Latin-1 bytes), so each reader parses line by line itself and accounts for every input row: it is
either in the table or counted in the `ReadReport` under a reason, with its line number. A caller
can check `report.rows_in == report.rows_out + report.rows_skipped`.

Values are kept raw except: image names are stripped of surrounding whitespace, and captions lose
only their outer whitespace (format padding such as the space after `|`, or a stray `\\r`).
Normalisation for the model happens once, later, in `itsim.text`.

Line numbers are 1-based physical lines for text formats and 1-based record numbers (image entry
for Karpathy, annotation for COCO, row for Parquet) for structured formats. Blank lines are not
rows; they are only counted in `report.notes["blank_lines"]`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from itsim.data.captions.flickr import read_flickr8k, read_flickr30k, read_token, sniff_flickr
from itsim.data.captions.json_files import json_format, load_json, read_coco, read_karpathy
from itsim.data.captions.rows import (MAX_LINES_KEPT, SPLIT_ALIASES, ReadReport, Rows, decode, finish,
                                     normalize_split, read_bytes)
from itsim.data.captions.tables import CAPTION_COLUMNS, IMAGE_COLUMNS, read_parquet, read_table_text
from itsim.data.captions.labelled_pairs import PAIR_LABELS, read_pairs
from itsim.errors import UserError

__all__ = ["FORMATS", "IMAGE_COLUMNS", "CAPTION_COLUMNS", "SPLIT_ALIASES", "PAIR_LABELS",
           "MAX_LINES_KEPT", "ReadReport", "normalize_split", "detect_format", "read_captions", "read_pairs"]

FORMATS = ("flickr30k_csv", "token", "flickr8k_csv", "karpathy", "coco", "table")

_TEXT_READERS: dict[str, Callable[..., None]] = {
    "flickr30k_csv": read_flickr30k, "token": read_token, "flickr8k_csv": read_flickr8k,
    "table": read_table_text,
}


def detect_format(path: Path, text: str) -> str:
    """Guess the format from the extension and the first non-blank line."""
    if path.suffix.lower() == ".parquet":
        return "table"
    if path.suffix.lower() == ".json" or text.lstrip()[:1] == "{":
        return json_format(load_json(text, path), path)
    first = next((line for line in text.split("\n") if line.strip()), None)
    if first is None:
        raise UserError(f"{path}: empty caption file")
    return sniff_flickr(first) or "table"


def read_captions(path: str | Path, format: str = "auto", image_col: str | None = None,
                  caption_col: str | None = None) -> tuple[pd.DataFrame, ReadReport]:
    """Read any supported caption file into (DataFrame[image, caption_idx, caption, split], report).

    `format="auto"` detects the layout (see `detect_format`); name one of `FORMATS` to override.
    `image_col`/`caption_col` pick the columns of a generic table (`table` format).
    """
    path = Path(path)
    if format not in ("auto", *FORMATS):
        raise UserError(f"unknown caption format {format!r}; choose auto or one of {', '.join(FORMATS)}")
    if path.suffix.lower() == ".parquet" and format in ("auto", "table"):
        return read_parquet(path, image_col, caption_col)
    report = ReadReport(str(path), format)
    text = decode(read_bytes(path), report)
    if format == "auto":
        format = report.format = detect_format(path, text)
    rows = Rows(report)
    if format in ("karpathy", "coco"):
        obj = load_json(text, path)
        if json_format(obj, path) != format:
            raise UserError(f"{path}: this JSON is {json_format(obj, path)}, not {format}")
        (read_karpathy if format == "karpathy" else read_coco)(obj, rows, report)
    else:
        _TEXT_READERS[format](text, rows, report, path=path, image_col=image_col, caption_col=caption_col)
    return finish(rows, report)
