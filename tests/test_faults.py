"""Faults as they happen in production: real processes, real signals, real files, a real full disk.

Already covered elsewhere (not repeated here): one SIGKILL then exact resume, SIGTERM checkpoint,
truncated/garbage newest checkpoint fallback and `--resume PATH` errors (tests/train/test_train.py);
shard builder killed mid-build then identical output (tests/data/test_shards.py).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from safetensors.torch import load_file

from conftest import TINY_MODEL
from itsim.data.loader import SAMPLE_KEYS
from itsim.data.shards.writer import MEMBERS
from itsim.train import checkpoint
from itsim.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TINY = dict(channels=(8,), embed_dim=8, lstm_hidden=8, lstm_layers=1, text_dim=16, image_dim=16, head_dim=8)
TINY_FLAGS = ["--channels", "8", "--embed-dim", "8", "--lstm-hidden", "8", "--lstm-layers", "1", "--text-dim", "16",
              "--image-dim", "16", "--head-dim", "8"]

# `itsim train` on a slow disk: each checkpoint file Accelerate writes takes 0.3 s more, so a kill
# aimed at a checkpoint write lands inside one (a half-written `.tmp-step_*` folder).
SLOW_DISK_TRAIN = """
import sys, time
import accelerate.checkpointing as ckpt
_save = ckpt.save
def _slow_save(*args, **kwargs):
    _save(*args, **kwargs)
    time.sleep(0.3)
ckpt.save = _slow_save
from itsim.cli import main
sys.exit(main())
"""


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--shards", str(shards), "--out", str(out), "--batch-size", "16", "--log-every", "1",
            "--eval-every", "0", "--warmup-steps", "2", "--no-tensorboard", *extra]


class Proc:
    """A process group with its merged output collected by a thread (so pipes never fill)."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None):
        self.popen = subprocess.Popen(cmd, cwd=ROOT, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.popen.stdout), daemon=True)
        self._reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, condition: Callable[[], bool], timeout: float = 120, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.popen.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"exited ({self.popen.returncode}) before {what}:\n{self.text[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.text[-3000:]}")
            time.sleep(0.005)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            self.popen.wait()
            self._reader.join(10)

    def finish(self, timeout: float = 300) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(10)
        return code


# ---- repeated SIGKILL ------------------------------------------------------------------------------

def _metrics_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().endswith("}")]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_repeated_sigkill_at_random_points_resumes_from_the_newest_complete_checkpoint(tiny_shards, tmp_path):
    steps = ["--steps", "12", "--checkpoint-every", "2", "--keep", "3", "--workers", "2", *TINY_MODEL]
    ref = Proc([sys.executable, "-m", "itsim.cli", *_train_args(tiny_shards, tmp_path / "ref", *steps)])
    assert ref.finish() == 0, ref.text[-3000:]

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    cmd = [sys.executable, "-c", SLOW_DISK_TRAIN, *_train_args(tiny_shards, run, *steps, "--resume", "auto")]
    rng = random.Random(20261129)
    newest: Path | None = None  # what the next run must resume from
    kills = []
    for phase in ("data loading", "checkpoint write", "training step", "checkpoint write"):
        start = int(newest.name.split("_")[1]) if newest else 0
        seen = len(_metrics_steps(run))
        proc = Proc(cmd)
        if phase == "data loading":  # the model is built, the DataLoader workers start and load batches
            proc.wait_for(lambda: "parameters;" in proc.text, what="the first batches")
            time.sleep(rng.uniform(0.0, 0.05))
        elif phase == "checkpoint write":  # the second checkpoint of this run, half written
            tmp = ckpts / f".tmp-step_{start + 4:07d}"
            proc.wait_for(tmp.exists, what=tmp.name)
            time.sleep(rng.uniform(0.0, 0.25))
        else:  # right after an odd step is logged: the next step's data and compute
            proc.wait_for(lambda: start + 3 in _metrics_steps(run)[seen:], what=f"step {start + 3}")
            time.sleep(rng.uniform(0.0, 0.03))
        proc.kill()
        if newest is None:
            assert "no usable checkpoint" in proc.text and "starting fresh" in proc.text, proc.text[-3000:]
        else:
            assert f"resumed from {newest} (step {start})" in proc.text, proc.text[-3000:]
        complete = checkpoint.list_checkpoints(ckpts)
        for folder in complete:  # a SIGKILL never leaves a torn step_* folder, only a .tmp-step_* one
            checkpoint.verify(folder)
        torn = sorted(p.name for p in ckpts.glob(".tmp-step_*")) if ckpts.exists() else []
        if phase == "checkpoint write":
            assert torn, "the kill missed the checkpoint write; the test proves less than it claims"
        assert not (run / "model").exists()
        kills.append((phase, start, [p.name for p in complete], torn))
        newest = complete[-1] if complete else None

    final = Proc(cmd)
    assert final.finish() == 0, final.text[-3000:]
    assert f"resumed from {newest}" in final.text
    assert not list(ckpts.glob(".tmp-step_*"))
    ref_params = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    params = load_file(str(run / "model" / "model.safetensors"))
    worst = max((ref_params[k] - params[k]).abs().max().item() for k in ref_params)
    assert worst == 0.0, f"largest parameter difference {worst} after kills {kills}"
    assert len(kills) == 4 and [k[0] for k in kills].count("checkpoint write") == 2
    logging.getLogger(__name__).info("kills (phase, resumed from step, complete after, torn after): %s", kills)


def test_resume_auto_without_a_usable_checkpoint_starts_fresh_and_says_so(tiny_shards, tmp_path, caplog):
    from itsim.train import TrainConfig, train

    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    torn = run / "checkpoints" / ".tmp-step_0000004"  # a killed save, and a complete-looking but corrupt one
    torn.mkdir(parents=True)
    (torn / "model.safetensors").write_bytes(b"half")
    (run / "checkpoints" / "step_0000002").mkdir()
    (run / "checkpoints" / "step_0000002" / "model.safetensors").write_bytes(b"no trainer_state.json")
    summary = train(TrainConfig(shards=str(tiny_shards), out=str(run), steps=2, batch_size=8, workers=0,
                                tensorboard=False, eval_every=0, log_every=1, resume="auto", **TINY))
    assert summary["step"] == 2
    assert "skipping unusable checkpoint step_0000002" in caplog.text
    assert "no usable checkpoint" in caplog.text and "starting fresh" in caplog.text
    assert "resumed from" not in caplog.text
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # fresh: both steps trained, from step 1
    # The corrupt folder was replaced by this run's own step 2 and the torn one removed.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002"]
    assert checkpoint.verify(run / "checkpoints" / "step_0000002")["step"] == 2


# ---- a full disk --------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (needs root and permission to mount; skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path, leave: int) -> None:
    """Leave about `leave` bytes free on `disk`."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    size = shutil.disk_usage(disk).free - leave
    with filler.open("wb") as f:
        for start in range(0, size, 1 << 20):
            f.write(b"\0" * min(1 << 20, size - start))


def _error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"itsim {command}: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_disk_full_during_a_checkpoint_on_a_real_full_filesystem(tiny_shards, small_disk, capsys):
    run = small_disk / "run"
    args = _train_args(tiny_shards, run, "--checkpoint-every", "2", "--workers", "0", *TINY_FLAGS)
    assert cli_main([*args, "--steps", "2"]) == 0
    ckpts = run / "checkpoints"
    sizes = {p.name: p.stat().st_size for p in (ckpts / "step_0000002").iterdir()}
    # Room for half the weights (safetensors fails), then for the weights and half the optimizer
    # state (torch.save fails; its error text says nothing about space).
    model, optimizer = sizes["model.safetensors"], sizes["optimizer.bin"]
    for leave, writer in ((model // 2, "No space left on device"), (model + 8192 + optimizer // 2, "")):
        _fill(small_disk, leave)
        capsys.readouterr()
        assert cli_main([*args, "--steps", "4", "--resume", "auto"]) == 2
        line = _error_line(capsys.readouterr().err, "train")
        assert "could not write checkpoint step_0000004: disk full" in line and writer in line
        assert "earlier checkpoints kept" in line
        assert [p.name for p in checkpoint.list_checkpoints(ckpts)] == ["step_0000002"]
        assert checkpoint.verify(ckpts / "step_0000002")["step"] == 2
        assert {p.name: p.stat().st_size for p in (ckpts / "step_0000002").iterdir()} == sizes
        assert not list(ckpts.glob(".tmp-*"))
    (small_disk / "filler").unlink()
    capsys.readouterr()
    assert cli_main([*args, "--steps", "4", "--resume", "auto"]) == 0
    assert [p.name for p in checkpoint.list_checkpoints(ckpts)] == ["step_0000002", "step_0000004"]


def test_disk_full_injected_into_save_state_is_reported_and_keeps_the_previous_checkpoint(
        tiny_shards, tmp_path, monkeypatch, capsys):
    """The same fault where a tmpfs cannot be mounted: Accelerate writes its files, then the disk
    fills in the middle of optimizer.bin (OSError ENOSPC), as on the 3rd checkpoint here."""
    from accelerate import Accelerator

    real_save = Accelerator.save_state
    saves: list[str] = []

    def filling_disk(self, output_dir=None, **kwargs):
        saves.append(output_dir)
        result = real_save(self, output_dir, **kwargs)
        if len(saves) == 3:
            partial = Path(output_dir) / "optimizer.bin"
            partial.write_bytes(partial.read_bytes()[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial))
        return result

    monkeypatch.setattr(Accelerator, "save_state", filling_disk)
    run = tmp_path / "run"
    code = cli_main(_train_args(tiny_shards, run, "--steps", "8", "--checkpoint-every", "2", "--workers", "0",
                                *TINY_FLAGS))
    assert code == 2
    line = _error_line(capsys.readouterr().err, "train")
    assert "could not write checkpoint step_0000006: disk full" in line and "earlier checkpoints kept" in line
    ckpts = run / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(ckpts)] == ["step_0000002", "step_0000004"]
    assert checkpoint.find_resume(ckpts, "auto")[1]["step"] == 4
    assert not list(ckpts.glob(".tmp-*")) and not (run / "model").exists()
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())


def test_build_shards_on_a_full_disk_exits_2_then_resumes_to_identical_shards(synth_data, small_disk, tmp_path,
                                                                              capsys):
    import hashlib

    def args(out: Path) -> list[str]:
        return ["build-shards", "--captions", str(synth_data / "results.csv"), "--images", str(synth_data / "images"),
                "--out", str(out), "--image-size", "64", "--shard-size", "40", "--workers", "1"]

    def hashes(out: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}

    assert cli_main(args(tmp_path / "clean")) == 0
    out = small_disk / "shards"
    _fill(small_disk, 400_000)
    capsys.readouterr()
    assert cli_main(args(out)) == 2
    line = _error_line(capsys.readouterr().err, "build-shards")
    assert "disk full" in line and "run the same command again" in line
    assert not (out / "manifest.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    written = hashes(out)
    assert 0 < len(written) < len(hashes(tmp_path / "clean"))
    (small_disk / "filler").unlink()
    assert cli_main(args(out)) == 0
    assert hashes(out) == hashes(tmp_path / "clean")


# ---- two processes, one rank dies ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_launcher_ends_a_two_process_job_when_a_rank_is_killed_and_names_it(tiny_shards, tmp_path):
    import psutil

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), "-m", "itsim.train",
           *_train_args(tiny_shards, run, "--steps", "100000", "--checkpoint-every", "100000", "--workers", "1",
                        "--dist-timeout", "30", *TINY_MODEL)[1:]]
    proc = Proc(cmd, env={**ENV, "ACCELERATE_USE_CPU": "1"})
    proc.wait_for(lambda: len(_metrics_steps(run)) >= 2, timeout=180, what="training")
    children = psutil.Process(proc.popen.pid).children()  # the launcher's rank processes
    ranks = {env["RANK"]: c for c in children if "RANK" in (env := c.environ())}
    assert set(ranks) == {"0", "1"}
    ranks["1"].kill()
    killed = time.monotonic()
    code = proc.finish(timeout=120)
    waited = time.monotonic() - killed
    logging.getLogger(__name__).info("launcher exited %d, %.1f s after rank 1 was killed", code, waited)
    assert code != 0 and waited < 90
    cause = proc.text.split("Root Cause")[-1]
    assert "rank      : 1 (local_rank: 1)" in cause and "exitcode  : -9" in cause, proc.text[-3000:]
    assert not ranks["0"].is_running() or ranks["0"].status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_surviving_rank_exits_2_after_dist_timeout_when_its_peer_hangs(tiny_shards, tmp_path):
    """No launcher to clean up (as on another machine): rank 1 freezes (SIGSTOP); rank 0's next
    collective times out after --dist-timeout and it exits 2 with a message, instead of hanging."""
    run = tmp_path / "run"
    port = str(_free_port())
    args = _train_args(tiny_shards, run, "--steps", "100000", "--checkpoint-every", "100000", "--workers", "1",
                       "--dist-timeout", "10", *TINY_MODEL)[1:]
    procs = [Proc([sys.executable, "-m", "itsim.train", *args],
                  env={**ENV, "ACCELERATE_USE_CPU": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                       "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
             for r in (0, 1)]
    try:
        procs[0].wait_for(lambda: len(_metrics_steps(run)) >= 2, timeout=180, what="training")
        procs[1].kill(signal.SIGSTOP)
        stopped = time.monotonic()
        code = procs[0].finish(timeout=120)
        waited = time.monotonic() - stopped
    finally:
        for proc in procs:
            proc.kill()
    logging.getLogger(__name__).info("rank 0 exited %d, %.1f s after rank 1 froze (--dist-timeout 10)", code, waited)
    assert code == 2, procs[0].text[-3000:]
    line = _error_line(procs[0].text, "train")
    assert "rank 0: a collective failed, another rank probably died" in line
    assert "timed out" in line.lower() or "timeout" in line.lower()  # gloo words it either way
    assert waited < 10 + 60
    assert "Traceback" not in procs[0].text


# ---- Ray scoring: an actor killed mid-job --------------------------------------------------------

def _score_inputs(root: Path, n_rows: int) -> tuple[Path, Path, Path]:
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from itsim.model import ItsimModel, ModelConfig, Preprocess, save_model
    from itsim.text import Vocab

    images = root / "images"
    images.mkdir(parents=True)
    for i in range(40):
        pixels = np.random.default_rng(i).integers(0, 255, (96, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.jpg")
    rows = pd.DataFrame({"image": [f"{i % 40}.jpg" for i in range(n_rows)],
                         "caption": [f"a dog number {i % 13} runs on grass" for i in range(n_rows)],
                         "pair_id": range(n_rows)})
    rows.to_csv(root / "pairs.csv", index=False)
    torch.manual_seed(0)
    vocab = Vocab.build(rows["caption"])
    model = ItsimModel(ModelConfig(vocab_size=len(vocab), **TINY)).eval()
    return images, root / "pairs.csv", save_model(root / "model", model, vocab, Preprocess(image_size=32))


def _actors(raylet) -> list:
    """This Ray session's scoring actors (children of our raylet: other jobs' actors are not touched)."""
    found = []
    for child in raylet.children():
        try:
            if child.cmdline()[0].startswith("ray::MapWorker(MapBatches(ScoreActor))"):
                found.append(child)
        except Exception:  # noqa: BLE001 - a worker that just exited
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_scoring_completes_with_every_row_once_after_an_actor_is_killed(ray_local, tmp_path):
    import pandas as pd
    import psutil

    from itsim.score.ray_job import ScoreConfig, run_score

    n_rows = 1920  # 120 blocks: work is left for a replacement actor after the kill (an actor that also
    # decodes its own rows gets through 480 rows within the wait before the kill on a quiet machine)
    images, pairs, model_dir = _score_inputs(tmp_path, n_rows)
    socket_name = ray_local.nodes()[0]["RayletSocketName"]
    raylet = next(p for p in psutil.process_iter(["cmdline"])
                  if f"--raylet_socket_name={socket_name}" in (p.info["cmdline"] or []))
    result: dict = {}

    def job() -> None:
        try:
            result["summary"] = run_score(ScoreConfig(model=str(model_dir), input=(str(pairs),), images=str(images),
                                                      output=str(tmp_path / "out"), batch_size=16, workers=1))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            result["error"] = exc

    earlier = {a.pid for a in _actors(raylet)}  # actors of earlier jobs in this Ray session, still exiting
    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 180
    victim, replacements = None, set()
    while thread.is_alive() and time.monotonic() < deadline:
        actors = [a for a in _actors(raylet) if a.pid not in earlier]
        if victim is None:
            busy = [a for a in actors if a.cmdline()[0].endswith(".submit")]  # scoring a block now
            if busy:
                time.sleep(random.Random(7).uniform(0.2, 0.5))
                assert thread.is_alive(), "the job finished before the kill; the test proves nothing"
                victim = busy[0]
                victim.kill()
        else:
            replacements |= {a.pid for a in actors if a.pid != victim.pid}
        time.sleep(0.01 if victim is None else 0.1)
    assert victim is not None, "no scoring actor seen"
    thread.join(240)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    df = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "out").glob("*.parquet"))], ignore_index=True)
    assert len(df) == n_rows and df["row_id"].is_unique
    assert sorted(df["pair_id"].astype(int)) == list(range(n_rows))  # CSV columns are read as text
    assert df["error"].isna().all() and df["score"].notna().all()
    assert result["summary"]["rows"] == n_rows
    assert replacements, "Ray did not restart the killed actor"
    logging.getLogger(__name__).info("actor %d killed mid-job; %d rows once each; replacement actors %s",
                                     victim.pid, len(df), sorted(replacements))


# ---- corrupt and truncated shards ---------------------------------------------------------------

def _garble_first_jpeg(tar_path: Path) -> str:
    """Overwrite the first bytes of one sample's JPEG (its header): that image no longer decodes."""
    with tarfile.open(tar_path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".jpg")][2]
    data = bytearray(tar_path.read_bytes())
    data[member.offset_data:member.offset_data + 16] = b"\0not a jpeg any\0"
    tar_path.write_bytes(bytes(data))
    return member.name.rsplit(".", 1)[0]


def _captions_in(tar_path: Path) -> int:
    with tarfile.open(tar_path) as tar:
        return sum(len(json.loads(tar.extractfile(m).read())["captions"]) for m in tar if m.name.endswith(".json"))


def _cut_samples(intact: Path, cut: int) -> dict[str, dict[str, int]]:
    """What survives of each sample when `intact` is cut at byte `cut`: sample key -> {member suffix:
    caption count (json) or 0} for the members whose data ends before the cut, in tar order."""
    out: dict[str, dict[str, int]] = {}
    with tarfile.open(intact) as tar:
        for m in tar.getmembers():
            if m.offset_data + m.size > cut:
                break
            key, suffix = m.name.split(".", 1)
            caps = len(json.loads(tar.extractfile(m).read())["captions"]) if suffix == "json" else 0
            out.setdefault(key, {})[suffix] = caps
    return out


@pytest.fixture(scope="module")
def damaged_shards(tiny_shards, tmp_path_factory) -> dict:
    """A copy of the tiny shards with one truncated train shard, one train shard with a broken
    JPEG, and a truncated val shard."""
    folder = tmp_path_factory.mktemp("damaged") / "shards"
    shutil.copytree(tiny_shards, folder)
    truncated = folder / "train-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[: int(truncated.stat().st_size * 0.6)])
    garbled = folder / "train-000002.tar"
    bad_key = _garble_first_jpeg(garbled)
    val = folder / "val-000000.tar"
    val.write_bytes(val.read_bytes()[: val.stat().st_size // 2])
    return {"folder": folder, "truncated": truncated, "garbled": garbled, "bad_key": bad_key, "val": val}


def test_training_on_damaged_shards_skips_counts_and_names_them(damaged_shards, tiny_shards, tmp_path, caplog):
    """Each step's batch is exactly one pass over the damaged train split (every readable sample once),
    so after step s the count is exactly s x (the cut shard's unreadable tail once + its sample cut in
    two, if any + the broken JPEG)."""
    from itsim.data.loader import read_manifest, split_shards
    from itsim.train import TrainConfig, train

    truncated = damaged_shards["truncated"]
    survived = _cut_samples(tiny_shards / truncated.name, truncated.stat().st_size)
    members = set(SAMPLE_KEYS)  # what the loader reads of a sample (the txt member is not among them)
    whole = sum(members <= set(m) for m in survived.values())
    cut_in_two = sum(0 < len(members & set(m)) < len(members) for m in survived.values())  # at most one: at the cut
    assert whole > 0 and cut_in_two <= 1
    others = [Path(p) for p in split_shards(damaged_shards["folder"], "train") if Path(p) != truncated]
    readable = whole + sum(len(_cut_samples(p, p.stat().st_size)) for p in others)
    n_train = read_manifest(damaged_shards["folder"])["splits"]["train"]["images"]
    assert n_train > readable  # so an epoch has 2 batches of `readable` samples: steps 1 and 2 are passes 1 and 2
    per_pass = 1 + cut_in_two + 1

    run = tmp_path / "run"
    summary = train(TrainConfig(shards=str(damaged_shards["folder"]), out=str(run), steps=2, batch_size=readable,
                                workers=0, tensorboard=False, eval_every=0, log_every=1, **TINY))
    assert summary["step"] == 2 and (run / "model" / "model.safetensors").is_file() and "val_accuracy" in summary
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["bad_samples"]) for r in rows if "bad_samples" in r] == [(1, per_pass), (2, 2 * per_pass)]
    for r in rows:  # every readable sample but the broken JPEG reached the step
        if "images_per_s" in r:
            assert r["pairs_per_s"] > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    tails = [w for w in warnings if "unreadable shard data" in w and truncated.name in w]
    halves = [w for w in warnings if "incomplete sample" in w and truncated.name in w]
    broken = [w for w in warnings if damaged_shards["bad_key"] in w and "train-000002.tar" in w and "not_an_image" in w]
    assert (len(tails), len(halves), len(broken)) == (2, 2 * cut_in_two, 2)  # each event logged once, named
    assert any("val-000000.tar" in w for w in warnings)  # validation read the truncated val shard


@pytest.mark.timeout(300)
def test_scoring_damaged_shards_keeps_readable_rows_and_records_the_rest(damaged_shards, tiny_shards, tmp_path,
                                                                         ray_local):
    import pandas as pd
    import torch

    from itsim.model import ItsimModel, ModelConfig, Preprocess, save_model
    from itsim.score.ray_job import ScoreConfig, run_score
    from itsim.text import Vocab

    folder = damaged_shards["folder"]
    vocab = Vocab.load(folder / "vocab.json")
    torch.manual_seed(0)
    model_dir = save_model(tmp_path / "model", ItsimModel(ModelConfig(vocab_size=len(vocab), **TINY)).eval(), vocab,
                           Preprocess(image_size=32))
    summary = run_score(ScoreConfig(model=str(model_dir), input=(str(folder),), split="train",
                                    output=str(tmp_path / "out"), batch_size=32, workers=1))
    df = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "out").glob("*.parquet"))], ignore_index=True)
    assert summary["rows"] == len(df) and df["row_id"].is_unique
    shards = df["shard"].map(lambda s: Path(s).name)
    assert list(shards[df["error"] == "bad_shard"]) == ["train-000001.tar"]
    garbled = df[df["key"] == damaged_shards["bad_key"]]
    with tarfile.open(damaged_shards["garbled"]) as tar:  # its json is intact: one row per caption
        n_garbled = len(json.loads(tar.extractfile(f"{damaged_shards['bad_key']}.json").read())["captions"])
    assert len(garbled) == n_garbled and set(garbled["error"]) == {"not_an_image"}
    for name in ("train-000000.tar", "train-000002.tar", "train-000003.tar"):  # intact tars: every caption
        assert (shards == name).sum() == _captions_in(folder / name)
    # The cut shard: a row per caption of each sample whose jpg and json precede the cut, one bad_sample
    # row for the sample the cut leaves without them, then the bad_shard row.
    survived = _cut_samples(tiny_shards / "train-000001.tar", damaged_shards["truncated"].stat().st_size)
    cut = df[shards == "train-000001.tar"]
    scored = sum(m["json"] for m in survived.values() if {"jpg", "json"} <= set(m))
    lost = sum(not {"jpg", "json"} <= set(m) for m in survived.values())
    assert (cut["error"].isna().sum(), (cut["error"] == "bad_sample").sum(), (cut["error"] == "bad_shard").sum(),
            len(cut)) == (scored, lost, 1, scored + lost + 1)
    assert df.loc[df["error"].isna(), "score"].notna().all()


@pytest.fixture(scope="module")
def header_damaged_shard(tiny_shards, tmp_path_factory) -> Path:
    """One shard whose tar header in the middle is overwritten: tarfile stops there without an error."""
    folder = tmp_path_factory.mktemp("header_damaged") / "shards"
    shutil.copytree(tiny_shards, folder)
    shard = folder / "train-000003.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[len(tar.getmembers()) // 2]
    data = bytearray(shard.read_bytes())
    data[member.offset:member.offset + 100] = b"\xff" * 100
    shard.write_bytes(bytes(data))
    return shard


def test_loader_reports_a_shard_whose_middle_header_is_corrupt(header_damaged_shard, caplog):
    from itertools import islice

    from itsim.data.loader import ShardStream, StreamSpec

    stream = ShardStream(StreamSpec(shards=[str(header_damaged_shard)], batch_size=45, batches_per_epoch=1))
    list(islice(iter(stream), 1))
    assert any("unreadable shard data" in r.getMessage() and header_damaged_shard.name in r.getMessage()
               for r in caplog.records)


@pytest.mark.timeout(300)
def test_scorer_records_a_shard_whose_middle_header_is_corrupt(header_damaged_shard, ray_local, tmp_path):
    import pandas as pd
    import torch

    from itsim.model import ItsimModel, ModelConfig, Preprocess, save_model
    from itsim.score.ray_job import ScoreConfig, run_score
    from itsim.text import Vocab

    vocab = Vocab.load(header_damaged_shard.parent / "vocab.json")
    torch.manual_seed(0)
    model_dir = save_model(tmp_path / "model", ItsimModel(ModelConfig(vocab_size=len(vocab), **TINY)).eval(), vocab,
                           Preprocess(image_size=32))
    run_score(ScoreConfig(model=str(model_dir), input=(str(header_damaged_shard),), output=str(tmp_path / "out"),
                          batch_size=64, workers=1))
    df = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "out").glob("*.parquet"))], ignore_index=True)
    assert (df["error"] == "bad_shard").sum() == 1


def _tar_bytes(n_members: int, compression: str = "") -> bytes:
    """A real tar of `n_members` 700-byte members of random data (never all zero)."""
    import io

    buf = io.BytesIO()
    rng = random.Random(n_members)
    with tarfile.open(fileobj=buf, mode="w:" + compression) as tar:
        for i in range(n_members):
            data = bytes(rng.randrange(1, 256) for _ in range(700))
            info = tarfile.TarInfo(f"s{i:03d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _end_problem(data: bytes) -> tuple[int, str | None]:
    """Members tarfile yields in stream mode, and what `tar_end_problem` says after them."""
    import io

    from itsim.data.shards.tar import tar_end_problem

    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        n = sum(1 for _ in tar)
        return n, tar_end_problem(tar)


def test_tar_end_check_tells_a_real_end_from_a_cut_a_bad_header_or_a_second_archive():
    import gzip

    healthy = _tar_bytes(6)
    with tarfile.open(fileobj=__import__("io").BytesIO(healthy)) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    assert _end_problem(healthy) == (6, None)
    assert _end_problem(_tar_bytes(6, "gz")) == (6, None)

    bad_header = bytearray(healthy)
    bad_header[offsets[3]:offsets[3] + 100] = b"\xff" * 100
    n, problem = _end_problem(bytes(bad_header))
    assert n == 3 and problem == f"invalid tar header at byte {offsets[3]}; the rest of the shard cannot be read"
    n, problem = _end_problem(gzip.compress(bytes(bad_header)))  # the same check through a decompressing stream
    assert n == 3 and problem.startswith("invalid tar header")

    for cut in (offsets[3], offsets[3] + 200):  # on a header boundary (no end marker), and inside a header
        n, problem = _end_problem(healthy[:cut])
        assert n == 3 and problem == f"cut off at byte {cut} (no end-of-archive marker)"

    n, problem = _end_problem(healthy + _tar_bytes(2))  # tarfile stops at the first archive's end marker
    assert n == 6 and problem.startswith("invalid tar header")


def test_iter_split_counts_a_shard_cut_on_a_member_boundary_as_unreadable_shard_data(tiny_shards, tmp_path, caplog):
    from itsim.data.loader import iter_split

    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    shard = folder / "train-000002.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    per_sample = len(MEMBERS)
    first = len(members) // 2 - (len(members) // 2) % per_sample  # a sample's first member
    cut = members[first]
    assert cut.name.split(".", 1)[0] != members[first - 1].name.split(".", 1)[0]
    shard.write_bytes(shard.read_bytes()[:cut.offset])
    skipped: dict[str, int] = {}
    keys = [s["key"] for s in iter_split(folder, "train", skipped)]
    intact = [s["key"] for s in iter_split(tiny_shards, "train")]
    assert skipped == {"unreadable_shard_data": 1}  # one count for the shard, no incomplete sample
    assert len(keys) == len(intact) - sum(m.name.endswith(".jpg") for m in members[first:])
    assert any("unreadable shard data" in r.getMessage() and "train-000002.tar" in r.getMessage()
               and "no end-of-archive marker" in r.getMessage() for r in caplog.records)


def test_scorer_reader_keeps_the_rows_before_a_corrupt_header_then_one_bad_shard_row(header_damaged_shard,
                                                                                      tiny_shards):
    import pyarrow as pa

    from itsim.score.read import READ_ERROR, ScoreInputs

    with tarfile.open(tiny_shards / header_damaged_shard.name) as tar:
        members = tar.getmembers()
        cut = members[len(members) // 2]
        before = [m for m in members if m.offset < cut.offset]
        whole = {m.name.rsplit(".", 1)[0] for m in before if m.name.endswith(".json")}
        whole -= {cut.name.split(".", 1)[0]}  # the sample the corrupt header cuts in two
        captions = sum(len(json.loads(tar.extractfile(m).read())["captions"]) for m in before
                       if m.name.endswith(".json") and m.name.rsplit(".", 1)[0] in whole)
    (read, _, _), = ScoreInputs([header_damaged_shard], "shards", 1000).read_plan()
    table = pa.concat_tables(list(read()))
    errors = table.column(READ_ERROR).to_pylist()
    assert errors.count(None) == captions and errors[-1] == "bad_shard"
    assert errors.count("bad_shard") == 1 and errors.count("bad_sample") == 1  # the sample cut in two
    assert table.column("shard").to_pylist()[-1] == str(header_damaged_shard)
    assert table.column("row_id").to_pylist() == list(range(table.num_rows))
