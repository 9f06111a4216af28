"""Experiment trackers (`--report-to`): real TensorBoard event files read back with TensorBoard's own
reader, a tracker that really fails to start, W&B offline when it is installed."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_MODEL
from itsim.train import TrainConfig, train
from itsim.train.trackers import flat_config, resolve

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TINY = dict(channels=(8,), embed_dim=8, lstm_hidden=8, lstm_layers=1, text_dim=16, image_dim=16, head_dim=8)


def _cmd(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "itsim.cli", "train", "--shards", str(shards), "--out", str(out), "--steps", "6",
            "--batch-size", "8", "--workers", "0", "--log-every", "2", "--eval-every", "3", "--warmup-steps", "2",
            "--val-max-images", "20", *TINY_MODEL, *extra]


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_file_has_loss_lr_and_val_metrics_at_their_steps(tiny_shards, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    done = subprocess.run(_cmd(tiny_shards, run, "--report-to", "tensorboard"), env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ValueError" not in done.stderr and "logging to tensorboard" in done.stderr
    scalars = _scalars(run / "tb" / "itsim")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for tag in ("loss", "lr", "train_acc", "images_per_s", "data_wait"):
        assert [s for s, _ in scalars[tag]] == [2, 4, 6], tag
    for tag in ("val_loss", "val_accuracy", "val_roc_auc"):
        assert [s for s, _ in scalars[tag]] == [3, 6], tag
    want = {(r["step"], k): v for r in rows for k, v in r.items() if k != "step"}
    for tag, events in scalars.items():
        for step, value in events:
            assert value == pytest.approx(want[step, tag], rel=1e-5, abs=1e-7), (tag, step)
    # The config with its tuple (channels) went in as hyperparameters instead of crashing add_hparams.
    (hparams,) = (run / "tb" / "itsim").glob("*/hparams.yml")
    text = hparams.read_text()
    assert "channels: 8,16" in text and "resume: ''" in text and "tensorboard: none" in text


def test_defaults_log_to_tensorboard_when_installed_and_the_alias_turns_it_off(tiny_shards, tmp_path):
    base = dict(shards=str(tiny_shards), steps=2, batch_size=8, workers=0, eval_every=0, log_every=1, **TINY)
    train(TrainConfig(out=str(tmp_path / "auto"), **base))  # report_to="auto", channels a tuple
    has_tb = importlib.util.find_spec("tensorboard") is not None
    assert bool(list((tmp_path / "auto" / "tb").glob("itsim/events.out.tfevents.*"))) == has_tb
    train(TrainConfig(out=str(tmp_path / "off"), tensorboard=False, **base))
    train(TrainConfig(out=str(tmp_path / "none"), report_to="none", **base))
    assert not (tmp_path / "off" / "tb").exists() and not (tmp_path / "none" / "tb").exists()
    for name in ("auto", "off", "none"):
        assert (tmp_path / name / "model" / "model.safetensors").is_file()


def test_report_to_and_the_tensorboard_alias_resolve_to_installed_trackers(caplog):
    has = {m: importlib.util.find_spec(m) is not None for m in ("tensorboard", "wandb", "mlflow")}
    tb = ["tensorboard"] if has["tensorboard"] else []
    assert resolve(TrainConfig(report_to="auto")) == tb
    assert resolve(TrainConfig(report_to="none")) == []
    assert resolve(TrainConfig(report_to="none", tensorboard=True)) == tb
    assert resolve(TrainConfig(report_to="tensorboard", tensorboard=False)) == []
    assert resolve(TrainConfig(report_to="all")) == [m for m in ("tensorboard", "wandb", "mlflow") if has[m]]
    with pytest.raises(ValueError, match="comet"):
        resolve(TrainConfig(report_to="tensorboard,comet"))
    with pytest.raises(ValueError, match="stand alone"):
        resolve(TrainConfig(report_to="all,wandb"))


def test_config_values_are_flattened_to_what_every_tracker_accepts():
    flat = flat_config({"channels": [32, 64, 128], "splits": (0.8, 0.2), "resume": None, "lr": 1e-3, "on": True,
                        "name": "x", "steps": 5, "nested": {"b": 1, "a": 2}})
    assert flat == {"channels": "32,64,128", "splits": "0.8,0.2", "resume": "none", "lr": 1e-3, "on": True,
                    "name": "x", "steps": 5, "nested": '{"a": 2, "b": 1}'}


def test_a_tracker_that_fails_to_start_is_one_warning_and_training_goes_on(tiny_shards, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    run.mkdir()
    (run / "tb").write_text("a file where TensorBoard's folder should go")  # SummaryWriter cannot makedirs
    done = subprocess.run(_cmd(tiny_shards, run, "--report-to", "tensorboard"), env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "tracker tensorboard did not start" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "Traceback" not in done.stderr
    assert (run / "model" / "model.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 5  # 3 log steps + 2 validations


def test_mlflow_is_accepted_and_a_clear_warning_when_not_installed(tiny_shards, tmp_path):
    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here: the not-installed warning cannot be shown")
    done = subprocess.run(_cmd(tiny_shards, tmp_path / "run", "--report-to", "mlflow"), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--report-to mlflow: mlflow is not installed (pip install mlflow)" in done.stderr
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_unknown_tracker_is_a_one_line_error(tiny_shards, tmp_path):
    done = subprocess.run(_cmd(tiny_shards, tmp_path / "run", "--report-to", "comet"), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--report-to 'comet'" in done.stderr and "Traceback" not in done.stderr


def test_wandb_offline_writes_its_run_folder(tiny_shards, tmp_path):
    pytest.importorskip("wandb")  # not in the dev extras (heavy); runs where it is installed
    run = tmp_path / "run"
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run(_cmd(tiny_shards, run, "--report-to", "wandb"), env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "did not start" not in done.stderr and "failed to log" not in done.stderr
    (folder,) = (run / "wandb").glob("offline-run-*")
    assert list(folder.glob("*.wandb")), sorted(p.name for p in folder.iterdir())
