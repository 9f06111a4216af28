"""`itsim eval` against a real S3 server (moto, tests/s3server.py): the model, the shards, a labelled pair file
and its images read from a bucket, the outputs written to it. The shards and model are test_evaluate.py's (`run`)."""
from __future__ import annotations

import json

import pytest

from itsim import storage
from itsim.cli import main as cli_main
from itsim.eval.evaluate import EvalConfig, evaluate
from test_evaluate import run  # noqa: F401 - the module fixture, reused

PAIRS = ["image\tcaption\tlabel", "img09.jpg\ta red circle on grey\tmatch", "img09.jpg\ta blue square\tno-match",
         "img10.jpg\tsquare coloured green\tmatch", "img11.jpg\ta red circle\tno-match", "missing.jpg\ta dog\tmatch",
         "../outside.jpg\ta cat\tno-match"]
TIMINGS = ("encode_image_seconds", "encode_text_seconds", "retrieval_seconds", "retrieval_head_seconds")


def _comparable(metrics: dict) -> dict:
    """metrics.json without what differs by place and time: the model's and shards' locations, the timings."""
    return {k: v for k, v in metrics.items() if k not in ("model", "shards", *TIMINGS)}


def test_eval_model_shards_pairs_and_out_in_the_bucket_equal_a_local_eval(run, s3, tmp_path):
    """metrics.json written to the bucket equals the local eval's (same model, shards and pairs; the val
    split's threshold read from the bucket too), the report and the plots (the training curves from the
    run's metrics.jsonl in the bucket) beside it."""
    (tmp_path / "pairs.tsv").write_text("\n".join(PAIRS) + "\n")
    storage.upload_tree(str(run / "run"), s3.url("run"), s3.options)  # model/ and metrics.jsonl
    for name in ("img09.jpg", "img10.jpg", "img11.jpg"):
        storage.upload_file(str(run / "images" / name), s3.url(f"images/{name}"), s3.options)
    storage.upload_file(str(tmp_path / "pairs.tsv"), s3.url("pairs.tsv"), s3.options)
    storage.upload_tree(str(run / "shards"), s3.url("shards"), s3.options)
    common = {"split": "test", "batch_size": 2}
    local = evaluate(EvalConfig(model=str(run / "run" / "model"), shards=str(run / "shards"),
                                out=str(tmp_path / "local"), pairs=str(tmp_path / "pairs.tsv"),
                                images=str(run / "images"), **common))
    remote = evaluate(EvalConfig(model=s3.url("run/model"), shards=s3.url("shards"), out=s3.url("run/eval/"),
                                 pairs=s3.url("pairs.tsv"), images=s3.url("images"), storage_options=s3.options,
                                 **common))

    stored = json.loads(storage.read_text(s3.url("run/eval/metrics.json"), s3.options))
    assert stored["model"] == s3.url("run/model") and stored["shards"] == s3.url("shards")
    assert remote["out"] == s3.url("run/eval") and stored["threshold_source"] == "val"
    assert _comparable(stored) == _comparable(json.loads((tmp_path / "local" / "metrics.json").read_text()))
    assert stored["pairs_scored"] == 4 and stored["pairs_skipped_reasons"] == {"image_missing": 1,
                                                                                "image_path_escape": 1}
    assert stored["plots"] == ["roc.png", "score_hist.png", "training_curves.png"] == local["plots"]
    assert sorted(storage.files_under(s3.url("run/eval"), s3.options)) == sorted(
        p.name for p in (tmp_path / "local").iterdir())
    assert "storage_options" not in storage.read_text(s3.url("run/eval/eval_config.yaml"), s3.options)


def _error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and lines[-1].startswith("itsim eval: error: "), err
    return lines[-1]


@pytest.mark.parametrize("what", ["model", "out", "pairs"])
def test_eval_missing_bucket_or_object_is_one_line_naming_the_url(run, s3, what, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ITSIM_STORAGE_OPTIONS", json.dumps(s3.options))
    monkeypatch.chdir(tmp_path)
    storage.upload_tree(str(run / "run" / "model"), s3.url("model"), s3.options)
    url = s3.url("pairs.tsv") if what == "pairs" else f"s3://itsim-no-such-bucket/{what}"
    places = {"model": s3.url("model"), "out": s3.url("eval"), "pairs": None, what: url}
    pairs = ["--pairs", places["pairs"], "--images", s3.url("images")] if places["pairs"] else []
    code = cli_main(["eval", "--model", places["model"], "--shards", str(run / "shards"), "--out", places["out"],
                     *pairs])
    line = _error_line(code, capsys.readouterr().err)
    tail = ": not found" if what == "pairs" else ": bucket 'itsim-no-such-bucket' does not exist"
    assert line.startswith(f"itsim eval: error: {url}") and line.endswith(tail), line
    assert list(tmp_path.iterdir()) == []  # no local `s3:` folder, nothing staged left behind
    assert storage.files_under(s3.url("eval"), s3.options) == []  # a failed run uploads nothing


def test_eval_wrong_credentials_is_one_line_without_the_secret(run, s3, capsys):
    storage.upload_tree(str(run / "run" / "model"), s3.url("model"), s3.options)
    s3.server.require_auth(True)
    secret = "S3cretThatMustNotShow/0123456789"
    code = cli_main(["eval", "--model", s3.url("model"), "--shards", str(run / "shards"), "--out", s3.url("eval"),
                     "--storage-options", json.dumps({**s3.options, "key": "AKIAITSIMTESTKEY0001", "secret": secret})])
    err = capsys.readouterr().err
    line = _error_line(code, err)
    assert s3.url("eval") in line and "access denied" in line
    assert secret not in err and "AKIAITSIMTESTKEY0001" not in err
