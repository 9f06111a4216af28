"""The bad-input corpus (tests/badcorpus.py) through `itsim build-shards` and `itsim score`.

build-shards runs as a user runs it (a subprocess of the CLI); the scorer runs its Ray Data job
in-process on the session's local Ray. Every case's outcome is asserted, and every input row is
accounted for: in a shard or in failures.jsonl, and one output row per input row of the scorer.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pds
import pytest
import torch
from PIL import Image

from badcorpus import CASES, LATIN1_CAPTION, Case, Corpus, write_corpus
from itsim.model import ItsimModel, ModelConfig, Preprocess, save_model
from itsim.text import Vocab, normalize

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def _id(case: Case) -> str:
    return re.sub(r"[^a-z0-9]+", "-", case.name.lower()).strip("-")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return write_corpus(tmp_path_factory.mktemp("badcorpus"))


# ---- build-shards --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bad_shards")
    proc = subprocess.run(
        [sys.executable, "-m", "itsim.cli", "build-shards", "--captions", str(corpus.captions), "--images",
         str(corpus.images), "--out", str(out), "--image-size", str(SIZE), "--shard-size", "8", "--workers", "2",
         "--splits", "1,0,0", "--max-failure-rate", "1"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import webdataset as wds

    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / n) for split in manifest["splits"].values() for n in split["shards"]]
    samples = {json.loads(s["json"])["image"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    return {"proc": proc, "manifest": manifest, "samples": samples, "failures": failures}


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_build_shards_outcome_of_each_case(corpus, built, case):
    name = corpus.image_name(case)
    samples, failures = built["samples"], built["failures"]
    if case.shards == "ok":
        meta = json.loads(samples[name]["json"])
        assert meta["captions"] == [case.stored if case.stored is not None else case.caption.strip()]
        img = Image.open(io.BytesIO(samples[name]["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (SIZE, SIZE)
        assert not [f for f in failures if f["image"] == name]
    elif case.shards.startswith("reader:"):  # skipped by the caption reader: counted with its line number
        reason = case.shards.removeprefix("reader:")
        record = next(f for f in failures if f["image"] is None and f["reason"] == reason)
        assert corpus.lines[case.name] in record["lines"]
        assert name not in samples or not name
    else:
        assert [(f["reason"], f["caption_rows"]) for f in failures if f["image"] == name] == [(case.shards, 1)]
        assert name not in samples


def test_build_shards_stores_the_first_frame_of_an_animated_gif(corpus, built):
    import numpy as np

    from itsim.images import resize

    with Image.open(corpus.images / "anim.gif") as gif:
        assert gif.n_frames == 2
        frames = []
        for i in range(2):
            gif.seek(i)
            frames.append(np.asarray(resize(gif.convert("RGB"), SIZE), dtype=float))
    stored = np.asarray(Image.open(io.BytesIO(built["samples"]["anim.gif"]["jpg"])).convert("RGB"), dtype=float)
    first, second = np.abs(stored - frames[0]).mean(), np.abs(stored - frames[1]).mean()
    assert np.abs(frames[0] - frames[1]).mean() > 20  # the frames differ clearly
    assert first < 4 and second > 5 * first, (first, second)


def test_build_shards_accounts_for_every_row_of_a_bom_crlf_file(corpus, built):
    manifest, samples, failures = built["manifest"], built["samples"], built["failures"]
    in_shards = sum(len(json.loads(s["json"])["captions"]) for s in samples.values())
    in_failures = sum(f["caption_rows"] for f in failures)
    assert manifest["reader"]["rows_in"] == len(CASES)  # the BOM header is a header, not a row
    assert in_shards + in_failures == len(CASES)
    assert manifest["rows"] == {"input": len(CASES), "in_shards": in_shards, "in_failures": in_failures,
                                "accounted": len(CASES)}
    assert in_shards == sum(c.shards == "ok" for c in CASES)
    assert manifest["reader"]["decode_replacements"] == 1  # the Latin-1 byte, replaced and counted
    assert manifest["reader"]["recovered"] == {"missing_delimiter": 1, "extra_columns": 1}
    assert not any("\r" in c or "\ufeff" in c for s in samples.values() for c in json.loads(s["json"])["captions"])
    assert "Traceback" not in built["proc"].stderr
    long = json.loads(samples["cap_long.jpg"]["json"])["captions"][0]
    assert len(long) == 10_000  # stored whole; only the token ids are cut to max_len


# ---- score -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vocab = Vocab.build([c.caption for c in CASES])
    model = ItsimModel(ModelConfig(vocab_size=len(vocab), channels=(8, 16), image_dim=32, embed_dim=16,
                                   lstm_hidden=16, lstm_layers=1, text_dim=32, head_dim=16)).eval()
    return save_model(tmp_path_factory.mktemp("bad_model") / "model", model, vocab, Preprocess(image_size=SIZE))


def _read(out: Path) -> pd.DataFrame:
    return pds.dataset(sorted(str(p) for p in out.glob("*.parquet")), format="parquet").to_table().to_pandas()


@pytest.fixture(scope="module")
def scored(corpus, model_dir, ray_local, tmp_path_factory) -> tuple[pd.DataFrame, dict]:
    from itsim.score.ray_job import ScoreConfig, run_score

    out = tmp_path_factory.mktemp("bad_score") / "out"
    summary = run_score(ScoreConfig(model=str(model_dir), input=(str(corpus.pairs),), output=str(out),
                                    images=str(corpus.images), batch_size=8, workers=1))
    return _read(out), summary


SCORED_CASES = [c for c in CASES if c.score != "not_scored_here"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [c for c in SCORED_CASES if c.score != "bad_row"], ids=_id)
def test_score_outcome_of_each_case(corpus, scored, case):
    df, _ = scored
    rows = df[df["image"] == corpus.image_name(case)]
    assert len(rows) == 1
    row = rows.iloc[0]
    if case.score == "ok":
        assert pd.isna(row["error"]) and 0.0 < row["score"] < 1.0
        assert normalize(row["caption"]) == normalize(case.caption)
    else:
        assert row["error"] == case.score and pd.isna(row["score"])


@pytest.mark.timeout(300)
def test_score_keeps_every_row_and_malformed_lines_become_error_rows(scored):
    df, summary = scored
    assert len(df) == len(SCORED_CASES) and df["row_id"].is_unique  # BOM header not a row; nothing lost
    bad_rows = df[df["error"] == "bad_row"]
    assert len(bad_rows) == sum(c.score == "bad_row" for c in SCORED_CASES)
    assert bad_rows["image"].isna().all()
    assert summary["rows"] == len(SCORED_CASES)
    assert summary["scored"] == sum(c.score == "ok" for c in SCORED_CASES)
    want: dict[str, int] = {}
    for c in SCORED_CASES:
        if c.score != "ok":
            want[c.score] = want.get(c.score, 0) + 1
    assert summary["errors"] == dict(sorted(want.items()))
    assert not df["caption"].dropna().str.contains("\r").any()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["early", "late"])
def test_score_a_csv_with_a_non_utf8_byte_keeps_every_row(corpus, model_dir, ray_local, tmp_path, where):
    from itsim.score.ray_job import ScoreConfig, run_score

    path = corpus.latin1 if where == "early" else corpus.latin1_late
    n_rows = len(path.read_bytes().splitlines()) - 1
    summary = run_score(ScoreConfig(model=str(model_dir), input=(str(path),), output=str(tmp_path / "out"),
                                    images=str(corpus.images), batch_size=64, workers=1))
    df = _read(tmp_path / "out")
    assert summary["rows"] == len(df) == n_rows and summary["scored"] == n_rows and summary["errors"] == {}
    latin = df[df["image"] == "cap_latin1.jpg"]
    assert len(latin) == 1
    row = latin.iloc[0]
    assert pd.isna(row["error"]) and 0.0 < row["score"] < 1.0  # scored, not just present
    assert row["caption"] == LATIN1_CAPTION.decode("utf-8", errors="replace")
    assert row["caption"] == "A caf\ufffd with red chairs on the street"
    good = df[df["image"] == "good.jpg"]
    assert len(good) == n_rows - 1 and good["error"].isna().all() and good["score"].between(0, 1).all()
    assert not good["caption"].str.contains("\ufffd").any()


@pytest.mark.timeout(300)
def test_score_replaces_bad_bytes_in_a_header_a_caption_and_a_malformed_line(corpus, model_dir, ray_local, tmp_path):
    """pyarrow decodes a malformed line's text before our handler sees it, so one bad byte there
    would fail the job even with text columns read as binary; the reader makes the bytes valid first."""
    from itsim.score.ray_job import ScoreConfig, run_score

    path = tmp_path / "bytes.csv"
    path.write_bytes(b"image,caption,n\xf6te\n"
                     b"cap_latin1.jpg,A caf\xe9 with red chairs,a\n"
                     b"good.jpg,\xff\xfe,b\n"  # nothing but bad bytes: an empty caption once normalised
                     b"good.jpg,a dog \xe9,x,y\n"  # one field too many: a bad_row
                     b"good.jpg,a good row,c\n")
    summary = run_score(ScoreConfig(model=str(model_dir), input=(str(path),), output=str(tmp_path / "out"),
                                    images=str(corpus.images), batch_size=64, workers=1))
    df = _read(tmp_path / "out").sort_values("row_id")
    assert summary["rows"] == len(df) == 4 and summary["scored"] == 2
    assert summary["errors"] == {"bad_row": 1, "empty_caption": 1}
    assert "n\ufffdte" in df.columns
    latin = df[df["image"] == "cap_latin1.jpg"].iloc[0]
    assert latin["caption"] == "A caf\ufffd with red chairs" and pd.isna(latin["error"]) and 0 < latin["score"] < 1
    assert df.loc[df["caption"] == "\ufffd\ufffd", "error"].tolist() == ["empty_caption"]


def test_utf8_replaced_stream_equals_decoding_the_whole_file_with_replace(tmp_path):
    """Characters split across reads, bad bytes, and a sequence cut at the end of the file."""
    from itsim.score.read import Utf8Replaced

    raw = "é".encode() * 5 + b"\xff" + "漢字 \ufffd".encode() + b"\xe9x" + "€".encode()[:2]
    path = tmp_path / "mixed.csv"
    path.write_bytes(raw)
    want = raw.decode("utf-8", errors="replace")
    for chunk, size in ((1, 1), (2, 3), (7, 5), (1 << 20, 4)):
        with Utf8Replaced(str(path), chunk=chunk) as stream:
            got = b"".join(iter(lambda: stream.read(size), b""))
        assert got == want.encode()
        assert stream.replaced == want.count("\ufffd") - 1  # the U+FFFD already in the file is not counted


# ---- mutated images ----------------------------------------------------------------------------

def test_mutated_images_only_ever_fail_as_image_errors():
    """Seeded byte mutations of small JPEG/PNG/GIF/TIFF/BMP/WebP files (a 68,000-file run of this
    found the TIFF TypeError now in the corpus): every failure is an ImageError with a reason."""
    import random
    import warnings

    from badcorpus import smooth
    from itsim.images import ImageError, load_image

    seeds = []
    for fmt in ("JPEG", "PNG", "GIF", "TIFF", "BMP", "WEBP"):
        buf = io.BytesIO()
        smooth(len(seeds), 24, 16).save(buf, format=fmt)
        seeds.append(buf.getvalue())
    rng = random.Random(11)
    reasons: dict[str, int] = {}
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.choice((1, 2, 4, 8, 16))):
            pos = rng.randrange(len(data))
            op = rng.random()
            if op < 0.6:
                data[pos] = rng.randrange(256)
            elif op < 0.8:
                del data[pos:pos + rng.randrange(1, 64)]
            else:
                data[pos:pos] = rng.randbytes(rng.randrange(1, 16))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = load_image(bytes(data), SIZE)
        except ImageError as exc:
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
        else:
            assert img.mode == "RGB" and img.size == (SIZE, SIZE)
    assert set(reasons) <= {"decode_error", "not_an_image", "too_many_pixels"} and sum(reasons.values()) > 100
