"""itsim.storage against a real S3-compatible server (moto on 127.0.0.1) and the local filesystem."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from itsim import config, storage, storage_stream
from itsim.errors import UserError
from itsim.storage import NotFound, StorageError
from s3server import CutProxy

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
# One attempt per botocore call (s3fs still retries 5 times within ~2 s), so a fault test fails in seconds.
FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}}


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    return text


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# --- paths and URLs --------------------------------------------------------------------------------

def test_paths_urls_and_refusals(tmp_path):
    assert storage.is_url("s3://b/k") and storage.is_url("file:///tmp/x")
    assert not storage.is_url("data/shards") and not storage.is_url(Path("/tmp"))
    assert storage.join("s3://b/shards/", "train-000000.tar") == "s3://b/shards/train-000000.tar"
    assert storage.join(str(tmp_path), "a", "b.json") == str(tmp_path / "a" / "b.json")
    loc = storage.resolve(f"file://{tmp_path}/x.json")
    assert (loc.fs, loc.protocol, loc.path) == (None, "", f"{tmp_path}/x.json")
    assert storage.resolve("relative/dir").path == "relative/dir"

    cases = {
        "s3:/bucket/shards": "s3:/bucket/shards: looks like a URL that lost a '/' (passed through pathlib.Path?)",
        "ftp://host/x": "ftp://host/x: unsupported storage URL (supported: a local path, file://, s3://, s3a://, "
                        "gs://, gcs:// with a bucket)",
        "s3://": "s3://: unsupported storage URL (supported: a local path, file://, s3://, s3a://, gs://, gcs:// "
                 "with a bucket)",
        "simplecache::s3://b/x": "simplecache::s3://b/x: unsupported storage URL (supported: a local path, file://, "
                                 "s3://, s3a://, gs://, gcs:// with a bucket)",
    }
    for url, message in cases.items():
        with pytest.raises(StorageError) as err:
            storage.write_bytes(url, b"x")
        assert _one_line(err.value) == message and isinstance(err.value, UserError)
    for bad in ("../up", "/abs", "a/../../b", "s3://other/x", ""):
        with pytest.raises(StorageError, match="unsafe name"):
            storage.join("s3://b/shards", bad)
    assert not list(tmp_path.iterdir()) and not Path("s3:").exists()


def test_local_paths_keep_working(tmp_path):
    for base in (str(tmp_path / "out"), f"file://{tmp_path}/out2"):
        url = storage.join(base, "sub", "a.json")
        assert not storage.exists(url)
        storage.write_text(url, '{"a": 1}')
        assert storage.read_text(url) == '{"a": 1}' and storage.size_of(url) == 8
        assert storage_stream.sha256_of(url) == hashlib.sha256(b'{"a": 1}').hexdigest()
        assert [os.path.basename(p) for p in storage.ls(storage.join(base, "sub"))] == ["a.json"]
        assert storage.glob(storage.join(base, "sub", "*.json")) == [storage.resolve(url).path]
        with pytest.raises(NotFound) as err:
            storage.read_bytes(storage.join(base, "nope"))
        assert isinstance(err.value, FileNotFoundError)
        storage.delete(url)
        storage.delete(url)  # gone already: not an error
        assert not storage.exists(url) and storage.ls(storage.join(base, "missing")) == []
    assert sorted(p.name for p in (tmp_path / "out" / "sub").iterdir()) == []  # no temp files left


def test_local_write_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "manifest.json"
    storage.write_text(str(target), "old")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with storage.atomic_local(str(target)) as f:
            f.write(b"new but half")
            raise Boom
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


# --- S3: round trips -------------------------------------------------------------------------------

def test_s3_round_trip(s3, tmp_path):
    opts = s3.options
    url = s3.url("shards/manifest.json")
    assert not storage.exists(url, opts)
    storage.write_text(url, '{"splits": {}}', opts)
    assert storage.exists(url, opts) and storage.read_text(url, opts) == '{"splits": {}}'
    assert storage.size_of(url, opts) == 14

    local = tmp_path / "train-000000.tar"
    data = _payload(3 * MiB + 17)
    local.write_bytes(data)
    tar_url = s3.url("shards/train-000000.tar")
    storage.upload_file(str(local), tar_url, opts)
    assert storage_stream.sha256_of(tar_url, opts) == hashlib.sha256(data).hexdigest()
    assert storage.size_of(tar_url, opts) == len(data)
    storage_stream.download(tar_url, str(tmp_path / "back.tar"), opts)
    assert (tmp_path / "back.tar").read_bytes() == data

    storage.write_bytes(s3.url("shards/ckpt/step_0000010/trainer_state.json"), b"{}", opts)
    assert storage.ls(s3.url("shards"), opts) == [s3.url("shards/ckpt"), s3.url("shards/manifest.json"),
                                                  s3.url("shards/train-000000.tar")]
    assert storage.glob(s3.url("shards/*.tar"), opts) == [tar_url]
    assert storage.ls(s3.url("nothing/here"), opts) == []
    s3.client().put_object(Bucket=s3.name, Key="scores/", Body=b"")  # a folder marker (pyarrow's create_dir)
    assert storage.ls(s3.url("scores"), opts) == []
    s3.client().delete_object(Bucket=s3.name, Key="scores/")
    assert s3.client().list_objects_v2(Bucket=s3.name)["KeyCount"] == 3  # no stray temp objects

    storage.delete(s3.url("shards/ckpt"), opts, recursive=True)
    storage.delete(url, opts)
    storage.delete(url, opts)
    assert storage.ls(s3.url("shards"), opts) == [tar_url]


def test_s3_listing_sees_other_writers(s3):
    """Listing caches are off: what another process wrote since this one listed is seen at once."""
    opts = s3.options
    storage.write_bytes(s3.url("run/checkpoints/step_0000005/trainer_state.json"), b"{}", opts)
    assert storage.ls(s3.url("run/checkpoints"), opts) == [s3.url("run/checkpoints/step_0000005")]
    assert not storage.exists(s3.url("run/checkpoints/step_0000010/trainer_state.json"), opts)
    s3.client().put_object(Bucket=s3.name, Key="run/checkpoints/step_0000010/trainer_state.json", Body=b"{}")
    assert storage.ls(s3.url("run/checkpoints"), opts) == [s3.url("run/checkpoints/step_0000005"),
                                                           s3.url("run/checkpoints/step_0000010")]
    assert storage.exists(s3.url("run/checkpoints/step_0000010/trainer_state.json"), opts)


def test_storage_options_from_environment(s3, monkeypatch):
    monkeypatch.setenv(storage.ENV_OPTIONS, json.dumps({"s3": {"endpoint_url": s3.server.endpoint}}))
    storage.write_bytes(s3.url("env.txt"), b"via env")
    assert storage.read_bytes(s3.url("env.txt")) == b"via env"
    assert storage.options_for("s3a", {"endpoint_url": "http://x", "gs": {"project": "p"}}) == {
        "use_listings_cache": False, "endpoint_url": "http://x"}
    monkeypatch.setenv(storage.ENV_OPTIONS, "{not json, secret-ish}")
    with pytest.raises(StorageError) as err:
        storage.read_bytes(s3.url("env.txt"))
    assert _one_line(err.value) == "ITSIM_STORAGE_OPTIONS must be a JSON object"


# --- S3: errors ------------------------------------------------------------------------------------

def test_missing_bucket_and_object(s3):
    opts = s3.options
    url = "s3://itsim-no-such-bucket/shards/manifest.json"
    for call in (storage.read_bytes, storage.exists, storage.ls, storage.size_of, storage_stream.open_input,
                 lambda u, o: storage.write_bytes(u, b"x", o)):
        with pytest.raises(StorageError) as err:
            call(url, opts)
        assert _one_line(err.value) == f"{url}: bucket 'itsim-no-such-bucket' does not exist"
        assert err.value.reason == "no_bucket" and not isinstance(err.value, OSError)  # never "just missing"
    with pytest.raises(NotFound) as err:
        storage.read_bytes(s3.url("nope.tar"), opts)
    assert _one_line(err.value) == f"{s3.url('nope.tar')}: not found" and isinstance(err.value, FileNotFoundError)


def test_wrong_credentials_one_line_no_secret(s3, monkeypatch):
    """moto checks credentials once IAM auth is on: a real user, a right and two wrong credential sets."""
    import boto3

    iam = boto3.client("iam", endpoint_url=s3.server.endpoint)
    iam.create_user(UserName="itsim")
    iam.put_user_policy(UserName="itsim", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="itsim")["AccessKey"]
    url = s3.url("data/results.csv")
    s3.client().put_object(Bucket=s3.name, Key="data/results.csv", Body=b"image,caption\n")
    s3.server.require_auth(True)

    good = {**s3.options, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    assert storage.read_bytes(url, good) == b"image,caption\n"  # the server accepts real credentials...
    wrong_secret = {**good, "secret": "Wr0ngSecretValue/abcdefghijklmnopqrstuv"}
    unknown_key = {**s3.options, "key": "AKIAIOSFODNN7EXAMPLE", "secret": "AnotherSecretValue123"}
    for opts in (wrong_secret, unknown_key):  # ... and refuses wrong ones, on every kind of call
        for call in (storage.read_bytes, storage.exists, storage.ls, lambda u, o: storage.write_bytes(u, b"x", o)):
            with pytest.raises(StorageError) as err:
                call(url, opts)
            text = _one_line(err.value)
            assert text.startswith(f"{url}: access denied (") and err.value.reason == "denied", text
            assert text.endswith("check the store's credentials (environment, config files, instance role) "
                                 "and permissions")
            for secret in (opts["secret"], opts["key"], key["SecretAccessKey"]):
                assert secret not in text
    # credentials from the environment, as a user would have them
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "EnvWrongSecret/0123456789abcdefghijkl")
    with pytest.raises(StorageError) as err:
        storage.read_bytes(url, {**s3.options, "skip_instance_cache": True})
    assert _one_line(err.value).startswith(f"{url}: access denied (") and err.value.reason == "denied"
    assert "EnvWrongSecret" not in str(err.value) and key["AccessKeyId"] not in str(err.value)


def test_scrub_hides_credentials():
    text = ("key=AKIAIOSFODNN7EXAMPLE secret: 'abc/def+ghi' X-Amz-Signature=deadbeef&x=1 "
            "http://user:pa55@host/x aws_session_token=FQoGZXIvYXdz endpoint http://127.0.0.1:9000")
    out = storage.scrub(text, {"endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"token": "opt-val"}})
    for secret in ("AKIAIOSFODNN7EXAMPLE", "abc/def+ghi", "deadbeef", "pa55", "FQoGZXIvYXdz"):
        assert secret not in out
    assert "http://127.0.0.1:9000" in out  # an endpoint is not a secret
    assert storage.scrub("failed with opt-val inside", {"client_kwargs": {"token": "opt-val"}}) == \
        "failed with *** inside"


def test_unreachable_store_is_one_line(s3):
    proxy = CutProxy(s3.server.port)
    opts = {**FAST_FAIL, "endpoint_url": proxy.endpoint}
    storage.write_bytes(s3.url("x"), b"1", opts)
    proxy.down()
    with pytest.raises(StorageError) as err:
        storage.read_bytes(s3.url("x"), opts)
    text = _one_line(err.value)
    assert text.startswith(f"{s3.url('x')}: store not reachable or failing (") and err.value.transient


def test_upload_cut_midway_leaves_nothing_visible_and_rerun_completes(s3, tmp_path):
    """The connection dies while part 2 of a multipart upload is on the wire (a server going away):
    a clear error, no object under the key (only an invisible pending upload), and a re-run completes."""
    proxy = CutProxy(s3.server.port)
    opts = {**FAST_FAIL, "endpoint_url": proxy.endpoint}
    data = _payload(12 * MiB, seed=1)
    local = tmp_path / "train-000003.tar"
    local.write_bytes(data)
    url = s3.url("shards/train-000003.tar")
    proxy.cut_after(upstream=7 * MiB)  # part 1 (5 MiB) arrives, part 2 is cut
    with pytest.raises(StorageError) as err:
        storage.upload_file(str(local), url, opts, chunk_size=5 * MiB)
    assert _one_line(err.value).startswith(f"{url}: store not reachable or failing (")
    direct = s3.options
    assert not storage.exists(url, direct) and storage.ls(s3.url("shards"), direct) == []
    assert len(s3.client().list_multipart_uploads(Bucket=s3.name).get("Uploads", [])) == 1  # it was midway
    proxy.up()
    storage.upload_file(str(local), url, opts, chunk_size=5 * MiB)
    assert storage.size_of(url, direct) == len(data)
    assert storage_stream.sha256_of(url, direct) == hashlib.sha256(data).hexdigest()


def test_put_cut_midway_leaves_old_content(s3):
    proxy = CutProxy(s3.server.port)
    opts = {**FAST_FAIL, "endpoint_url": proxy.endpoint}
    url = s3.url("shards/manifest.json")
    storage.write_bytes(url, b"old manifest", opts)
    proxy.cut_after(upstream=1 * MiB)
    with pytest.raises(StorageError):
        storage.write_bytes(url, _payload(3 * MiB), opts)
    assert storage.read_bytes(url, s3.options) == b"old manifest"


def test_missing_library_is_one_clear_line(tmp_path):
    code = ("import sys; sys.modules['s3fs'] = None\n"
            "from itsim import storage\n"
            "try:\n    storage.read_bytes('s3://bucket/shards/manifest.json')\n"
            "except storage.StorageError as e:\n    print(e.reason, '|', e)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == ("missing_library | s3://bucket/shards/manifest.json: s3:// needs s3fs, which is "
                                  "not installed: pip install 'itsim[s3]'"), out.stderr


# --- streaming reads -------------------------------------------------------------------------------

def _webdataset_tar(path: Path, n: int) -> dict[str, dict[str, bytes]]:
    import webdataset as wds

    samples = {}
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            sample = {"__key__": f"img{i:04d}", "jpg": _payload(40_000 + i, seed=i),
                      "json": json.dumps({"image": f"img{i}.jpg"}).encode(),
                      "ids.npy": _payload(64, seed=1000 + i), "lengths.npy": _payload(8, seed=2000 + i)}
            sink.write(sample)
            samples[sample["__key__"]] = sample
    return samples


def _read_shard(url: str, opts: dict, **kw) -> tuple[dict[str, dict[str, bytes]], list[Exception]]:
    """The loader's own tar reading (`itsim.data.loader`) fed by storage_stream.open_input."""
    from webdataset.tariterators import group_by_keys

    from itsim.data.source import _tar_files

    problems: list[Exception] = []

    def handler(exc: Exception) -> bool:
        problems.append(exc)
        return True

    sources = iter([{"url": url, "stream": storage_stream.open_input(url, opts, **kw)}])
    got = {s["__key__"]: s for s in group_by_keys(_tar_files(sources, handler), handler=handler)}
    return got, problems


def test_open_input_streams_a_webdataset_shard(s3, tmp_path):
    samples = _webdataset_tar(tmp_path / "train-000000.tar", 60)
    url = s3.url("shards/train-000000.tar")
    storage.upload_file(str(tmp_path / "train-000000.tar"), url, s3.options)
    got, problems = _read_shard(url, s3.options, block_size=1 * MiB)
    assert problems == [] and sorted(got) == sorted(samples)
    for key, sample in samples.items():
        assert all(got[key][ext] == sample[ext] for ext in ("jpg", "json", "ids.npy", "lengths.npy"))


def test_open_input_seeks_for_parquet(s3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": [f"img{i}.jpg" for i in range(5000)], "caption": ["a dog runs"] * 5000})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, row_group_size=1000)
    url = s3.url("pairs/part-0.parquet")
    storage.write_bytes(url, buf.getvalue().to_pybytes(), s3.options)
    with storage_stream.open_input(url, s3.options, block_size=64 * 1024) as f:
        parquet = pq.ParquetFile(f)
        assert parquet.metadata.num_row_groups == 5
        assert parquet.read_row_group(3).column("image")[0].as_py() == "img3000.jpg"
        assert f.seek(-4, io.SEEK_END) == len(buf.getvalue()) - 4 and f.read() == b"PAR1"


def test_open_input_retries_through_an_outage(s3, caplog):
    """The connection drops mid-object and the store is down for a second: the read resumes where it was."""
    data = _payload(5 * MiB, seed=7)
    url = s3.url("shards/val-000000.tar")
    storage.write_bytes(url, data, s3.options)
    proxy = CutProxy(s3.server.port)
    opts = {**FAST_FAIL, "endpoint_url": proxy.endpoint}
    with storage_stream.open_input(url, opts, retries=4, wait=0.5, block_size=1 * MiB) as f:
        head = f.read(1 * MiB)
        proxy.cut_after(downstream=int(1.5 * MiB))
        timer = threading.Timer(1.5, proxy.up)
        timer.start()
        with caplog.at_level(logging.WARNING, logger="itsim.storage"):
            rest = f.read()
        timer.join()
    assert head + rest == data
    assert any("retry 1 of 4" in r.getMessage() for r in caplog.records)


def test_open_input_gives_up_naming_the_object(s3):
    data = _payload(4 * MiB, seed=8)
    url = s3.url("shards/test-000000.tar")
    storage.write_bytes(url, data, s3.options)
    proxy = CutProxy(s3.server.port)
    opts = {**FAST_FAIL, "endpoint_url": proxy.endpoint}
    with storage_stream.open_input(url, opts, retries=2, wait=0.1, block_size=1 * MiB) as f:
        f.read(1 * MiB)
        proxy.down()
        with pytest.raises(StorageError) as err:
            f.read()
    text = _one_line(err.value)
    assert text.startswith(f"{url}: store not reachable or failing (") and text.endswith("(gave up after 2 retries)")


def test_object_deleted_while_reading(s3, tmp_path):
    """A shard removed between listing and reading: NotFound naming it, which the loader's handler records."""
    _webdataset_tar(tmp_path / "t.tar", 80)
    url = s3.url("shards/train-000001.tar")
    storage.upload_file(str(tmp_path / "t.tar"), url, s3.options)
    with storage_stream.open_input(url, s3.options, block_size=1 * MiB) as f:
        f.read(1 * MiB)
        s3.client().delete_object(Bucket=s3.name, Key="shards/train-000001.tar")
        with pytest.raises(NotFound) as err:
            f.read()
    assert _one_line(err.value) == f"{url}: not found"
    with pytest.raises(NotFound):
        storage_stream.open_input(url, s3.options)


def _fork_worker_read(args):
    url, opts = args
    return hashlib.sha256(storage.read_bytes(url, opts)).hexdigest(), storage_stream.sha256_of(url, opts)


def test_reads_after_fork(s3):
    """DataLoader workers are forked after the parent used the store: each resolves its own filesystem."""
    import multiprocessing

    url = s3.url("shards/train-000002.tar")
    data = _payload(2 * MiB, seed=3)
    storage.write_bytes(url, data, s3.options)
    assert storage.read_bytes(url, s3.options) == data  # the parent's cached filesystem and event loop exist
    digest = hashlib.sha256(data).hexdigest()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_fork_worker_read, [(url, s3.options)] * 4) == [(digest, digest)] * 4


# --- config: secret fields -------------------------------------------------------------------------

@dataclasses.dataclass
class _Cfg:
    out: str = dataclasses.field(default="", metadata={"help": "output"})
    storage_options: dict | None = config.secret_field(None, "JSON object of store settings")


def test_config_never_saves_or_prints_secret_fields(tmp_path):
    secret = {"endpoint_url": "http://127.0.0.1:9", "key": "AKIAIOSFODNN7EXAMPLE", "secret": "s3cr3t-value"}
    cfg = config.build(_Cfg, {"out": "s3://b/run"}, {"storage_options": json.dumps(secret)})
    assert cfg.storage_options == secret
    assert config.build(_Cfg, {"storage_options": secret}).storage_options == secret  # a mapping in YAML
    assert config.to_dict(cfg) == {"out": "s3://b/run"}
    assert config.describe(cfg) == "_Cfg:\n  out: s3://b/run\n  storage_options: <set, not shown>"
    assert config.describe(_Cfg()) == "_Cfg:\n  out: \n  storage_options: None"
    config.save(cfg, tmp_path / "config.yaml")
    saved = (tmp_path / "config.yaml").read_text()
    assert yaml.safe_load(saved) == {"out": "s3://b/run"}
    for text in (saved, repr(cfg), config.describe(cfg)):
        assert "s3cr3t-value" not in text and "AKIAIOSFODNN7EXAMPLE" not in text
    with pytest.raises(ValueError) as err:
        config.build(_Cfg, None, {"storage_options": '{"secret": s3cr3t-value'})
    assert str(err.value) == "option storage_options: not a JSON object (Expecting value at character 11)"
    with pytest.raises(ValueError, match="^option storage_options: not a JSON object$"):
        config.build(_Cfg, None, {"storage_options": "[1, 2]"})


@pytest.mark.parametrize("remote", [False, True])
def test_trees_upload_with_state_last_and_download_whole(remote, request, tmp_path):
    base = request.getfixturevalue("s3").url("run") if remote else str(tmp_path / "store")
    opts = request.getfixturevalue("s3").options if remote else None
    src = tmp_path / "src"
    (src / "ckpt" / "model").mkdir(parents=True)
    (src / "ckpt" / "model" / "w.bin").write_bytes(b"\x00" * 1000)
    (src / "ckpt" / "state.json").write_text("{}")
    (src / "ckpt" / "z.txt").write_text("z")
    order = storage.upload_tree(str(src), base, opts, last=("ckpt/state.json",))
    assert order == ["ckpt/model/w.bin", "ckpt/z.txt", "ckpt/state.json"]
    assert storage.files_under(base, opts) == ["ckpt/model/w.bin", "ckpt/state.json", "ckpt/z.txt"]
    assert storage.files_under(storage.join(base, "ckpt", "model"), opts) == ["w.bin"]
    assert storage.files_under(storage.join(base, "nothing"), opts) == []
    out = storage_stream.download_tree(storage.join(base, "ckpt"), str(tmp_path / "down"), opts)
    assert (Path(out) / "model" / "w.bin").read_bytes() == b"\x00" * 1000
    assert (Path(out) / "state.json").read_text() == "{}"


def test_require_local_refuses_urls_and_unwraps_file_urls():
    with pytest.raises(StorageError, match="--out: s3://b/x: this takes a local path"):
        storage.require_local("s3://b/x", "--out")
    assert storage.require_local("file:///tmp/x", "--out") == "/tmp/x"
    assert storage.require_local("runs/x", "--out") == "runs/x"
    with pytest.raises(StorageError, match="lost a '/'"):
        storage.require_local("s3:/b/x", "--out")
