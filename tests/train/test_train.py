"""The trainer as users run it: real shards, real processes, real signals."""
from __future__ import annotations

import json
import math
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
from itsim.errors import UserError
from itsim.train import checkpoint

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _train_cmd(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "itsim.cli", "train", "--shards", str(shards), "--out", str(out),
            "--batch-size", "16", "--workers", "2", "--log-every", "2", "--eval-every", "0", "--warmup-steps", "2",
            "--no-tensorboard", *TINY_MODEL, *extra]


def _params(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def test_short_training_run_beats_chance_on_synthetic_val(tiny_shards, tmp_path):
    from itsim.train import TrainConfig, train

    summary = train(TrainConfig(shards=str(tiny_shards), out=str(tmp_path / "run"), steps=300, batch_size=32,
                                lr=3e-3, warmup_steps=15, pairs="in-batch", workers=1, eval_every=0, log_every=50,
                                tensorboard=False, channels=(16, 32, 64), embed_dim=32, lstm_hidden=32,
                                lstm_layers=1, text_dim=64, image_dim=64, head_dim=64, fusion="concat_product",
                                cnn_dropout=0.0, lstm_dropout=0.0, head_dropout=0.0))
    assert summary["val_accuracy"] > 0.62, summary
    assert summary["val_roc_auc"] > 0.72, summary
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in lines if "loss" in r]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert {"step", "loss", "lr", "train_acc", "images_per_s", "pairs_per_s", "data_wait"} <= set(train_rows[0])
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_mixed_precision_auto_is_fp32_on_cpu_and_the_lstm_stays_fp32_even_under_bf16(tiny_shards, tmp_path,
                                                                                      monkeypatch, caplog):
    """README: on CPU `--mixed-precision auto` trains in fp32, and the LSTM always runs in fp32 (oneDNN
    has no low-precision LSTM), also when bf16 autocast is on for the rest of the model."""
    import logging

    from itsim.model import ItsimModel, ModelConfig
    from itsim.train import TrainConfig, train
    from itsim.train.runtime import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # the claim is about CPU, also on a machine with a GPU
    tiny = dict(channels=(8,), embed_dim=8, lstm_hidden=8, lstm_layers=1, text_dim=16, image_dim=16, head_dim=8)

    def forward_dtypes(precision: str) -> dict[str, torch.dtype]:
        accelerator, _ = make_accelerator(TrainConfig(out=str(tmp_path / precision), mixed_precision=precision,
                                                      tensorboard=False))
        assert accelerator.device.type == "cpu" and accelerator.mixed_precision == (
            "no" if precision == "auto" else precision)
        torch.manual_seed(0)
        model = accelerator.prepare(ItsimModel(ModelConfig(vocab_size=30, **tiny)))
        seen: dict[str, torch.dtype] = {}
        hooks = [model.image_encoder.features[0].register_forward_hook(
                     lambda m, i, o: seen.__setitem__("conv", o.dtype)),
                 model.text_encoder.lstm.register_forward_hook(
                     lambda m, i, o: seen.update(lstm_in=i[0].data.dtype, lstm_out=o[1][0].dtype)),
                 model.fusion.net[0].register_forward_hook(lambda m, i, o: seen.__setitem__("head", o.dtype))]
        images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
        ids, lengths = torch.randint(2, 30, (4, 6)), torch.tensor([6, 3, 1, 5])
        with accelerator.autocast():
            logits = model(images, ids, lengths)
        for h in hooks:
            h.remove()
        seen["params"] = {p.dtype for p in model.parameters()}.pop()
        seen["logits"] = logits.dtype
        return seen

    auto = forward_dtypes("auto")
    assert auto == {"conv": torch.float32, "lstm_in": torch.float32, "lstm_out": torch.float32,
                    "head": torch.float32, "params": torch.float32, "logits": torch.float32}
    bf16 = forward_dtypes("bf16")
    assert bf16["conv"] == torch.bfloat16  # autocast really is on for the CNN ...
    assert bf16["lstm_in"] == bf16["lstm_out"] == torch.float32  # ... and off for the LSTM

    # The trainer itself with the default (auto): fp32 training, fp32 weights exported.
    caplog.set_level(logging.INFO)
    train(TrainConfig(shards=str(tiny_shards), out=str(tmp_path / "run"), steps=1, batch_size=8, workers=0,
                      eval_every=0, val_split="none", tensorboard=False, **tiny))
    assert "mixed precision no" in caplog.text
    weights = _params(tmp_path / "run")
    assert {t.dtype for k, t in weights.items() if not k.endswith("num_batches_tracked")} == {torch.float32}


def test_keep_prunes_to_exactly_the_newest_n_checkpoints(tiny_shards, tmp_path):
    from itsim.train import TrainConfig, train

    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    tiny = dict(batch_size=8, workers=0, eval_every=0, val_split="none", tensorboard=False, channels=(8,),
                embed_dim=8, lstm_hidden=8, lstm_layers=1, text_dim=16, image_dim=16, head_dim=8)
    train(TrainConfig(shards=str(tiny_shards), out=str(run), steps=7, checkpoint_every=2, keep=2, **tiny))
    # Saved at steps 2, 4, 6 and 7 (the last step); the two newest remain, and nothing else.
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000006", "step_0000007"]
    for folder in checkpoint.list_checkpoints(ckpts):
        checkpoint.verify(folder)
    # A resumed run with --keep 1 prunes what the earlier run left, too.
    train(TrainConfig(shards=str(tiny_shards), out=str(run), steps=10, checkpoint_every=2, keep=1, resume="auto",
                      **tiny))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000010"]
    assert checkpoint.verify(ckpts / "step_0000010")["step"] == 10


def test_bf16_mixed_precision_runs_on_cpu(tiny_shards, tmp_path):
    from itsim.train import TrainConfig, train

    summary = train(TrainConfig(shards=str(tiny_shards), out=str(tmp_path / "run"), steps=3, batch_size=8,
                                mixed_precision="bf16", workers=0, tensorboard=False, channels=(8,), embed_dim=8,
                                lstm_hidden=8, lstm_layers=3, text_dim=16, image_dim=16, head_dim=8))
    assert summary["step"] == 3 and (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("pairs,negatives,per_image,pairs_per_image", [
    ("balanced", "random", 0, 5), ("balanced", "random", 1, 1), ("in-batch", "random", 0, 5 + 3),
    ("in-batch", "hard", 2, 2 + 3)])
def test_pairs_per_image_follow_the_pair_mode_and_captions_per_image(tiny_shards, tmp_path, pairs, negatives,
                                                                     per_image, pairs_per_image):
    from itsim.train import TrainConfig, train

    train(TrainConfig(shards=str(tiny_shards), out=str(tmp_path / "run"), steps=2, batch_size=8, pairs=pairs,
                      negatives=negatives, negatives_k=3, captions_per_image=per_image, workers=0, eval_every=0,
                      log_every=1, val_split="none", tensorboard=False, channels=(8,), embed_dim=8, lstm_hidden=8,
                      lstm_layers=1, text_dim=16, image_dim=16, head_dim=8))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    for r in rows:  # tiny shards: 5 captions per image
        assert r["pairs_per_s"] / r["images_per_s"] == pytest.approx(pairs_per_image, rel=1e-3)


def test_bad_negatives_k_or_captions_per_image_is_a_clear_error(tiny_shards, tmp_path):
    done = subprocess.run(_train_cmd(tiny_shards, tmp_path / "r", "--captions-per-image", "-1"), env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--captions-per-image" in done.stderr and "Traceback" not in done.stderr


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stdout.read() if proc.stdout else ''}")
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("data", ["streaming", "on-device"])
def test_resume_after_sigkill_ends_with_the_same_parameters(tiny_shards, tmp_path, data):
    steps = ["--steps", "12", "--checkpoint-every", "3", *(["--data-on-device"] if data == "on-device" else [])]
    subprocess.run(_train_cmd(tiny_shards, tmp_path / "a", *steps), check=True, env=ENV, capture_output=True)

    proc = subprocess.Popen(_train_cmd(tiny_shards, tmp_path / "b", *steps), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for(tmp_path / "b" / "checkpoints" / "step_0000003", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "model").exists()
    done = subprocess.run(_train_cmd(tiny_shards, tmp_path / "b", *steps, "--resume", "auto"), env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst == 0.0, f"largest parameter difference {worst}"


@pytest.mark.slow
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_zero(tiny_shards, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(tiny_shards, run, "--steps", "100000", "--checkpoint-every", "100000"),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(run / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    found = checkpoint.list_checkpoints(run / "checkpoints")
    assert len(found) == 1
    state = checkpoint.verify(found[0])
    assert 0 < state["step"] < 100000
    assert state["step"] % 2 == 0  # the ranks agree on stopping at log steps (--log-every 2) only


def test_resume_auto_ignores_incomplete_and_corrupt_checkpoints(tiny_shards, tmp_path, caplog):
    from itsim.train import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(shards=str(tiny_shards), out=str(run), steps=6, checkpoint_every=2, keep=5, batch_size=8,
                      workers=0, tensorboard=False, channels=(8,), embed_dim=8, lstm_hidden=8, lstm_layers=1,
                      text_dim=16, image_dim=16, head_dim=8))
    ckpts = run / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(ckpts)] == ["step_0000002", "step_0000004", "step_0000006"]
    # A half-written folder (killed during a save) and a truncated newest checkpoint.
    (ckpts / ".tmp-step_0000008").mkdir()
    (ckpts / ".tmp-step_0000008" / "model.safetensors").write_bytes(b"partial")
    newest = ckpts / "step_0000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    (ckpts / "step_0000004" / "optimizer.bin").write_bytes(b"garbage bytes")
    path, state = checkpoint.find_resume(ckpts, "auto")
    assert path.name == "step_0000002" and state["step"] == 2
    assert "step_0000006" in caplog.text and "step_0000004" in caplog.text
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.find_resume(ckpts, str(ckpts / "step_0000006"))
    with pytest.raises(UserError, match="no such checkpoint"):
        checkpoint.find_resume(ckpts, str(ckpts / "step_0000099"))


@pytest.mark.slow
def test_two_processes_train_in_sync_on_disjoint_data_with_one_checkpoint_writer(tiny_shards, tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "train_then_report.py"  # `-m itsim.train`, then whether the process group was ended
    script.write_text(TRAIN_THEN_REPORT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
           str(script), *_train_cmd(tiny_shards, run, "--steps", "6", "--checkpoint-every", "3",
                                    "--audit", "--workers", "1")[4:]]
    done = subprocess.run(cmd, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # With no tracker (--no-tensorboard) the trainer still ends the process group: a rank that exits with
    # it alive can abort in gloo's/NCCL's destructors.
    assert done.stdout.count("process group alive after train: False") == 2, done.stdout[-2000:]
    audits = [[json.loads(x) for x in (run / "audit" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    checksums = {a[-1]["param_checksum"] for a in audits}
    assert len(checksums) == 1, "parameters differ between ranks"
    keys = [{k for row in a[:-1] for k in row["keys"]} for a in audits]
    assert keys[0] and keys[1] and not keys[0] & keys[1], "ranks trained on the same images"
    # Every checkpoint of the run holds exactly one copy of the shared state (written by the main
    # process) and exactly one RNG file per rank; nothing else is left in the checkpoint folder.
    ckpts = run / "checkpoints"
    saved = checkpoint.list_checkpoints(ckpts)
    assert [p.name for p in saved] == ["step_0000003", "step_0000006"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000003", "step_0000006"]  # no .tmp-*, no extras
    for folder in saved:
        assert sorted(p.name for p in folder.iterdir()) == [
            "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
            checkpoint.STATE_FILE], folder.name
        state = checkpoint.verify(folder)  # every file as the main process hashed it after both ranks wrote
        assert sorted(state["files"]) == ["model.safetensors", "optimizer.bin", "random_states_0.pkl",
                                          "random_states_1.pkl"]
        assert state["world_size"] == 2 and state["step"] == int(folder.name.split("_")[1])
    # The one writer saved the synchronised parameters: the last checkpoint is the exported model.
    last, exported = load_file(str(saved[-1] / "model.safetensors")), _params(run)
    assert sorted(last) == sorted(exported) and all(torch.equal(last[k], exported[k]) for k in exported)


TRAIN_THEN_REPORT = """
import sys
import torch.distributed
from itsim.cli import main

code = main(["train", *sys.argv[1:]])
print("process group alive after train:", torch.distributed.is_initialized(), flush=True)
sys.exit(code)
"""

CHOOSER = """
import json, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from itsim.errors import UserError
from itsim.train.checkpoint import choose_resume

base = Path(sys.argv[1])
acc = Accelerator()
rank = acc.process_index
out = {}
# Each rank lists its own folder: rank 1 sees a newer checkpoint than rank 0 (as NFS attribute caching can make it).
found = choose_resume(acc, base / f"view{rank}", "auto")
out["auto"] = [str(found[0]), found[1]["step"]]
try:  # a bad --resume path on the main process reaches every rank as the same error, nobody hangs
    choose_resume(acc, base / f"view{rank}", str(base / "missing" if rank == 0 else base / "view1" / "step_0000006"))
    out["error"] = None
except UserError as exc:
    out["error"] = str(exc)
(base / f"rank{rank}.json").write_text(json.dumps(out))
acc.wait_for_everyone()
torch.distributed.destroy_process_group()  # else gloo's threads can abort the exit ("terminate called ...")
"""


def _fake_checkpoint(folder: Path, step: int) -> None:
    """A complete checkpoint folder as `verify` checks it: one file and its recorded checksum."""
    from itsim.io import sha256_file

    path = folder / checkpoint.checkpoint_name(step)
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights %d" % step)
    (path / checkpoint.STATE_FILE).write_text(json.dumps(
        {"step": step, "files": {"model.safetensors": sha256_file(path / "model.safetensors")}}))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_choice_is_made_by_rank_0_and_broadcast_when_ranks_see_different_checkpoints(tmp_path):
    for step in (2, 4):
        _fake_checkpoint(tmp_path / "view0", step)
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path / "view1", step)
    script = tmp_path / "choose.py"
    script.write_text(CHOOSER)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           str(script), str(tmp_path)]
    done = subprocess.run(cmd, env={**ENV, "ACCELERATE_USE_CPU": "1", "HF_HOME": str(tmp_path / "hf")},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert r["auto"] == [str(tmp_path / "view0" / "step_0000004"), 4]  # rank 0's choice on both ranks
        assert r["error"] and "no such checkpoint folder" in r["error"]
    assert results[0]["error"] == results[1]["error"]


def test_data_on_device_is_refused_when_the_split_exceeds_the_budget(tiny_shards, tmp_path):
    done = subprocess.run(_train_cmd(tiny_shards, tmp_path / "run", "--steps", "2", "--data-on-device",
                                     "--device-memory-gb", "0.0001"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--data-on-device: the train split needs" in done.stderr and "--device-memory-gb 0.0001" in done.stderr


def test_world_size_without_distributed_launch_is_refused(tiny_shards, tmp_path):
    done = subprocess.run(_train_cmd(tiny_shards, tmp_path / "run", "--steps", "2"),
                          env={**ENV, "WORLD_SIZE": "2"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "WORLD_SIZE=2" in done.stderr and "Traceback" not in done.stderr


def test_cpu_threads_come_from_the_flag_then_omp_num_threads_then_the_cores_per_rank(monkeypatch):
    from itsim.train import TrainConfig
    from itsim.train.runtime import cpu_threads as _cpu_threads

    cpus = len(os.sched_getaffinity(0))
    assert _cpu_threads(TrainConfig(threads=3), 1) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _cpu_threads(TrainConfig(), 1) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert _cpu_threads(TrainConfig(workers=2), 1) == cpus
    assert _cpu_threads(TrainConfig(), 2) == max(1, cpus // 2)


def test_cudnn_autotuning_is_set_for_cuda_devices_only():
    """Training shapes are fixed, so cuDNN's algorithm search pays back; setting the flag needs no GPU."""
    from itsim.train.runtime import configure_backends

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        configure_backends(torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False
        configure_backends(torch.device("cuda", 0))
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


def _tiny_cfg(tiny_shards, out: Path, **kw):
    from itsim.train import TrainConfig

    args = dict(shards=str(tiny_shards), out=str(out), steps=12, batch_size=16, workers=1, eval_every=0,
                log_every=1000, warmup_steps=2, tensorboard=False, channels=(8, 16), embed_dim=16, lstm_hidden=16,
                lstm_layers=2, text_dim=32, image_dim=32, head_dim=16, augment="crop,flip")
    args.update(kw)
    return TrainConfig(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pairs,negatives,extra", [
    ("balanced", "random", {}), ("in-batch", "hard", {}), ("in-batch", "random", {"channels_last": True}),
    ("in-batch", "hard", {"data_on_device": True})])
def test_training_steps_never_wait_for_the_gpu(tiny_shards, tmp_path, pairs, negatives, extra):
    """Between log steps a training step issues no host-GPU synchronisation: lengths stay on the host,
    loss and accuracy stay on the device, the stop flag is read at log steps only. Two warm-up steps
    (cuDNN autotuning, allocator growth), then three steps with torch's sync debug mode set to error."""
    from itsim.train.loop import Window, add_to_window, setup, train_step

    run = setup(_tiny_cfg(tiny_shards, tmp_path / "run", pairs=pairs, negatives=negatives, **extra))
    run.model.train()
    batches, window = iter(run.loader), Window()
    for i in range(2):
        add_to_window(window, *train_step(run, next(batches), i), 16, 0.0, 1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2, 5):
            add_to_window(window, *train_step(run, next(batches), i), 16, 0.0, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(float(window.loss)) and float(window.correct) > 0
