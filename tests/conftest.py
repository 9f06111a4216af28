"""Shared fixtures: the optional Flickr8k folder and one local Ray per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = Path(os.environ.get("ITSIM_FLICKR8K", ROOT.parent / "shared" / "data" / "flickr8k"))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
