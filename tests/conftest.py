"""Shared fixtures: the optional Flickr8k folder, one local Ray and one local S3 server per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from s3server import s3, s3_server  # noqa: F401 - the S3 server fixtures, for every test folder

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = Path(os.environ.get("ITSIM_FLICKR8K", ROOT.parent / "shared" / "data" / "flickr8k"))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compute thread per process: tests start many processes (DataLoader workers, Ray actors, ranks) on
# 2 cores, and oversubscribed OpenMP threads spin-wait each other into a 5-10x slowdown.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    if not (FLICKR8K / "captions.txt").exists():
        pytest.skip(f"Flickr8k not found at {FLICKR8K}")
    return FLICKR8K


@pytest.fixture(scope="session")
def ray_local():
    """One local 2-CPU Ray for every test that needs it (ray.init takes seconds)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


# Tiny model flags: a few thousand parameters, so training tests take seconds on 2 CPUs.
TINY_MODEL = ["--channels", "8,16", "--embed-dim", "16", "--lstm-hidden", "16", "--lstm-layers", "1",
              "--text-dim", "32", "--image-dim", "32", "--head-dim", "16"]


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """300 synthetic captioned images (results.csv + images/), made once per test session."""
    from itsim.data.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, 300, seed=0, min_size=96, max_size=160)
    return out


@pytest.fixture(scope="session")
def tiny_shards(synth_data, tmp_path_factory) -> Path:
    """The synthetic images as 32 px shards: 6 train shards, val and test."""
    from itsim.data.shards import ShardConfig, build_shards

    out = tmp_path_factory.mktemp("shards")
    build_shards(ShardConfig(captions=str(synth_data / "results.csv"), images=str(synth_data / "images"),
                             out=str(out), image_size=32, shard_size=45, workers=1, splits=(0.8, 0.1, 0.1)))
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_shards, tmp_path_factory) -> Path:
    """RUN/model of a model trained for 60 steps on `tiny_shards` (about 4 s on one core).

    Two BiLSTM layers and a projected text vector, so everything that handles the text encoder
    (export's unpacked LSTM above all) meets a stacked LSTM and a real projection.
    """
    from itsim.train import TrainConfig, train

    run = tmp_path_factory.mktemp("tiny_run")
    train(TrainConfig(shards=str(tiny_shards), out=str(run), steps=60, batch_size=16, workers=0, threads=1,
                      tensorboard=False, eval_every=0, warmup_steps=5, checkpoint_every=1000, pairs="in-batch",
                      channels=(8, 16), embed_dim=16, lstm_hidden=16, lstm_layers=2, text_dim=24, image_dim=32,
                      head_dim=16))
    return run / "model"
