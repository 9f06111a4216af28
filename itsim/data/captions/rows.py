"""What every caption reader shares: the `ReadReport`, the row collector, and text input.

Each reader accounts for every input row: it is either in the table or counted in the
`ReadReport` under a reason, with its line number, so a caller can check
`report.rows_in == report.rows_out + report.rows_skipped`. The collector (`Rows`) is the one
place that refuses rows without an image name or caption text, so every format refuses them the
same way. Text input is decoded once here (BOM, UTF-16, CRLF, stray Latin-1 bytes) so no reader
has to care about encodings.
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from itsim.errors import UserError

log = logging.getLogger(__name__)

SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test"}
MAX_LINES_KEPT = 50  # line numbers remembered per reason; counts are always complete


def normalize_split(value: object) -> str | None:
    """Map source split names to train/val/test (Karpathy's `restval` is extra training data)."""
    if not isinstance(value, str):
        return None
    return SPLIT_ALIASES.get(value.strip().lower())


@dataclasses.dataclass
class ReadReport:
    """What happened to every row of one input file."""

    path: str
    format: str
    rows_in: int = 0
    rows_out: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    recovered: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped_lines: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    recovered_lines: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    decode_replacements: int = 0
    notes: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def rows_recovered(self) -> int:
        return sum(self.recovered.values())

    @property
    def consistent(self) -> bool:
        return self.rows_in == self.rows_out + self.rows_skipped

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        kept = self.skipped_lines.setdefault(reason, [])
        if len(kept) < MAX_LINES_KEPT:
            kept.append(line)

    def recover(self, reason: str, line: int) -> None:
        self.recovered[reason] = self.recovered.get(reason, 0) + 1
        kept = self.recovered_lines.setdefault(reason, [])
        if len(kept) < MAX_LINES_KEPT:
            kept.append(line)

    def note(self, key: str, n: int = 1) -> None:
        self.notes[key] = self.notes.get(key, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rows_skipped": self.rows_skipped,
                "rows_recovered": self.rows_recovered}

    def summary(self) -> str:
        text = (f"{self.path} ({self.format}): {self.rows_in} rows in, {self.rows_out} out, "
                f"{self.rows_recovered} recovered, {self.rows_skipped} skipped")
        if self.skipped:
            text += " " + str(self.skipped)
        if self.decode_replacements:
            text += f"; {self.decode_replacements} undecodable bytes replaced"
        return text


class Rows:
    """Collects output rows; refuses (and counts) rows without an image name or caption text."""

    def __init__(self, report: ReadReport):
        self.report = report
        self.images: list[str] = []
        self.idx: list[int] = []
        self.captions: list[str] = []
        self.splits: list[str | None] = []
        self._seen: Counter[str] = Counter()

    def add(self, image: str, caption: object, line: int, idx: int | None = None,
            split: str | None = None) -> bool:
        image = image.strip() if isinstance(image, str) else ""
        if not image:
            self.report.skip("missing_image", line)
            return False
        if not isinstance(caption, str) or not caption.strip():
            self.report.skip("empty_caption", line)
            return False
        self.images.append(image)
        self.idx.append(self._seen[image] if idx is None else idx)
        self.captions.append(caption.strip())
        self.splits.append(split)
        self._seen[image] += 1
        return True

    def add_recovered(self, reason: str, image: str, caption: object, line: int, idx: int | None = None,
                      split: str | None = None) -> None:
        """Add a row rebuilt from a malformed line; it counts as recovered only if it is kept."""
        if self.add(image, caption, line, idx, split):
            self.report.recover(reason, line)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "image": pd.Series(self.images, dtype="str"),
            "caption_idx": pd.Series(self.idx, dtype="int64"),
            "caption": pd.Series(self.captions, dtype="str"),
            "split": pd.Series(self.splits, dtype="object"),
        })


def split_of(value: object, report: ReadReport) -> str | None:
    """A row's split as train/val/test; a value we do not know is noted and becomes None."""
    split = normalize_split(value)
    if split is None and isinstance(value, str) and value.strip():
        report.note("unknown_split_values")
    return split


# ---- input -----------------------------------------------------------------------------------

def read_bytes(path: Path) -> bytes:
    """The file's bytes; a missing file, a folder or an unreadable file is a UserError."""
    if not path.exists():
        raise UserError(f"caption file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder; expected a caption file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def decode(data: bytes, report: ReadReport) -> str:
    """UTF-8 (BOM dropped; UTF-16 when it has a BOM); bad bytes become U+FFFD and are counted."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        report.decode_replacements = text.count("\ufffd") - data.count("\ufffd".encode())
        log.warning("%s: %d undecodable bytes replaced by U+FFFD (file is not UTF-8)",
                    report.path, report.decode_replacements)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def data_lines(text: str, report: ReadReport) -> Iterator[tuple[int, str]]:
    """(line number, line) for non-blank lines; blank ones are noted, not counted as rows."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline does not start another line
    for number, line in enumerate(lines, 1):
        if line.strip():
            yield number, line
        else:
            report.note("blank_lines")


def csv_fields(line: str, delimiter: str = ",") -> list[str]:
    """One physical line through the csv module, so an unbalanced quote cannot swallow later rows."""
    return next(csv.reader([line], delimiter=delimiter), [])


# ---- output ----------------------------------------------------------------------------------

def check_and_log(report: ReadReport) -> None:
    """Refuse a report whose counts do not add up (a reader bug), then log what was skipped or recovered."""
    if not report.consistent:  # a reader bug, not bad input
        raise AssertionError(f"row accounting broken: {report.summary()}")
    log.info(report.summary())
    if report.recovered:
        log.warning("%s: recovered malformed rows %s (lines %s)", report.path, report.recovered,
                    report.recovered_lines)
    if report.skipped:
        log.warning("%s: skipped rows %s (lines %s)", report.path, report.skipped, report.skipped_lines)


def finish(rows: Rows, report: ReadReport) -> tuple[pd.DataFrame, ReadReport]:
    """The collected rows as a table, with the report's counts checked."""
    df = rows.frame()
    report.rows_out = len(df)
    check_and_log(report)
    return df, report
