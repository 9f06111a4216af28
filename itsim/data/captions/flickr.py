"""The Flickr caption text files: Kaggle Flickr30k `results.csv`, `*.token.txt`, Kaggle Flickr8k `captions.txt`.

These copies are messy (the common Flickr30k `results.csv` has a row with a missing `|`, Kaggle
Flickr8k quotes captions with commas), so each reader parses line by line itself and rebuilds a
malformed line when it can tell what was meant (counted as recovered), else skips it under a reason.
Line numbers are 1-based physical lines.
"""
from __future__ import annotations

import re
from typing import Any

from itsim.data.captions.rows import ReadReport, Rows, csv_fields, data_lines

_F30K_HEADER = re.compile(r"^\s*image_name\s*\|\s*comment_number\s*\|\s*comment\s*$", re.I)
_F30K_ROW = re.compile(r"^([^|]*)\|\s*(\d+)\s*\|(.*)$")
_F30K_NO_SECOND_PIPE = re.compile(r"^([^|]*)\|\s*(\d+)\s+(\S.*)$")  # `img.jpg| 4   A dog ...`
_F30K_NO_CAPTION = re.compile(r"^[^|]*\|\s*\d+\s*\|?\s*$")
_TOKEN_ROW = re.compile(r"^([^\t]*?)#(\d+)\t(.*)$")
_TOKEN_NO_TAB = re.compile(r"^(\S+?)#(\d+) +(.*)$")  # tab turned into spaces
_TOKEN_NO_CAPTION = re.compile(r"^\S+#\d+\s*$")
_TOKEN_SNIFF = re.compile(r"#\d+\t")
_IMAGE_THEN_TEXT = re.compile(r"^(\S+\.(?:jpe?g|png|gif|bmp|webp|tiff?))\s+(\S.*)$", re.I)


def sniff_flickr(first: str) -> str | None:
    """The Flickr format whose first non-blank line this is (`flickr30k_csv`, `token`, `flickr8k_csv`), or None."""
    if ("|" in first and "image_name" in first.lower()) or _F30K_ROW.match(first):
        return "flickr30k_csv"
    if _TOKEN_SNIFF.search(first):
        return "token"
    if first.strip().replace(" ", "").lower() == "image,caption":
        return "flickr8k_csv"
    return None


def read_flickr30k(text: str, rows: Rows, report: ReadReport, **_: Any) -> None:
    """Kaggle Flickr30k `results.csv`: `image_name| comment_number| comment`.

    The caption is the rest of the line after the second `|`, so a caption containing `|` stays
    whole. A missing second `|` (`img.jpg| 4   A dog ...`, row 19999 of the common copy) is
    recovered from the number and the text after it.
    """
    first = True
    for number, line in data_lines(text, report):
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


def read_token(text: str, rows: Rows, report: ReadReport, **_: Any) -> None:
    """Flickr8k/Flickr30k `*.token.txt`: `image#idx<TAB>caption`, no header; extra tabs stay in the caption."""
    for number, line in data_lines(text, report):
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


def read_flickr8k(text: str, rows: Rows, report: ReadReport, **_: Any) -> None:
    """Kaggle Flickr8k `captions.txt`: `image,caption`, quoted when the caption has commas.

    caption_idx is the caption's order within its image. Unquoted commas (more than two fields)
    are joined back into the caption; a missing comma is recovered when the line starts with an
    image file name followed by text.
    """
    first = True
    for number, line in data_lines(text, report):
        fields = csv_fields(line)
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
