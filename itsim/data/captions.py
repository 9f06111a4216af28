"""Caption files in every common layout -> one table: image, caption_idx, caption, split.

Public caption files are messy (the Kaggle Flickr30k `results.csv` has a row with a missing `|`,
Kaggle Flickr8k quotes captions with commas, files arrive with a BOM, CRLF or stray Latin-1
bytes), so each reader parses line by line itself and accounts for every input row: it is either
in the table or counted in the `ReadReport` under a reason, with its line number. A caller can
check `report.rows_in == report.rows_out + report.rows_skipped`.

Values are kept raw except: image names are stripped of surrounding whitespace, and captions lose
only their outer whitespace (format padding such as the space after `|`, or a stray `\\r`).
Normalisation for the model happens once, later, in `itsim.text`.

Line numbers are 1-based physical lines for text formats and 1-based record numbers (image entry
for Karpathy, annotation for COCO, row for Parquet) for structured formats. Blank lines are not
rows; they are only counted in `report.notes["blank_lines"]`.
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from itsim.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("flickr30k_csv", "token", "flickr8k_csv", "karpathy", "coco", "table")
COLUMNS = ("image", "caption_idx", "caption", "split")
IMAGE_COLUMNS = ("image", "image_name", "filename", "file_name", "path")
CAPTION_COLUMNS = ("caption", "comment", "text", "sentence")
SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test"}
PAIR_LABELS = {"match": 1, "1": 1, "true": 1, "yes": 1,
               "no-match": 0, "no_match": 0, "nomatch": 0, "mismatch": 0, "0": 0, "false": 0, "no": 0}
MAX_LINES_KEPT = 50  # line numbers remembered per reason; counts are always complete

_F30K_HEADER = re.compile(r"^\s*image_name\s*\|\s*comment_number\s*\|\s*comment\s*$", re.I)
_F30K_ROW = re.compile(r"^([^|]*)\|\s*(\d+)\s*\|(.*)$")
_F30K_NO_SECOND_PIPE = re.compile(r"^([^|]*)\|\s*(\d+)\s+(\S.*)$")  # `img.jpg| 4   A dog ...`
_F30K_NO_CAPTION = re.compile(r"^[^|]*\|\s*\d+\s*\|?\s*$")
_TOKEN_ROW = re.compile(r"^([^\t]*?)#(\d+)\t(.*)$")
_TOKEN_NO_TAB = re.compile(r"^(\S+?)#(\d+) +(.*)$")  # tab turned into spaces
_TOKEN_NO_CAPTION = re.compile(r"^\S+#\d+\s*$")
_TOKEN_SNIFF = re.compile(r"#\d+\t")
_IMAGE_THEN_TEXT = re.compile(r"^(\S+\.(?:jpe?g|png|gif|bmp|webp|tiff?))\s+(\S.*)$", re.I)


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


class _Rows:
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


# ---- input -----------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise UserError(f"caption file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder; expected a caption file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def _decode(data: bytes, report: ReadReport) -> str:
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


def _data_lines(text: str, report: ReadReport):
    """(line number, line) for non-blank lines; blank ones are noted, not counted as rows."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline does not start another line
    for number, line in enumerate(lines, 1):
        if line.strip():
            yield number, line
        else:
            report.note("blank_lines")


def _csv_fields(line: str, delimiter: str = ",") -> list[str]:
    """One physical line through the csv module, so an unbalanced quote cannot swallow later rows."""
    return next(csv.reader([line], delimiter=delimiter), [])


# ---- text formats ----------------------------------------------------------------------------

def _read_flickr30k(text: str, rows: _Rows, report: ReadReport, **_: Any) -> None:
    """Kaggle Flickr30k `results.csv`: `image_name| comment_number| comment`.

    The caption is the rest of the line after the second `|`, so a caption containing `|` stays
    whole. A missing second `|` (`img.jpg| 4   A dog ...`, row 19999 of the common copy) is
    recovered from the number and the text after it.
    """
    first = True
    for number, line in _data_lines(text, report):
        if first:
            first = False
            if _F30K_HEADER.match(line):
                continue
        report.rows_in += 1
        if match := _F30K_ROW.match(line):
            rows.add(match[1], match[3], number, int(match[2]))
        elif match := _F30K_NO_SECOND_PIPE.match(line):
            rows.add_recovered("missing_delimiter", match[1], match[3], number, int(match[2]))
        elif _F30K_NO_CAPTION.match(line):
            report.skip("empty_caption", number)
        elif "|" not in line:
            report.skip("missing_delimiter", number)
        else:
            report.skip("bad_comment_number", number)


def _read_token(text: str, rows: _Rows, report: ReadReport, **_: Any) -> None:
    """Flickr8k/Flickr30k `*.token.txt`: `image#idx<TAB>caption`, no header; extra tabs stay in the caption."""
    for number, line in _data_lines(text, report):
        report.rows_in += 1
        if match := _TOKEN_ROW.match(line):
            rows.add(match[1], match[3], number, int(match[2]))
        elif match := _TOKEN_NO_TAB.match(line):
            rows.add_recovered("missing_delimiter", match[1], match[3], number, int(match[2]))
        elif _TOKEN_NO_CAPTION.match(line):
            report.skip("empty_caption", number)
        elif "\t" in line:
            report.skip("bad_caption_idx", number)
        else:
            report.skip("missing_delimiter", number)


def _read_flickr8k(text: str, rows: _Rows, report: ReadReport, **_: Any) -> None:
    """Kaggle Flickr8k `captions.txt`: `image,caption`, quoted when the caption has commas.

    caption_idx is the caption's order within its image. Unquoted commas (more than two fields)
    are joined back into the caption; a missing comma is recovered when the line starts with an
    image file name followed by text.
    """
    first = True
    for number, line in _data_lines(text, report):
        fields = _csv_fields(line)
        if first:
            first = False
            if [f.strip().lower() for f in fields] == ["image", "caption"]:
                continue
        report.rows_in += 1
        if line.count('"') % 2:
            report.note("unbalanced_quotes")
        if len(fields) == 2:
            rows.add(fields[0], fields[1], number)
        elif len(fields) > 2:
            rows.add_recovered("extra_columns", fields[0], ",".join(fields[1:]), number)
        elif match := _IMAGE_THEN_TEXT.match(line.strip()):
            rows.add_recovered("missing_delimiter", match[1], match[2], number)
        else:
            report.skip("missing_delimiter", number)


def _pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], kind: str,
                 path: str) -> str:
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


def _read_table_text(text: str, rows: _Rows, report: ReadReport, path: Path, image_col: str | None = None,
                     caption_col: str | None = None, **_: Any) -> None:
    """Generic CSV/TSV with a header; an optional `split` column is kept.

    Extra fields are joined back into the caption only when the caption is the last column
    (otherwise we cannot tell which field moved, and the row is skipped as `extra_columns`).
    """
    lines = _data_lines(text, report)
    header_line = next(lines, None)
    if header_line is None:
        raise UserError(f"{path}: empty caption file")
    delim = _delimiter(path, header_line[1])
    header = [h.strip() for h in _csv_fields(header_line[1], delim)]
    i_img = header.index(_pick_column(header, image_col, IMAGE_COLUMNS, "image", str(path)))
    i_cap = header.index(_pick_column(header, caption_col, CAPTION_COLUMNS, "caption", str(path)))
    lower = [h.lower() for h in header]
    i_split = lower.index("split") if "split" in lower else None
    caption_last = i_cap == len(header) - 1
    for number, line in lines:
        report.rows_in += 1
        fields = _csv_fields(line, delim)
        if len(fields) > len(header):
            if not caption_last:
                report.skip("extra_columns", number)
                continue
            fields = fields[:i_cap] + [delim.join(fields[i_cap:])]
            report.recover("extra_columns", number)
        if len(fields) <= max(i_img, i_cap):
            report.skip("missing_delimiter", number)
            continue
        split = _split_of(fields[i_split], report) if i_split is not None and i_split < len(fields) else None
        rows.add(fields[i_img], fields[i_cap], number, split=split)


def _split_of(value: object, report: ReadReport) -> str | None:
    split = normalize_split(value)
    if split is None and isinstance(value, str) and value.strip():
        report.note("unknown_split_values")
    return split


def _as_text(value: object) -> str:
    """Parquet cells: strings as they are, numbers as text (ids), missing values as ''."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        return str(value)
    return ""


def _read_parquet(path: Path, image_col: str | None, caption_col: str | None) -> tuple[pd.DataFrame, ReadReport]:
    report = ReadReport(str(path), "table")
    if not path.exists():
        raise UserError(f"caption file not found: {path}")
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise UserError(f"cannot read {path} as Parquet: {exc}") from None
    columns = [str(c) for c in table.columns]
    image = _pick_column(columns, image_col, IMAGE_COLUMNS, "image", str(path))
    caption = _pick_column(columns, caption_col, CAPTION_COLUMNS, "caption", str(path))
    split_col = next((c for c in columns if c.strip().lower() == "split"), None)
    splits = table[split_col].tolist() if split_col else [None] * len(table)
    rows = _Rows(report)
    for number, (img, cap, split) in enumerate(zip(table[image].tolist(), table[caption].tolist(), splits), 1):
        report.rows_in += 1
        rows.add(_as_text(img), _as_text(cap), number, split=_split_of(split, report))
    return _finish(rows, report)


# ---- JSON formats ----------------------------------------------------------------------------

def _read_karpathy(obj: dict, rows: _Rows, report: ReadReport, **_: Any) -> None:
    """Karpathy split JSON; `restval` counts as train; COCO's copy puts `filepath/filename`.

    An image entry with no sentences is one skipped row (`no_captions`), so it is not lost unseen.
    """
    for number, entry in enumerate(obj.get("images") or [], 1):
        entry = entry if isinstance(entry, dict) else {}
        name = entry.get("filename") if isinstance(entry.get("filename"), str) else ""
        if name.strip() and isinstance(entry.get("filepath"), str) and entry["filepath"].strip():
            name = f"{entry['filepath'].strip()}/{name.strip()}"
        split = _split_of(entry.get("split"), report)
        sentences = entry.get("sentences") if isinstance(entry.get("sentences"), list) else []
        if not sentences:
            report.rows_in += 1
            report.skip("no_captions", number)
        for idx, sent in enumerate(sentences):
            report.rows_in += 1
            sent = sent if isinstance(sent, dict) else {}
            raw, tokens = sent.get("raw"), sent.get("tokens")
            if (not isinstance(raw, str) or not raw.strip()) and isinstance(tokens, list) and tokens:
                rows.add_recovered("raw_from_tokens", name, " ".join(map(str, tokens)), number, idx, split)
            else:
                rows.add(name, raw, number, idx, split)


def _read_coco(obj: dict, rows: _Rows, report: ReadReport, **_: Any) -> None:
    """COCO captions JSON; caption_idx is the annotation's order within its image."""
    names = {img.get("id"): img.get("file_name") for img in obj.get("images") or [] if isinstance(img, dict)}
    with_captions = set()
    for number, ann in enumerate(obj.get("annotations") or [], 1):
        report.rows_in += 1
        ann = ann if isinstance(ann, dict) else {}
        if ann.get("image_id") not in names:
            report.skip("unknown_image_id", number)
            continue
        if rows.add(names[ann["image_id"]] or "", ann.get("caption"), number):
            with_captions.add(ann["image_id"])
    if len(names) > len(with_captions):
        report.note("images_without_captions", len(names) - len(with_captions))


# ---- entry points ----------------------------------------------------------------------------

def _load_json(text: str, path: Path) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list):
        raise UserError(f"{path}: unrecognised JSON caption file (expected an 'images' list: "
                        "Karpathy split or COCO captions)")
    return obj


def _json_format(obj: dict, path: Path) -> str:
    if isinstance(obj.get("annotations"), list):
        return "coco"
    first = next((e for e in obj["images"] if isinstance(e, dict)), {})
    if "sentences" in first or not obj["images"]:
        return "karpathy"
    raise UserError(f"{path}: unrecognised JSON caption file (images have no 'sentences' and there "
                    "are no 'annotations')")


def detect_format(path: Path, text: str) -> str:
    """Guess the format from the extension and the first non-blank line."""
    if path.suffix.lower() == ".parquet":
        return "table"
    if path.suffix.lower() == ".json" or text.lstrip()[:1] == "{":
        return _json_format(_load_json(text, path), path)
    first = next((line for line in text.split("\n") if line.strip()), None)
    if first is None:
        raise UserError(f"{path}: empty caption file")
    if ("|" in first and "image_name" in first.lower()) or _F30K_ROW.match(first):
        return "flickr30k_csv"
    if _TOKEN_SNIFF.search(first):
        return "token"
    if first.strip().replace(" ", "").lower() == "image,caption":
        return "flickr8k_csv"
    return "table"


_TEXT_READERS: dict[str, Callable[..., None]] = {
    "flickr30k_csv": _read_flickr30k, "token": _read_token, "flickr8k_csv": _read_flickr8k,
    "table": _read_table_text,
}


def _check_and_log(report: ReadReport) -> None:
    if not report.consistent:  # a reader bug, not bad input
        raise AssertionError(f"row accounting broken: {report.summary()}")
    log.info(report.summary())
    if report.recovered:
        log.warning("%s: recovered malformed rows %s (lines %s)", report.path, report.recovered,
                    report.recovered_lines)
    if report.skipped:
        log.warning("%s: skipped rows %s (lines %s)", report.path, report.skipped, report.skipped_lines)


def _finish(rows: _Rows, report: ReadReport) -> tuple[pd.DataFrame, ReadReport]:
    df = rows.frame()
    report.rows_out = len(df)
    _check_and_log(report)
    return df, report


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
        return _read_parquet(path, image_col, caption_col)
    report = ReadReport(str(path), format)
    text = _decode(_read_bytes(path), report)
    if format == "auto":
        format = report.format = detect_format(path, text)
    rows = _Rows(report)
    if format in ("karpathy", "coco"):
        obj = _load_json(text, path)
        if _json_format(obj, path) != format:
            raise UserError(f"{path}: this JSON is {_json_format(obj, path)}, not {format}")
        (_read_karpathy if format == "karpathy" else _read_coco)(obj, rows, report)
    else:
        _TEXT_READERS[format](text, rows, report, path=path, image_col=image_col, caption_col=caption_col)
    return _finish(rows, report)


def read_pairs(path: str | Path) -> tuple[pd.DataFrame, ReadReport]:
    """Labelled pairs `image<TAB>caption<TAB>label` (match/no-match, 1/0, true/false); header optional.

    Extra tabs are kept in the caption (the label is the last field).
    """
    path = Path(path)
    report = ReadReport(str(path), "pairs")
    text = _decode(_read_bytes(path), report)
    images: list[str] = []
    captions: list[str] = []
    labels: list[int] = []
    first = True
    for number, line in _data_lines(text, report):
        fields = line.split("\t")
        if first:
            first = False
            if fields[-1].strip().lower() not in PAIR_LABELS and fields[0].strip().lower() in IMAGE_COLUMNS:
                continue  # header
        report.rows_in += 1
        if len(fields) < 3:
            report.skip("missing_delimiter", number)
            continue
        image, caption, label = fields[0].strip(), "\t".join(fields[1:-1]).strip(), fields[-1].strip().lower()
        if label not in PAIR_LABELS:
            report.skip("bad_label", number)
        elif not image:
            report.skip("missing_image", number)
        elif not caption:
            report.skip("empty_caption", number)
        else:
            if len(fields) > 3:
                report.recover("extra_columns", number)
            images.append(image)
            captions.append(caption)
            labels.append(PAIR_LABELS[label])
    if report.rows_in == 0 and not text.strip():
        raise UserError(f"{path}: empty pair file")
    df = pd.DataFrame({"image": pd.Series(images, dtype="str"), "caption": pd.Series(captions, dtype="str"),
                       "label": pd.Series(labels, dtype="int64")})
    report.rows_out = len(df)
    _check_and_log(report)
    return df, report
