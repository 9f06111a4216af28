"""Labelled pair files for evaluation: `image<TAB>caption<TAB>label`, one (image, caption) judgement a line."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from itsim.data.captions.rows import ReadReport, check_and_log, data_lines, decode, read_bytes
from itsim.data.captions.tables import IMAGE_COLUMNS
from itsim.errors import UserError

PAIR_LABELS = {"match": 1, "1": 1, "true": 1, "yes": 1,
               "no-match": 0, "no_match": 0, "nomatch": 0, "mismatch": 0, "0": 0, "false": 0, "no": 0}


def read_pairs(path: str | Path) -> tuple[pd.DataFrame, ReadReport]:
    """Labelled pairs `image<TAB>caption<TAB>label` (match/no-match, 1/0, true/false); header optional.

    Extra tabs are kept in the caption (the label is the last field).
    """
    path = Path(path)
    report = ReadReport(str(path), "pairs")
    text = decode(read_bytes(path), report)
    images: list[str] = []
    captions: list[str] = []
    labels: list[int] = []
    first = True
    for number, line in data_lines(text, report):
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
    check_and_log(report)
    return df, report
