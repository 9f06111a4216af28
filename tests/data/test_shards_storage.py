"""build-shards with a bucket (a real S3 server on 127.0.0.1: moto) as --out, --captions and --images;
pool workers that end with a SIGKILLed builder; commands that take only local paths refusing URLs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from itsim.cli import main as cli_main
from itsim.data.shards import build_shards
from itsim.errors import UserError
from test_shards import cfg_for, make_dataset, tar_hashes, write_captions

ROOT = Path(__file__).resolve().parents[2]
# One attempt per botocore call, short timeouts: a fault test fails in seconds, not minutes.
FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path, int]:
    return make_dataset(tmp_path_factory.mktemp("small"), 14)


def bucket_files(s3, prefix: str) -> dict[str, bytes]:
    """Every object below `prefix/`, name -> bytes, read with boto3 behind itsim's back."""
    client = s3.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.name, Prefix=prefix + "/")
            for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: client.get_object(Bucket=s3.name, Key=k)["Body"].read() for k in keys}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload_inputs(s3, captions: Path, images: Path, skip: tuple[str, ...] = ()) -> tuple[str, str]:
    client = s3.client()
    client.put_object(Bucket=s3.name, Key="in/results.csv", Body=captions.read_bytes())
    for path in sorted(images.iterdir()):
        if path.name not in skip:
            client.put_object(Bucket=s3.name, Key=f"in/images/{path.name}", Body=path.read_bytes())
    return s3.url("in/results.csv"), s3.url("in/images")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---- a bucket as --out ---------------------------------------------------------------------------

def test_bucket_holds_the_bytes_of_a_local_build_and_the_files_readers_need(small, tmp_path, s3):
    captions, images, n_rows = small
    local = build_shards(cfg_for(captions, images, tmp_path / "local"))
    # Two workers: each uploads its own shards, with the storage options the config passes on.
    stored = build_shards(cfg_for(captions, images, s3.url("shards/"), workers=2, storage_options=s3.options))

    files = bucket_files(s3, "shards")
    want = tar_hashes(tmp_path / "local")
    assert len(want) >= 3 and {n: sha(d) for n, d in files.items() if n.endswith(".tar")} == want
    for name in want:
        stats = json.loads(files[name.replace(".tar", "_stats.json")])
        assert stats["sha256"] == want[name] and stats["bytes"] == len(files[name])
        assert stats["etag"] == hashlib.md5(files[name]).hexdigest()  # one PUT: S3's ETag is the MD5
    names = {n for n in files if not n.endswith((".tar", "_stats.json"))}
    assert names == {p.name for p in (tmp_path / "local").iterdir() if not p.name.endswith((".tar", "_stats.json"))}
    assert {"manifest.json", "vocab.json", "failures.jsonl", "build_config.yaml", "train.wids.json"} <= names
    assert files["vocab.json"] == (tmp_path / "local" / "vocab.json").read_bytes()
    assert json.loads(files["manifest.json"]) == stored
    assert stored["config"]["out"] == s3.url("shards") and "storage_options" not in stored["config"]
    assert "endpoint_url" not in files["build_config.yaml"].decode()
    for key in ("splits", "rows", "failures", "vocab"):
        assert stored[key] == local[key]
    assert stored["rows"]["accounted"] == n_rows
    assert not Path("s3:").exists()

    # A repeat finds every shard complete (size and ETag as recorded) and writes nothing.
    again = build_shards(cfg_for(captions, images, s3.url("shards"), storage_options=s3.options))
    assert again["images_written_now"] == 0 and again["splits"] == stored["splits"]
    # A shard replaced by other bytes of the same size (its ETag changes) and one without its stats are
    # rewritten, and only they; a different config is refused before anything is touched.
    replaced, unvouched = sorted(want)[:2]
    client = s3.client()
    client.put_object(Bucket=s3.name, Key=f"shards/{replaced}", Body=files[replaced][::-1])
    client.delete_object(Bucket=s3.name, Key=f"shards/{unvouched.replace('.tar', '_stats.json')}")
    with pytest.raises(UserError, match="config differs in image_size"):
        build_shards(cfg_for(captions, images, s3.url("shards"), image_size=32, storage_options=s3.options))
    assert "manifest.json" in bucket_files(s3, "shards")
    repaired = build_shards(cfg_for(captions, images, s3.url("shards"), storage_options=s3.options))
    redo = sum(json.loads(files[n.replace(".tar", "_stats.json")])["images_planned"] for n in (replaced, unvouched))
    assert repaired["images_written_now"] == redo
    assert {n: sha(d) for n, d in bucket_files(s3, "shards").items() if n.endswith(".tar")} == want


def test_captions_and_images_from_the_bucket(small, tmp_path, s3):
    captions, images, n_rows = small
    # img003.jpg is named by the captions but not in the bucket: recorded as missing, as a missing file is.
    local_images = tmp_path / "images"
    local_images.mkdir()
    for path in images.iterdir():
        if path.name != "img003.jpg":
            (local_images / path.name).write_bytes(path.read_bytes())
    caption_url, image_url = upload_inputs(s3, captions, images, skip=("img003.jpg",))
    args = dict(max_failure_rate=0.5)
    local = build_shards(cfg_for(captions, local_images, tmp_path / "local", **args))
    code = cli_main(["build-shards", "--captions", caption_url, "--images", image_url + "/", "--out",
                     str(tmp_path / "from_bucket"), "--image-size", "48", "--shard-size", "4", "--workers", "2",
                     "--splits", "0.6,0.2,0.2", "--max-failure-rate", "0.5",
                     "--storage-options", json.dumps(s3.options)])
    assert code == 0
    remote = json.loads((tmp_path / "from_bucket" / "manifest.json").read_text())
    assert tar_hashes(tmp_path / "from_bucket") == tar_hashes(tmp_path / "local")
    failures = [json.loads(line) for line in (tmp_path / "from_bucket" / "failures.jsonl").read_text().splitlines()]
    assert [(f["image"], f["reason"], f["caption_rows"]) for f in failures] == [("img003.jpg", "missing", 2)]
    assert failures[0]["detail"] == s3.url("in/images/img003.jpg")
    assert remote["rows"] == local["rows"] and remote["rows"]["accounted"] == n_rows
    assert remote["source"]["captions"] == caption_url and remote["source"]["file"] == "results.csv"


def test_image_names_that_leave_the_prefix_are_refused(tmp_path, s3):
    client = s3.client()
    captions, images, _ = make_dataset(tmp_path, 2)
    client.put_object(Bucket=s3.name, Key="in/images/img000.jpg", Body=(images / "img000.jpg").read_bytes())
    client.put_object(Bucket=s3.name, Key="in/secret.jpg", Body=(images / "img001.jpg").read_bytes())
    write_captions(captions, [("img000.jpg", 0, "a dog"), ("../secret.jpg", 0, "a cat"),
                              ("/in/secret.jpg", 0, "a cow")])
    manifest = build_shards(cfg_for(captions, s3.url("in/images"), tmp_path / "out", splits=(1.0, 0.0, 0.0),
                                    max_failure_rate=1.0, storage_options=s3.options))
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert sorted((f["image"], f["reason"]) for f in failures) == [("../secret.jpg", "path_escape"),
                                                                    ("/in/secret.jpg", "path_escape")]
    assert manifest["splits"]["train"]["images"] == 1


@pytest.mark.slow
def test_ray_tasks_upload_the_same_shards(small, tmp_path, s3, ray_local):
    captions, images, _ = small
    build_shards(cfg_for(captions, images, tmp_path / "local"))
    # Ray workers may have started before this test's credentials were set: the options carry them.
    options = {**s3.options, "key": os.environ["AWS_ACCESS_KEY_ID"], "secret": os.environ["AWS_SECRET_ACCESS_KEY"]}
    manifest = build_shards(cfg_for(captions, images, s3.url("ray"), engine="ray", workers=2, storage_options=options))
    files = bucket_files(s3, "ray")
    assert {n: sha(d) for n, d in files.items() if n.endswith(".tar")} == tar_hashes(tmp_path / "local")
    assert json.loads(files["manifest.json"]) == manifest
    assert "itsim-test-secret" not in files["build_config.yaml"].decode()


# ---- faults --------------------------------------------------------------------------------------

def _build_cmd(captions: Path, images: Path, out: str, workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "itsim.cli", "build-shards", "--captions", str(captions), "--images", str(images),
            "--out", out, "--image-size", "384", "--shard-size", "3", "--workers", str(workers),
            "--splits", "0.6,0.2,0.2"]


def test_store_stopped_midway_then_the_same_command_resumes(tmp_path, s3):
    # Large stored images make each shard take long enough to stop the server part-way.
    captions, images, _ = make_dataset(tmp_path / "data", 36, 160, 120)
    clean = tmp_path / "clean"
    build_shards(cfg_for(captions, images, clean, image_size=384, shard_size=3))
    env = {**os.environ, "ITSIM_STORAGE_OPTIONS": json.dumps({**s3.options, **FAST_FAIL})}
    cmd = _build_cmd(captions, images, s3.url("shards"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = s3.client()
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3.name, Prefix="shards/").get("Contents", [])]
        if any(k.endswith("_stats.json") for k in keys):
            break
        time.sleep(0.02)
    s3.server.stop()
    _, err = proc.communicate(timeout=120)
    s3.server.start()
    lines = [line for line in err.splitlines() if line.startswith("itsim build-shards:")]
    assert proc.returncode == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err and "itsim-test-secret" not in err
    assert re.search(r"s3://itsim-test-\d+/shards/\S+: store not reachable or failing .*run the same command "
                     r"again to resume$", lines[0]), lines[0]

    files = bucket_files(s3, "shards")
    assert "manifest.json" not in files, "the build finished before the stop; the test proves nothing"
    kept = [n for n in files if n.endswith(".tar")]
    want = tar_hashes(clean)
    assert 1 <= len(kept) < len(want) and all(sha(files[n]) == want[n] for n in kept)
    assert not client.list_multipart_uploads(Bucket=s3.name).get("Uploads")
    complete = [n for n in kept if n.replace(".tar", "_stats.json") in files]

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    skipped = re.search(r"resuming: (\d+) of (\d+) shards already complete", rerun.stderr)
    assert skipped and int(skipped[1]) == len(complete) and int(skipped[2]) == len(want)
    files = bucket_files(s3, "shards")
    assert {n: sha(d) for n, d in files.items() if n.endswith(".tar")} == want
    manifest = json.loads(files["manifest.json"])
    assert manifest["images_written_now"] == 36 - 3 * len(complete)


@pytest.mark.parametrize("fault", ["no_bucket", "denied"])
def test_missing_bucket_or_wrong_credentials_is_one_line_exit_2(small, tmp_path, s3, capsys, monkeypatch, fault):
    captions, images, _ = small
    out = "s3://no-such-bucket-itsim/shards" if fault == "no_bucket" else s3.url("shards")
    if fault == "denied":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-1234")
        s3.server.require_auth(True)
    monkeypatch.chdir(tmp_path)
    code = cli_main(["build-shards", "--captions", str(captions), "--images", str(images), "--out", out,
                     "--image-size", "32", "--workers", "1",
                     "--storage-options", json.dumps({**s3.options, **FAST_FAIL})])
    err = one_line_error(capsys)
    assert code == 2 and out in err and "wrong-secret-value-1234" not in err and "itsim-test-secret" not in err
    assert ("bucket 'no-such-bucket-itsim' does not exist" if fault == "no_bucket" else "access denied") in err
    assert list(tmp_path.iterdir()) == []


# ---- pool processes end with the builder ---------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (children of children included)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead child nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkilled_builder_leaves_no_pool_process_behind(tmp_path):
    captions, images, _ = make_dataset(tmp_path / "data", 30, 160, 120)
    out = tmp_path / "out"
    proc = subprocess.Popen(_build_cmd(captions, images, str(out), workers=2), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, tree = time.monotonic() + 60, []
    try:
        # Fork server, resource tracker and both workers up, and the pool at work.
        while proc.poll() is None and time.monotonic() < deadline:
            tree = _descendants(proc.pid)
            if len(tree) >= 4 and out.is_dir() and list(out.glob("*_stats.json")):
                break
            time.sleep(0.02)
        tree = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (out / "manifest.json").exists(), "the build finished before the kill; the test proves nothing"
        assert len(tree) >= 4, tree
        deadline = time.monotonic() + 5
        while any(map(_running, tree)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in tree if _running(pid)] == []
    finally:
        for pid in tree:  # never leave a survivor for the next test
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


# ---- commands that take local paths only ---------------------------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["synth", "s3://bucket/data"], "--out"),
    (["synth", "s3:/bucket/data"], None),
    (["demo", "--out", "s3://bucket/demo"], "--out"),
    (["export", "--model", "run/model", "--out", "s3://bucket/export"], "--out"),
    (["export", "--model", "s3://bucket/run/model", "--out", "export"], "--model"),
    (["build-shards", "--captions", "c.csv", "--images", "img", "--out", "s3:/bucket/shards"], None),
])
def test_local_only_paths_refuse_urls_in_one_line(tmp_path, monkeypatch, capsys, argv, flag):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.csv").write_text("image_name| comment_number| comment\na.jpg| 0| a dog\n")
    (tmp_path / "img").mkdir()
    assert cli_main(argv) == 2
    err = one_line_error(capsys)
    url = next(a for a in argv if a.startswith("s3:"))
    if flag:
        assert err.endswith(f"error: {flag}: {url}: this takes a local path, not a URL"), err
    else:
        assert err.endswith(f"{url}: looks like a URL that lost a '/' (passed through pathlib.Path?)"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "img"]
