"""The scorer against a real S3 server (moto, tests/s3server.py): a model, pair tables, images and the
outputs all in a bucket.

The model and images are test_score.py's (`data`); Ray runs are the session's in-process `ray_local`,
plus one `itsim score` subprocess. Scores are compared with the in-process Scorer on the local files.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from itsim import storage
from itsim.cli import main as cli_main
from itsim.errors import UserError
from itsim.storage_errors import StorageError
from itsim.model import load_model
from itsim.score import Scorer
from itsim.score.ray_job import ScoreConfig, run_score, user_errors_from_ray
from itsim.score.read import READ_ERROR, ScoreInputs, expand_inputs
from test_score import MAX_PIXELS, ROOT, data, shards  # noqa: F401 - the module fixtures, reused

N_ROWS = 40


def _upload_model(data: dict, s3) -> str:
    url = s3.url("run/model")
    storage.upload_tree(str(data["model"]), url, s3.options)
    return url


def _scorer(model: str | Path, **kw) -> Scorer:
    return Scorer.from_dir(model, device="cpu", max_pixels=MAX_PIXELS, batch_size=16, **kw)


def _pairs_in_bucket(data: dict, s3) -> pd.DataFrame:
    """Rows whose images are absolute local paths or s3 URLs (every third), one URL naming no object;
    the images those URLs name uploaded. Returned with a `local` column: each row's image as a file."""
    df = data["df"].iloc[:N_ROWS][["image", "caption", "pair_id"]].reset_index(drop=True)
    df = df[~df["image"].str.contains(r"\.\.|nope|big")].reset_index(drop=True)  # good names only
    local, shown = [], []
    for i, name in enumerate(df["image"]):
        path = str(data["images"] / name)
        local.append(path)
        if i % 3 == 0:
            url = s3.url(f"images/{name}")
            storage.upload_file(path, url, s3.options)
            shown.append(url)
        else:
            shown.append(path)
    df["image"], df["local"] = shown, local
    df.loc[len(df)] = {"image": s3.url("images/never-uploaded.jpg"), "caption": "A dog.", "pair_id": 9999,
                       "local": str(data["images"] / "never-uploaded.jpg")}
    return df


def test_names_under_an_images_url_score_as_under_the_folder_and_cannot_leave_it(data, s3):
    """`images_root` a URL (`--images s3://b/images`): table names resolve under it, the same numbers as
    under the local folder; `..`, absolute names and URLs are `path_escape`, a missing object `missing`."""
    names = [f"sub/img{i:03d}.jpg" for i in range(4)]
    for name in names:
        storage.upload_file(str(data["images"] / name), s3.url(f"images/{name}"), s3.options)
    captions = [data["df"]["caption"][i] for i in range(4)]
    local = _scorer(data["model"], images_root=data["images"]).score(names, captions)
    remote = _scorer(data["model"], images_root=s3.url("images"), storage_options=s3.options)
    assert np.array_equal(remote.score(names, captions), local) and not np.isnan(local).any()
    bad = ["../outside.jpg", "/etc/passwd", s3.url("images/sub/img000.jpg"), "sub/nope.jpg"]
    assert remote.prepare(bad, ["A dog."] * 4).errors == ["path_escape", "path_escape", "path_escape", "missing"]


def _read_parts(url: str, options: dict) -> pd.DataFrame:
    parts = storage.glob(storage.join(url, "*.parquet"), options)
    assert parts, f"no parts under {url}"
    return pd.concat([pq.read_table(io.BytesIO(storage.read_bytes(p, options))).to_pandas() for p in parts])


def test_scorer_from_a_model_url_gives_the_local_scores_exactly(data, s3):
    """`Scorer.from_dir(s3://...)` loads the same weights: the same numbers, bit for bit; images may be URLs
    (a missing object is the row's `missing`); a model prefix without its files is refused by name."""
    url = _upload_model(data, s3)
    df = _pairs_in_bucket(data, s3)
    local = _scorer(data["model"]).score(list(df["local"]), list(df["caption"]))
    remote = _scorer(url, storage_options=s3.options)
    got = remote.score(list(df["image"]), list(df["caption"]))
    assert np.isnan(got[-1]) and np.isnan(local[-1]) and not np.isnan(got[:-1]).any()
    assert np.array_equal(got[:-1], local[:-1])
    assert remote.prepare(list(df["image"][-1:]), ["A dog."]).errors == ["missing"]
    with pytest.raises(UserError, match=r"^s3://itsim-test-\d+/run is not an itsim model directory \(missing "
                                        r"model.safetensors, config.json, vocab.json\)$"):
        load_model(s3.url("run"), "cpu", s3.options)


@pytest.mark.timeout(300)
def test_ray_score_parquet_in_the_bucket_into_the_bucket_accounts_for_every_row(data, s3, ray_local):
    """`itsim score --model s3://.. --input 's3://b/pairs/*.parquet' --output s3://b/scores/` on the session's
    Ray: credentials only in the storage options (the Ray workers were started without them), every
    input row once in the stored parts, the missing image an error row, the scores the in-process
    Scorer's; `_summary.json` (written last) counts them; no option is saved in `_config.yaml`."""
    df = _pairs_in_bucket(data, s3)
    for i, part in enumerate((df.iloc[:15], df.iloc[15:])):
        buf = io.BytesIO()
        part.drop(columns="local").to_parquet(buf, index=False, row_group_size=8)
        storage.write_bytes(s3.url(f"pairs/part-{i}.parquet"), buf.getvalue(), s3.options)
    options = {**s3.options, "key": "itsim-test-key", "secret": "itsim-test-secret"}
    cfg = ScoreConfig(model=_upload_model(data, s3), input=(s3.url("pairs/*.parquet"),), output=s3.url("scores/"),
                      max_pixels=MAX_PIXELS, batch_size=8, workers=1, storage_options=options)
    summary = run_score(cfg)

    out = _read_parts(s3.url("scores"), s3.options).sort_values("row_id").reset_index(drop=True)
    assert len(out) == len(df) == summary["rows"] and out["row_id"].is_unique
    assert set(out["row_id"]) == {r for r in range(15)} | {(1 << 32) + r for r in range(len(df) - 15)}
    assert list(out["pair_id"]) == list(df["pair_id"]) and list(out["image"]) == list(df["image"])
    assert out["error"].tolist().count("missing") == 1 and out["error"].isna().sum() == len(df) - 1
    assert summary["scored"] == len(df) - 1 and summary["errors"] == {"missing": 1}
    want = _scorer(data["model"]).score(list(df["local"]), list(df["caption"]))
    np.testing.assert_allclose(out["score"].to_numpy(dtype=np.float64)[:-1], want[:-1], atol=1e-5, rtol=0)
    stored = json.loads(storage.read_text(s3.url("scores/_summary.json"), s3.options))
    assert stored["rows"] == len(df) and stored["output"] == s3.url("scores")
    saved = yaml.safe_load(storage.read_text(s3.url("scores/_config.yaml"), s3.options))
    assert "storage_options" not in saved and "itsim-test-secret" not in json.dumps(saved)
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.name, Prefix="scores/")["Contents"]]
    assert all(k.endswith(".parquet") for k in keys if k not in ("scores/_summary.json", "scores/_config.yaml"))

    with pytest.raises(UserError, match="is not empty; pass --overwrite"):
        run_score(cfg)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_topk_from_the_bucket_writes_its_tables_and_errors_there(data, s3, ray_local):
    df = _pairs_in_bucket(data, s3).drop(columns="local")
    storage.write_text(s3.url("pairs.csv"), df.to_csv(index=False), s3.options)
    options = {**s3.options, "key": "itsim-test-key", "secret": "itsim-test-secret"}
    summary = run_score(ScoreConfig(model=_upload_model(data, s3), input=(s3.url("pairs.csv"),),
                                    output=s3.url("topk"), mode="topk", k=2, workers=1, batch_size=8,
                                    max_pixels=MAX_PIXELS, storage_options=options))
    images = df["image"].nunique() - 1
    assert summary["errors"] == {"image/missing": 1} and summary["images"] == images
    for name, rows in (("image_topk", 2 * images), ("caption_topk", 2 * df["caption"].nunique())):
        assert len(_read_parts(s3.url(f"topk/{name}"), s3.options)) == rows
    errors = pq.read_table(io.BytesIO(storage.read_bytes(s3.url("topk/topk_errors.parquet"), s3.options)))
    assert errors.column("reason").to_pylist() == ["missing"]


def _rows(source: ScoreInputs) -> pa.Table:
    return pa.concat_tables([t for read, _, _ in source.read_plan() for t in read()]).drop_columns(["shard"])


def test_a_shard_folder_in_the_bucket_reads_as_the_local_one_and_a_deleted_shard_is_recorded(data, shards, s3):
    """Shards listed from the bucket's manifest stream the same rows as the local folder's; a shard deleted
    between listing and reading is one `bad_shard` row, as a cut local shard is (read tasks run here)."""
    folder, _ = shards
    storage.upload_tree(str(folder), s3.url("shards"), s3.options)
    files = expand_inputs([s3.url("shards")], "test", s3.options)
    assert files == [s3.url("shards/test-000000.tar"), s3.url("shards/test-000001.tar")]
    local = _rows(ScoreInputs(expand_inputs([str(folder)], "test"), "shards", 4))
    assert _rows(ScoreInputs(files, "shards", 4, options=s3.options)).equals(local)
    source = ScoreInputs(files, "shards", 4, options=s3.options)
    source.read_plan()  # planned (sizes read) before the shard goes
    storage.delete(files[1], s3.options)
    rows = _rows(source)
    assert rows.column(READ_ERROR).to_pylist().count("bad_shard") == 1
    first_shard = local.filter(pc.less(local.column("row_id"), 1 << 32))  # file index 0
    assert rows.num_rows == first_shard.num_rows + 1 and rows.slice(0, first_shard.num_rows).equals(first_shard)


def test_a_store_error_inside_a_ray_data_task_reaches_the_user_as_its_own_line(s3, ray_local):
    """Ray wraps a task's exception in a RayTaskError whose text is the remote traceback; the job unwraps
    the StorageError so the CLI prints its one line (here a Ray Data map reading from a missing bucket)."""
    url = "s3://itsim-no-such-bucket/x.jpg"
    options = storage.portable_options({**s3.options, "key": "itsim-test-key", "secret": "itsim-test-secret"})
    with pytest.raises(StorageError) as err, user_errors_from_ray():
        ray_local.data.from_items([{"url": url}]).map(
            lambda row: {"n": len(storage.read_bytes(row["url"], options))}).take_all()
    assert str(err.value) == f"{url}: bucket 'itsim-no-such-bucket' does not exist" and err.value.reason == "no_bucket"


def _one_line_error(code: int, err: str, url: str) -> str:
    """Exit 2, no traceback, one `itsim score: error:` line naming `url` (and nothing after it)."""
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert [n for n in lines if n.startswith("itsim ")] == lines[-1:] == [lines[-1]], err
    assert lines[-1].startswith("itsim score: error: ") and url in lines[-1], lines[-1]
    return lines[-1]


def test_cli_missing_bucket_is_one_line_naming_the_url(data, s3, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ITSIM_STORAGE_OPTIONS", json.dumps(s3.options))
    model = _upload_model(data, s3)
    storage.write_text(s3.url("pairs.csv"), "image,caption\na.jpg,A dog.\n", s3.options)
    for args, url in ((["--input", s3.url("pairs.csv"), "--output", "s3://itsim-no-such-bucket/scores"],
                       "s3://itsim-no-such-bucket/scores"),
                      (["--input", "s3://itsim-no-such-bucket/p.csv", "--output", str(tmp_path / "o")],
                       "s3://itsim-no-such-bucket/p.csv")):
        code = cli_main(["score", "--model", model, *args])
        line = _one_line_error(code, capsys.readouterr().err, url)
        assert line.endswith("bucket 'itsim-no-such-bucket' does not exist"), line
    assert not (tmp_path / "o").exists() and not Path("s3:").exists()


@pytest.mark.timeout(120)
def test_cli_wrong_credentials_is_one_line_without_the_secret(data, s3, tmp_path):
    """A real `itsim score` process, refused by the server: exit 2, one line naming the URL, no secret."""
    model = _upload_model(data, s3)
    s3.server.require_auth(True)  # the dummy key is now unknown to the server
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ITSIM_STORAGE_OPTIONS": json.dumps(s3.options),
           "AWS_SECRET_ACCESS_KEY": "S3cretThatMustNotShow/0123456789"}
    proc = subprocess.run([sys.executable, "-m", "itsim.cli", "score", "--model", model, "--input",
                           s3.url("pairs.csv"), "--output", s3.url("scores")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=110)
    line = _one_line_error(proc.returncode, proc.stderr, model)
    assert "access denied" in line and "S3cretThatMustNotShow" not in proc.stderr + proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_scores_a_parquet_glob_in_the_bucket_into_the_bucket(data, s3, tmp_path):
    """The command as a user types it, in its own process with its own Ray: `--storage-options` on the
    command line (the endpoint), credentials from the environment; every row in the stored output."""
    df = _pairs_in_bucket(data, s3).drop(columns="local")
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    storage.write_bytes(s3.url("pairs/all.parquet"), buf.getvalue(), s3.options)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "itsim.cli", "score", "--model", _upload_model(data, s3),
                           "--input", s3.url("pairs/*.parquet"), "--output", s3.url("scores/"),
                           "--storage-options", json.dumps(s3.options), "--max-pixels", str(MAX_PIXELS),
                           "--batch-size", "16"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(df)} rows in, {len(df) - 1} scored, errors: missing=1" in proc.stdout
    out = _read_parts(s3.url("scores"), s3.options)
    assert len(out) == len(df) and out["row_id"].is_unique and out["error"].tolist().count("missing") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written locally (no `s3:` folder)
