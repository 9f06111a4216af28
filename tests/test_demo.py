"""`itsim demo`, the main job, run as a user runs it (a subprocess), reduced to seconds: every output path
of the README's table is written, and the exit code follows --min-accuracy."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pds
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
       "RAY_USAGE_STATS_ENABLED": "0"}
# 60 images (about 48 train, 6 val, 6 test), 32 px, 4 steps: no accuracy floor at this size.
SMALL = ["--images", "60", "--steps", "4", "--image-size", "32", "--workers", "2", "--loader-workers", "1"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("demo") / "demo"
    done = subprocess.run([sys.executable, "-m", "itsim.cli", "demo", "--out", str(out), *SMALL,
                           "--min-accuracy", "0"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    return {"out": out, "done": done}


@pytest.mark.timeout(320)
def test_demo_writes_every_output_of_the_readme_and_exits_0(demo):
    out, done = demo["out"], demo["done"]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "itsim demo finished" in done.stdout and "Traceback" not in done.stderr

    # data/: results.csv (Flickr30k layout) + images/
    data = out / "data"
    header, *rows = (data / "results.csv").read_text().splitlines()
    assert header.replace(" ", "") == "image_name|comment_number|comment" and len(rows) == 60 * 5
    assert len(list((data / "images").glob("*.jpg"))) == 60

    # shards/: train/val/test tars, manifest.json, vocab.json, failures.jsonl
    shards = out / "shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    for split in ("train", "val", "test"):
        names = manifest["splits"][split]["shards"]
        assert names and all((shards / n).is_file() and n.startswith(f"{split}-") for n in names), split
    assert sum(manifest["splits"][s]["images"] for s in ("train", "val", "test")) == 60
    assert manifest["config"]["image_size"] == 32
    assert json.loads((shards / "vocab.json").read_text())
    assert (shards / "failures.jsonl").read_text() == ""  # nothing lost on clean synthetic data

    # run/: config.yaml, metrics.jsonl, checkpoints/, model/ (model.safetensors, config.json, vocab.json)
    run = out / "run"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["steps"] == 4 and cfg["shards"] == str(shards)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r][-1] == 4 and any("val_accuracy" in r for r in lines)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert sorted(p.name for p in (run / "model").iterdir()) == ["config.json", "model.safetensors", "vocab.json"]

    # run/eval/: metrics.json (+ the PNGs when matplotlib is installed)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["n_images"] == manifest["splits"]["val"]["images"]
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0
    if importlib.util.find_spec("matplotlib"):
        for name in ("roc.png", "score_hist.png", "training_curves.png"):
            assert (run / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # scores/: Parquet, every test-split caption with score and error
    scores = pds.dataset(sorted(str(p) for p in (out / "scores").glob("*.parquet")), format="parquet").to_table()
    assert {"score", "error", "caption", "image"} <= set(scores.column_names)
    assert scores.num_rows == 5 * manifest["splits"]["test"]["images"]
    assert scores.column("error").null_count == scores.num_rows

    # demo_summary.json
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["val_balanced_accuracy"] == metrics["balanced_accuracy"]
    assert summary["score"]["rows"] == summary["score"]["scored"] == scores.num_rows
    assert {k: Path(v) for k, v in summary["outputs"].items()} == {
        "data": data, "shards": shards, "run": run, "model": run / "model", "eval": run / "eval",
        "scores": out / "scores"}
    for key in ("synth_s", "shards_s", "train_s", "eval_s", "score_s", "total_s"):
        assert summary[key] > 0, key


def test_the_time_to_quality_benchmark_trains_the_demos_own_recipe(demo):
    """benchmarks/bench_quality.py runs the demo's training recipe by flags; they must stay the demo's."""
    assert demo["done"].returncode == 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_quality
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    saved = yaml.safe_load((demo["out"] / "run" / "config.yaml").read_text())
    for key, value in bench_quality.DEMO_RECIPE.items():
        assert saved[key] == (list(value) if isinstance(value, tuple) else value), key
    assert saved["warmup_steps"] == min(50, saved["steps"] // 10)
    # The reference recipe changes only training choices, never the model sizes or the data.
    assert not set(bench_quality.REFERENCE_RECIPE) & {"channels", "embed_dim", "lstm_hidden", "lstm_layers",
                                                      "text_dim", "image_dim", "head_dim", "batch_size", "seed"}
