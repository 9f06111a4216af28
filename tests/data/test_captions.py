"""Caption readers on small files written in the exact public layouts, malformed rows included."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from itsim.data.captions import FORMATS, read_captions, read_pairs
from itsim.errors import UserError


def rows(df: pd.DataFrame) -> list[tuple]:
    return [tuple(r) for r in df[["image", "caption_idx", "caption", "split"]].itertuples(index=False)]


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


# ---- Flickr30k results.csv ---------------------------------------------------------------

F30K = (
    "image_name| comment_number| comment\n"
    "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands while hanging out in the yard .\n"
    "1000092795.jpg| 1| Two young, White males are outside near many bushes .\n"
    '1000092795.jpg| 2| A man says "hi" | waves\n'
    "2199200615.jpg| 4   A dog runs across the grass .\n"
    "\n"
    "2199200615.jpg| 3|   \n"
    "2199200615.jpg| 2\n"
    "no delimiter here\n"
    "2199200615.jpg| x| A caption with no number\n"
    "| 1| A caption with no image\n"
)


def test_flickr30k_recovers_missing_pipe_and_accounts_for_every_row(tmp_path):
    df, report = read_captions(write(tmp_path / "results.csv", F30K))
    assert report.format == "flickr30k_csv"
    assert rows(df) == [
        ("1000092795.jpg", 0, "Two young guys with shaggy hair look at their hands while hanging out in the yard .", None),
        ("1000092795.jpg", 1, "Two young, White males are outside near many bushes .", None),
        ("1000092795.jpg", 2, 'A man says "hi" | waves', None),
        ("2199200615.jpg", 4, "A dog runs across the grass .", None),
    ]
    assert report.recovered == {"missing_delimiter": 1}
    assert report.recovered_lines == {"missing_delimiter": [5]}
    assert report.skipped == {"empty_caption": 2, "missing_delimiter": 1, "bad_comment_number": 1,
                              "missing_image": 1}
    assert report.skipped_lines["empty_caption"] == [7, 8]
    assert report.skipped_lines["missing_delimiter"] == [9]
    assert report.skipped_lines["bad_comment_number"] == [10]
    assert report.notes == {"blank_lines": 1}
    assert (report.rows_in, report.rows_out, report.rows_skipped, report.rows_recovered) == (9, 4, 5, 1)
    assert report.rows_in == report.rows_out + report.rows_skipped
    assert df["caption_idx"].dtype == "int64"


def test_flickr30k_header_without_spaces_and_crlf(tmp_path):
    text = "image_name|comment_number|comment\r\n1000092795.jpg|0|Two young guys .\r\n1000092795.jpg|1|A, b\r\n"
    df, report = read_captions(write(tmp_path / "results.csv", text))
    assert report.format == "flickr30k_csv"
    assert rows(df) == [("1000092795.jpg", 0, "Two young guys .", None), ("1000092795.jpg", 1, "A, b", None)]
    assert report.rows_skipped == 0 and report.notes == {}


def test_flickr30k_reads_158915_rows_in_a_couple_of_seconds(tmp_path):
    lines = ["image_name| comment_number| comment"]
    lines += [f"{1000000 + i // 5}.jpg| {i % 5}| A man, in a \"red\" shirt walks down street number {i} ."
              for i in range(158915)]
    lines[20000] = "2199200615.jpg| 4   A dog runs across the grass ."  # data row index 19999
    path = write(tmp_path / "results.csv", "\n".join(lines) + "\n")
    start = time.perf_counter()
    df, report = read_captions(path)
    elapsed = time.perf_counter() - start
    assert len(df) == 158915 and report.rows_recovered == 1 and report.rows_skipped == 0
    assert tuple(df.iloc[19999][["image", "caption_idx", "caption"]]) == (
        "2199200615.jpg", 4, "A dog runs across the grass .")
    assert elapsed < 3.0, f"reading took {elapsed:.2f} s"


# ---- token files ---------------------------------------------------------------------------

def test_token_file_with_extra_tab_missing_tab_and_bad_index(tmp_path):
    text = ("1000092795.jpg#0\tTwo young guys with shaggy hair .\n"
            "1000092795.jpg#1\tA caption\twith a tab\n"
            "1000092795.jpg#2 A tab became a space .\n"
            "1000092795.jpg#3\t \n"
            "1000092795.jpg#x\tBad index\n"
            "just words\n")
    df, report = read_captions(write(tmp_path / "results_20130124.token", text))
    assert report.format == "token"
    assert rows(df) == [("1000092795.jpg", 0, "Two young guys with shaggy hair .", None),
                        ("1000092795.jpg", 1, "A caption\twith a tab", None),
                        ("1000092795.jpg", 2, "A tab became a space .", None)]
    assert report.recovered == {"missing_delimiter": 1}
    assert report.skipped == {"empty_caption": 1, "bad_caption_idx": 1, "missing_delimiter": 1}
    assert report.skipped_lines == {"empty_caption": [4], "bad_caption_idx": [5], "missing_delimiter": [6]}


# ---- Kaggle Flickr8k captions.txt -------------------------------------------------------------

def test_flickr8k_csv_bom_crlf_quotes_latin1_and_malformed_rows(tmp_path):
    text = ("\ufeffimage,caption\r\n"
            "1000268201_693b08cb0e.jpg,A child in a pink dress .\r\n"
            '1000268201_693b08cb0e.jpg,"A dog shakes its head near the shore , a red ball next to it ."\r\n'
            '1000268201_693b08cb0e.jpg,"He said ""hi"" , then left"\r\n'
            "1001773457_577c3a7d70.jpg,A black dog, and a spotted dog are fighting\r\n"
            "1001773457_577c3a7d70.jpg,   \r\n"
            "1001773457_577c3a7d70.jpg A dog with no comma .\r\n"
            "1001773457_577c3a7d70.jpg\r\n"
            "1001773457_577c3a7d70.jpg,Caf\xe9 dog .\r\n")
    data = text.encode("utf-8").replace("Caf\xe9".encode("utf-8"), b"Caf\xe9")  # one Latin-1 byte
    path = tmp_path / "captions.txt"
    path.write_bytes(data)
    df, report = read_captions(path)
    assert report.format == "flickr8k_csv"
    assert rows(df) == [
        ("1000268201_693b08cb0e.jpg", 0, "A child in a pink dress .", None),
        ("1000268201_693b08cb0e.jpg", 1, "A dog shakes its head near the shore , a red ball next to it .", None),
        ("1000268201_693b08cb0e.jpg", 2, 'He said "hi" , then left', None),
        ("1001773457_577c3a7d70.jpg", 0, "A black dog, and a spotted dog are fighting", None),
        ("1001773457_577c3a7d70.jpg", 1, "A dog with no comma .", None),
        ("1001773457_577c3a7d70.jpg", 2, "Caf\ufffd dog .", None),
    ]
    assert report.decode_replacements == 1
    assert report.recovered == {"extra_columns": 1, "missing_delimiter": 1}
    assert report.recovered_lines == {"extra_columns": [5], "missing_delimiter": [7]}
    assert report.skipped == {"empty_caption": 1, "missing_delimiter": 1}
    assert report.skipped_lines == {"empty_caption": [6], "missing_delimiter": [8]}
    assert report.rows_in == 8 and report.rows_in == report.rows_out + report.rows_skipped


def test_unbalanced_quote_does_not_swallow_later_rows(tmp_path):
    text = 'image,caption\na.jpg,"An open quote\nb.jpg,Next row .\n'
    df, report = read_captions(write(tmp_path / "captions.txt", text))
    assert rows(df) == [("a.jpg", 0, "An open quote", None), ("b.jpg", 0, "Next row .", None)]
    assert report.notes == {"unbalanced_quotes": 1}


def test_real_flickr8k_captions(flickr8k_dir):
    df, report = read_captions(flickr8k_dir / "captions.txt")
    assert report.format == "flickr8k_csv"
    assert len(df) == 37490 and report.rows_in == 37490 and report.rows_skipped == 0
    assert df["image"].nunique() == 7498
    assert df.groupby("image").size().eq(5).all()
    assert sorted(df["caption_idx"].unique().tolist()) == [0, 1, 2, 3, 4]
    assert df["caption"].str.contains(",").sum() > 0 and not df["caption"].str.startswith('"').any()
    assert df["split"].isna().all()


# ---- JSON formats --------------------------------------------------------------------------------

def test_karpathy_keeps_splits_restval_is_train_and_filepath_is_joined(tmp_path):
    data = {"images": [
        {"filename": "1000092795.jpg", "split": "train", "sentences": [
            {"raw": "Two young guys .", "tokens": ["two", "young", "guys"]},
            {"raw": "  ", "tokens": ["rebuilt", "from", "tokens"]}]},
        {"filename": "COCO_val2014_000000391895.jpg", "filepath": "val2014", "split": "restval",
         "sentences": [{"raw": "A man riding a bike .", "tokens": []}]},
        {"filename": "b.jpg", "split": "test", "sentences": []},
        {"filename": "c.jpg", "split": "val", "sentences": [{"raw": "", "tokens": []}]},
        {"filename": "d.jpg", "split": "val", "sentences": [{"raw": "A cat ."}]},
    ]}
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps(data))
    df, report = read_captions(path)
    assert report.format == "karpathy"
    assert rows(df) == [("1000092795.jpg", 0, "Two young guys .", "train"),
                        ("1000092795.jpg", 1, "rebuilt from tokens", "train"),
                        ("val2014/COCO_val2014_000000391895.jpg", 0, "A man riding a bike .", "train"),
                        ("d.jpg", 0, "A cat .", "val")]
    assert report.recovered == {"raw_from_tokens": 1}
    assert report.skipped == {"no_captions": 1, "empty_caption": 1}
    assert report.skipped_lines == {"no_captions": [3], "empty_caption": [4]}
    assert report.rows_in == 6


def test_coco_captions_order_within_image_and_unknown_ids(tmp_path):
    data = {"images": [{"id": 7, "file_name": "COCO_val2014_000000000007.jpg"},
                       {"id": 9, "file_name": "nine.jpg"}, {"id": 11, "file_name": "unused.jpg"}],
            "annotations": [{"image_id": 9, "id": 1, "caption": "First of nine."},
                            {"image_id": 7, "id": 2, "caption": "A kitchen, with a sink."},
                            {"image_id": 9, "id": 3, "caption": "Second of nine."},
                            {"image_id": 99, "id": 4, "caption": "Orphan."},
                            {"image_id": 7, "id": 5, "caption": None}]}
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(data))
    df, report = read_captions(path)
    assert report.format == "coco"
    assert rows(df) == [("nine.jpg", 0, "First of nine.", None),
                        ("COCO_val2014_000000000007.jpg", 0, "A kitchen, with a sink.", None),
                        ("nine.jpg", 1, "Second of nine.", None)]
    assert report.skipped == {"unknown_image_id": 1, "empty_caption": 1}
    assert report.skipped_lines == {"unknown_image_id": [4], "empty_caption": [5]}
    assert report.notes == {"images_without_captions": 1}


# ---- generic tables ------------------------------------------------------------------------------

def test_table_csv_default_columns_split_column_and_extra_fields(tmp_path):
    text = ("id,file_name,split,text\n"
            "1,a.jpg,train,A red car .\n"
            "2, b.jpg ,dev,A blue car, parked .\n"
            "3,c.jpg,,A green car .\n"
            "4,d.jpg,weird,A car .\n"
            "5,e.jpg\n")
    df, report = read_captions(write(tmp_path / "pairs.csv", text))
    assert report.format == "table"
    assert rows(df) == [("a.jpg", 0, "A red car .", "train"), ("b.jpg", 0, "A blue car, parked .", "val"),
                        ("c.jpg", 0, "A green car .", None), ("d.jpg", 0, "A car .", None)]
    assert report.recovered == {"extra_columns": 1}
    assert report.skipped == {"missing_delimiter": 1}
    assert report.notes == {"unknown_split_values": 1}


def test_table_tsv_with_named_columns_and_missing_column_error(tmp_path):
    path = write(tmp_path / "caps.tsv", "photo\tdescription\nx.jpg\tA, b\nx.jpg\tC\n")
    df, _ = read_captions(path, image_col="photo", caption_col="description")
    assert rows(df) == [("x.jpg", 0, "A, b", None), ("x.jpg", 1, "C", None)]
    with pytest.raises(UserError, match=r"no image column .*\['photo', 'description'\]"):
        read_captions(path)
    with pytest.raises(UserError, match="no caption column 'caption_text'"):
        read_captions(path, image_col="photo", caption_col="caption_text")


def test_table_parquet_with_missing_values(tmp_path):
    path = tmp_path / "caps.parquet"
    pd.DataFrame({"image": ["a.jpg", "a.jpg", None, "b.jpg"], "caption": ["One", None, "Three", "Four"],
                  "split": ["train", "train", "val", "restval"]}).to_parquet(path)
    df, report = read_captions(path)
    assert report.format == "table"
    assert rows(df) == [("a.jpg", 0, "One", "train"), ("b.jpg", 0, "Four", "train")]
    assert report.skipped == {"empty_caption": 1, "missing_image": 1}
    assert report.skipped_lines == {"empty_caption": [2], "missing_image": [3]}


# ---- errors and overrides -------------------------------------------------------------------------

def test_format_override_and_user_errors(tmp_path):
    assert "flickr30k_csv" in FORMATS and "table" in FORMATS
    path = write(tmp_path / "caps.txt", "image,caption\na.jpg,A cat .\n")
    df, report = read_captions(path, format="table")
    assert report.format == "table" and rows(df) == [("a.jpg", 0, "A cat .", None)]
    with pytest.raises(UserError, match="caption file not found"):
        read_captions(tmp_path / "missing.csv")
    with pytest.raises(UserError, match="is a folder"):
        read_captions(tmp_path)
    with pytest.raises(UserError, match="unknown caption format 'xml'"):
        read_captions(path, format="xml")
    with pytest.raises(UserError, match="empty caption file"):
        read_captions(write(tmp_path / "empty.csv", "\n \n"))
    with pytest.raises(UserError, match="not valid JSON"):
        read_captions(write(tmp_path / "bad.json", '{"images": ['))
    with pytest.raises(UserError, match="unrecognised JSON"):
        read_captions(write(tmp_path / "other.json", '{"rows": []}'))
    coco = write(tmp_path / "coco.json", '{"images": [], "annotations": []}')
    with pytest.raises(UserError, match="is coco, not karpathy"):
        read_captions(coco, format="karpathy")


# ---- labelled pairs ---------------------------------------------------------------------------------

def test_read_pairs_with_header_label_variants_and_bad_rows(tmp_path):
    text = ("image\tcaption\tlabel\r\n"
            "a.jpg\tA cat .\tmatch\r\n"
            "a.jpg\tA dog .\tno-match\r\n"
            "b.jpg\tTab\tinside\t1\r\n"
            "b.jpg\tFalse one\tFALSE\r\n"
            "b.jpg\tNo label\r\n"
            "b.jpg\tOdd label\tmaybe\r\n"
            "c.jpg\t \t0")
    df, report = read_pairs(write(tmp_path / "itm.tsv", text))
    assert list(df.itertuples(index=False, name=None)) == [
        ("a.jpg", "A cat .", 1), ("a.jpg", "A dog .", 0), ("b.jpg", "Tab\tinside", 1), ("b.jpg", "False one", 0)]
    assert df["label"].dtype == "int64"
    assert report.recovered == {"extra_columns": 1}
    assert report.skipped == {"missing_delimiter": 1, "bad_label": 1, "empty_caption": 1}
    assert report.rows_in == 7 and report.rows_in == report.rows_out + report.rows_skipped


def test_read_pairs_real_dev_file_has_no_header(flickr8k_dir):
    df, report = read_pairs(flickr8k_dir / "itm_dev.tsv")
    # 1,164 rows: `wc -l` (and the data README) say 1,163 because the last line has no newline.
    assert len(df) == 1164 and report.rows_skipped == 0
    assert df["label"].value_counts().to_dict() == {0: 673, 1: 491}
    assert df["image"].nunique() == 491
    assert tuple(df.iloc[0]) == ("103205630_682ca7285b.jpg",
                                 "two men setting up a blue ice fishing hut on an iced over lake", 1)


def test_utf16_token_file_and_empty_pair_file(tmp_path):
    path = write(tmp_path / "Flickr8k.token.txt", "\ufeffa.jpg#0\tA caf\xe9 .\r\na.jpg#1\tTwo .\r\n", "utf-16-le")
    df, report = read_captions(path)
    assert report.format == "token" and report.decode_replacements == 0
    assert rows(df) == [("a.jpg", 0, "A caf\xe9 .", None), ("a.jpg", 1, "Two .", None)]
    with pytest.raises(UserError, match="empty pair file"):
        read_pairs(write(tmp_path / "empty.tsv", ""))
