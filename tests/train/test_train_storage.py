"""Training from and to an object store, against a real S3 server (moto, tests/s3server.py).

The loader streams `--shards s3://...` (each rank and worker reading its own shards); a run with
`--out s3://...` keeps a local run's layout in the bucket, its checkpoints there complete or ignored;
a shard deleted after the listing is recorded like a corrupt one; a store that stops answering ends
the run with one line naming the shard.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_MODEL
from itsim import storage, storage_stream
from itsim.data.loader import iter_split, shard_samples, split_shards
from itsim.errors import UserError
from itsim.train import checkpoint, remote

ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
# One attempt per botocore call, short timeouts: a store that is down fails in seconds, not minutes.
FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}}
STATE = checkpoint.STATE_FILE


@pytest.fixture
def shards_url(s3, tiny_shards) -> str:
    """The tiny shards in the bucket, uploaded as `build-shards --out URL` leaves them (manifest last)."""
    url = s3.url("shards")
    storage.upload_tree(str(tiny_shards), url, s3.options, last=("manifest.json",))
    return url


def _env(s3, tmp_path: Path, **options) -> dict[str, str]:
    """The environment of a training process: the server's endpoint, and $TMPDIR in the test's folder
    (where default staging folders go)."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**os.environ, **ENV, "TMPDIR": str(tmp_path / "tmp"),
            "ITSIM_STORAGE_OPTIONS": json.dumps({**s3.options, **options})}


def _args(shards: str, out: str, *extra: str) -> list[str]:
    return ["--shards", shards, "--out", out, "--batch-size", "16", "--workers", "2", "--log-every", "2",
            "--eval-every", "0", "--warmup-steps", "2", "--no-tensorboard", *TINY_MODEL, *extra]


def _train(*args: str) -> list[str]:
    return [sys.executable, "-m", "itsim.cli", "train", *args]


def _keys(s3, prefix: str) -> list[str]:
    """Every object below `prefix/`, relative to it, read behind itsim's back."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.name, Prefix=prefix + "/")
    return sorted(o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", []))


def _tensors(s3, key: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    local = tmp_path / "dl" / key.replace("/", "_")
    storage_stream.download(s3.url(key), str(local), s3.options)
    return load_file(str(local))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _rows(s3, key: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(s3.url(key), s3.options).splitlines()]


@pytest.mark.slow
def test_training_from_and_to_a_bucket_leaves_the_run_layout_there(s3, shards_url, tmp_path):
    """2 loader workers stream the shards from the bucket; the run (checkpoints pruned to --keep, metrics,
    config, model) lands in the bucket, the staging folder is gone and no local `s3:` folder appears."""
    env = {**_env(s3, tmp_path)}
    del env["ITSIM_STORAGE_OPTIONS"]  # the settings come from the flag this time
    cmd = _train(*_args(shards_url, s3.url("run"), "--steps", "6", "--checkpoint-every", "2", "--keep", "2",
                        "--stage-dir", str(tmp_path / "stage"), "--storage-options", json.dumps(s3.options)))
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", STATE]
    assert _keys(s3, "run") == sorted(
        ["config.yaml", "metrics.jsonl", "model/config.json", "model/model.safetensors", "model/vocab.json",
         "train_summary.json"] + [f"checkpoints/step_000000{s}/{f}" for s in (4, 6) for f in ckpt])
    # The newest checkpoint verifies as a local one does, and holds the exported parameters.
    run = remote.RunDir(s3.url("run"), tmp_path / "check", remote=True, options=s3.options)
    local, state = remote.download(run, s3.url("run/checkpoints/step_0000006"))
    assert state["step"] == 6 and sorted(state["files"]) == ckpt[:-1]
    assert _same(load_file(str(local / "model.safetensors")), _tensors(s3, "run/model/model.safetensors", tmp_path))
    rows = _rows(s3, "run/metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert any("val_accuracy" in r for r in rows)  # validation read the val split from the bucket too
    saved = storage.read_text(s3.url("run/config.yaml"), s3.options)
    assert "storage_options" not in saved and str(s3.server.port) not in saved
    assert f"model written to {s3.url('run/model')}" in done.stderr
    assert not (tmp_path / "stage" / "rank0").exists()  # the staging folder is removed at the end
    assert not (tmp_path / "s3:").exists() and not any((tmp_path / "tmp").glob("itsim-*"))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_processes_train_from_and_to_a_bucket_each_uploading_its_own_files(s3, shards_url, tmp_path):
    """Each rank stages in its own folder, as on machines without a shared disk: rank 1's RNG state
    exists only in its folder and reaches the checkpoint in the bucket through rank 1's upload."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541",
           "-m", "itsim.train", *_args(shards_url, s3.url("run"), "--steps", "4", "--checkpoint-every", "2",
                                       "--audit", "--workers", "1")]
    done = subprocess.run(cmd, env={**_env(s3, tmp_path), "ACCELERATE_USE_CPU": "1", "HF_HOME": str(tmp_path / "hf")},
                          capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stderr[-3000:]
    files = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"]
    keys = _keys(s3, "run")
    run = remote.RunDir(s3.url("run"), tmp_path / "check", remote=True, options=s3.options)
    for step in (2, 4):
        name = checkpoint.checkpoint_name(step)
        assert sorted(k.split("/")[-1] for k in keys if k.startswith(f"checkpoints/{name}/")) == sorted(files + [STATE])
        state = remote.download(run, s3.url(f"run/checkpoints/{name}"))[1]
        assert sorted(state["files"]) == files and state["world_size"] == 2
    audits = [_rows(s3, f"run/audit/rank{r}.jsonl") for r in (0, 1)]
    assert len({a[-1]["param_checksum"] for a in audits}) == 1, "parameters differ between ranks"
    seen = [{k for row in a[:-1] for k in row["keys"]} for a in audits]
    assert seen[0] and seen[1] and not seen[0] & seen[1], "ranks trained on the same images"
    last = _tensors(s3, "run/checkpoints/step_0000004/model.safetensors", tmp_path)
    assert _same(last, _tensors(s3, "run/model/model.safetensors", tmp_path))
    assert not any((tmp_path / "tmp").glob("itsim-run-*"))  # both ranks removed their staging folders


def _wait_for_key(s3, key: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    client, deadline = s3.client(), time.time() + timeout
    while True:
        try:
            client.head_object(Bucket=s3.name, Key=key)
            return
        except client.exceptions.ClientError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stdout.read() if proc.stdout else ''}")
        if time.time() > deadline:
            raise AssertionError(f"{key} did not appear")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_sigkill_then_resume_auto_from_the_bucket_ends_with_the_same_parameters(s3, shards_url, tmp_path):
    steps = ["--steps", "24", "--checkpoint-every", "3"]
    env = _env(s3, tmp_path)
    done = subprocess.run(_train(*_args(shards_url, s3.url("a"), *steps)), env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(_train(*_args(shards_url, s3.url("b"), *steps)), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_key(s3, f"b/checkpoints/step_0000003/{STATE}", proc)  # the first checkpoint is complete
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "model/model.safetensors" not in _keys(s3, "b")
    done = subprocess.run(_train(*_args(shards_url, s3.url("b"), *steps, "--resume", "auto")), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {s3.url('b/checkpoints/step_')}" in done.stderr
    a, b = (_tensors(s3, f"{r}/model/model.safetensors", tmp_path) for r in "ab")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst == 0.0, f"largest parameter difference {worst}"


def _fake_checkpoint(s3, tmp_path: Path, step: int, *, state: bool = True, corrupt: bool = False) -> None:
    """A checkpoint as `remote.save` uploads it: its file, then (unless `state=False`) its state file."""
    from itsim.io import sha256_file

    folder = tmp_path / "fake" / checkpoint.checkpoint_name(step)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights %d" % step)
    (folder / STATE).write_text(json.dumps({"step": step, "files": {
        "model.safetensors": sha256_file(folder / "model.safetensors")}}))
    if corrupt:
        (folder / "model.safetensors").write_bytes(b"other bytes")
    if not state:
        (folder / STATE).unlink()
    storage.upload_tree(str(folder), s3.url(f"run/checkpoints/{folder.name}"), s3.options, last=(STATE,))


def test_resume_auto_in_a_bucket_takes_the_newest_complete_checkpoint_and_keep_prunes_state_first(s3, tmp_path,
                                                                                                 caplog):
    """A checkpoint without its state file (a killed upload) or whose object does not match it is
    skipped with a warning; pruning removes old and incomplete checkpoints."""
    for step, kw in ((2, {}), (4, {}), (6, {"corrupt": True}), (8, {"state": False})):
        _fake_checkpoint(s3, tmp_path, step, **kw)
    run = remote.RunDir(s3.url("run"), tmp_path / "stage", remote=True, options=s3.options)
    assert [u.rsplit("/", 1)[-1] for u in remote.list_checkpoints(run)] == [
        "step_0000002", "step_0000004", "step_0000006", "step_0000008"]
    url, state = remote.find_resume(run, "auto")
    assert url == s3.url("run/checkpoints/step_0000004") and state["step"] == 4
    assert "step_0000008: " in caplog.text and "incomplete checkpoint" in caplog.text
    assert "step_0000006: " in caplog.text and "checksum mismatch" in caplog.text
    assert (tmp_path / "stage" / remote.RESUME_DIR / "step_0000004" / "model.safetensors").read_bytes() == b"weights 4"
    with pytest.raises(UserError, match="incomplete checkpoint"):
        remote.find_resume(run, s3.url("run/checkpoints/step_0000008"))
    remote.prune(run, keep=1)  # complete: 2, 4, 6 (its state file is there; its contents are checked on resume)
    assert _keys(s3, "run/checkpoints") == [f"step_0000006/{f}" for f in ("model.safetensors", STATE)]


def test_a_shard_deleted_after_listing_is_recorded_and_skipped(s3, shards_url, tiny_shards):
    """The listing sees every shard; one is gone when read: it goes to the loader's handler (which counts
    it as unreadable shard data, as a corrupt local shard) and every other shard's samples still come."""
    urls = split_shards(shards_url, "train", s3.options)
    gone = urls[1]
    s3.client().delete_object(Bucket=s3.name, Key=gone.split(f"{s3.name}/", 1)[1])
    recorded: list[str] = []
    samples = list(shard_samples(urls, lambda exc: recorded.append(str(exc)) or True, s3.options))
    every = {s["__key__"] for s in shard_samples(split_shards(tiny_shards, "train"), print)}
    in_gone = {s["__key__"] for s in shard_samples([str(tiny_shards / gone.rsplit("/", 1)[1])], print)}
    assert recorded == [f"{gone}: not found"]
    assert in_gone and {s["__key__"] for s in samples} == every - in_gone
    with pytest.raises(UserError, match="1 shard.* listed in the manifest are missing"):  # a new listing sees it
        iter_split(shards_url, "train", options=s3.options).__next__()


@pytest.mark.slow
def test_training_goes_on_when_a_shard_is_deleted_between_listing_and_reading(s3, shards_url, tmp_path):
    """The training process is frozen (SIGSTOP, workers too) after its first step, long before its
    workers reach the second epoch; a shard is deleted; the run completes and records it."""
    run = tmp_path / "run"
    cmd = _train(*_args(shards_url, str(run), "--steps", "60", "--batch-size", "8", "--log-every", "1",
                        "--checkpoint-every", "1000"))
    proc = subprocess.Popen(cmd, env=_env(s3, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    client = s3.client()
    deadline = time.time() + 180
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.time() < deadline, "training ended before its first step"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGSTOP)
    gone = split_shards(shards_url, "train", s3.options)[2]
    client.delete_object(Bucket=s3.name, Key=gone.split(f"{s3.name}/", 1)[1])
    os.killpg(proc.pid, signal.SIGCONT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"skipping unreadable shard data: {gone}: not found" in out
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 60 and max(r.get("bad_samples", 0) for r in rows) >= 1
    assert (run / "model" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_store_down_while_training_reads_is_one_line_naming_the_shard(s3, shards_url, tmp_path):
    run = tmp_path / "run"
    cmd = _train(*_args(shards_url, str(run), "--steps", "100000", "--checkpoint-every", "100000"))
    proc = subprocess.Popen(cmd, env=_env(s3, tmp_path, **FAST_FAIL), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (run / "metrics.jsonl").is_file():
        assert proc.poll() is None and time.time() < deadline, "training ended before its first step"
        time.sleep(0.05)
    s3.server.stop()
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"itsim train: error: {shards_url}/train-") and ".tar: store not reachable" in last, last
    assert last.endswith("(gave up after 4 retries)"), last
