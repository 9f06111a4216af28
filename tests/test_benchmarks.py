"""The benchmarks at tiny size: every script runs as users run it and writes well-formed numbers.

No timing assertions (benchmarks are not tests): only that each measurement line has its fields and
positive numbers, that ratios agree with their own targets, and that run_all writes its table and
plot. One `run_all.py --tiny` covers the five CPU benchmarks, each as its own process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
FIELDS = ("bench", "run_id", "mode", "time", "load_1m", "cores", "kind", "case", "metric", "unit", "value", "min",
          "max", "spread", "repeats")
MAY_BE_ZERO = {"data wait"}  # a fraction that is legitimately 0 when the data is always ready


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.jsonl"
    cmd = [sys.executable, str(BENCH / "run_all.py"), "--tiny", "--out", str(out), "--cache", str(tmp / "cache"),
           "--results-md", str(tmp / "RESULTS.md"), "--plot", str(tmp / "results.png")]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"tmp": tmp, "records": _lines(out), "stdout": done.stdout}


def _check_record(r: dict) -> None:
    missing = [f for f in FIELDS if f not in r]
    assert not missing, f"{r.get('bench')}/{r.get('case')}: missing {missing}"
    assert r["mode"] == "tiny" and r["cores"] >= 1 and r["load_1m"] >= 0
    assert r["repeats"] >= 1
    if r["metric"] in MAY_BE_ZERO:
        assert 0 <= r["min"] <= r["value"] <= r["max"] <= 1, r
    else:
        assert 0 < r["min"] <= r["value"] <= r["max"], r
    if r["kind"] == "measurement":
        assert len(r["values"]) == r["repeats"] and min(r["values"]) == r["min"]


@pytest.mark.timeout(300)
def test_every_cpu_benchmark_writes_measurements_with_fields_and_positive_numbers(tiny_run):
    records = tiny_run["records"]
    assert len({r["run_id"] for r in records}) == 1  # one run_all, one tag
    by_bench: dict[str, list[dict]] = {}
    for r in records:
        by_bench.setdefault(r["bench"], []).append(r)
    assert set(by_bench) == {"shards", "loader", "train", "eval", "score"}
    for bench, rows in by_bench.items():
        machine = [r for r in rows if r["kind"] == "machine"]
        assert len(machine) == 1 and machine[0]["cpu"] and machine[0]["versions"]["torch"]
        numbers = [r for r in rows if r["kind"] != "machine"]
        assert any(r["kind"] == "measurement" for r in numbers) and any(r["kind"] == "ratio" for r in numbers)
        for r in numbers:
            _check_record(r)
    cases = {(r["bench"], r["case"], r["metric"]) for r in records}
    for expected in [("shards", "itsim build-shards 2 workers", "images/s"), ("shards", "bare PIL loop", "images/s"),
                     ("loader", "reference generator (1 core)", "pairs/s"),
                     ("loader", "itsim loader, workers=2", "pairs/s"),
                     ("train", "itsim in-batch k=7, 32 px", "data wait"),
                     ("train", "reference-style step (PyTorch), 32 px", "pairs/s"),
                     ("eval", "every pair through the model", "retrieval seconds (extrapolated)"),
                     ("score", "Ray job, 2 workers", "rows/s"), ("score", "itsim score driver, 400 rows", "peak RSS")]:
        assert expected in cases, expected


def test_ratios_divide_their_own_measurements_and_judge_their_targets(tiny_run):
    records = tiny_run["records"]
    values = {f"{r['case']} {r['metric']}": r["value"] for r in records if r["kind"] != "ratio"}
    ratios = [r for r in records if r["kind"] == "ratio"]
    assert len([r for r in ratios if r["target"] is not None]) >= 7
    for r in ratios:
        den = values[r["denominator"]] if not r["denominator"].startswith("constant") else \
            float(r["denominator"].split()[1])
        assert r["value"] == pytest.approx(values[r["numerator"]] / (r["scale"] * den), rel=1e-9)
        if r["target"] is not None:
            assert r["met"] == (r["value"] >= r["target"])


def test_run_all_writes_the_results_table_and_the_ratio_plot(tiny_run):
    tmp = tiny_run["tmp"]
    text = (tmp / "RESULTS.md").read_text()
    assert "<!-- run_all:begin -->" in text and "### Targets:" in text and "| shards |" in text
    assert (tmp / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### Every measurement" in tiny_run["stdout"]


def test_results_md_regeneration_keeps_the_hand_written_notes(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import run_all
    finally:
        sys.path.remove(str(BENCH))
    path = tmp_path / "RESULTS.md"
    path.write_text("# Title\n\nintro\n\n<!-- run_all:begin -->\nold table\n<!-- run_all:end -->\n\n## Notes\nkept\n")
    run_all.write_results_md(path, "new table")
    text = path.read_text()
    assert "new table" in text and "old table" not in text
    assert text.startswith("# Title\n\nintro") and text.endswith("## Notes\nkept\n")


@pytest.mark.timeout(120)
def test_gpu_benchmark_runs_on_cpu_at_tiny_size(tmp_path):
    out = tmp_path / "gpu.jsonl"
    cmd = [sys.executable, str(BENCH / "gpu.py"), "--device", "cpu", "--tiny", "--out", str(out),
           "--cache", str(tmp_path / "cache")]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [r for r in _lines(out) if r["kind"] != "machine"]
    for r in records:
        _check_record(r)
    got = {(r["case"], r["metric"]) for r in records}
    for variant in ("resident", "resident+cl", "loader"):
        for metric in ("images/s", "pairs/s", "data wait", "MFU", "peak memory"):
            assert (variant, metric) in got, (variant, metric)
    flops = next(r for r in records if r["metric"] == "training FLOPs per image")
    assert flops["value"] > 1e5  # the tiny model's forward + backward at 32 px
    mfu = next(r for r in records if r["metric"] == "MFU")
    assert mfu["params"]["flops_per_image"] == flops["value"] and mfu["params"]["matmul_peak_flops"] > 0


@pytest.mark.timeout(120)
def test_breakdown_splits_each_stage_into_positive_parts(tmp_path):
    out = tmp_path / "breakdown.jsonl"
    cmd = [sys.executable, str(BENCH / "breakdown.py"), "--tiny", "--out", str(out), "--cache", str(tmp_path / "c")]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [r for r in _lines(out) if r["kind"] != "machine"]
    for r in records:
        _check_record(r)
    prefixes = {r["case"].split(":")[0] for r in records}
    assert prefixes == {"shards", "loader", "train step part", "score"}


# Every field of benchmarks/gpu_check.py's JSON and the type it must have (bool | None: not applicable on CPU).
GPU_CHECK_FIELDS = {
    "device": {"name": str, "type": str, "dtype": str, "matmul_peak_flops": float, "torch": str},
    "config": {"mode": str, "image_size": int, "batch_size": int, "steps": int, "images": int, "loader_workers": int,
               "load_1m": float},
    "lstm": {"autocast": str, "captions": int, "param_dtypes": list, "activation_dtypes": list, "grad_dtypes": list,
             "all_fp32": bool},
    "sync": {"checked": bool, "ok": (bool, type(None)), "error": (str, type(None))},
    "resume": {"steps": int, "killed_after_checkpoint": int, "killed_before_end": bool, "resumed": bool,
               "max_abs_diff": float, "max_abs_value": float, "tolerance": float, "within_tolerance": bool},
    "scoring": {"pairs": int, "k": int, "device": str, "topk_agreement": float, "max_abs_diff": float,
                "pair_scores_max_abs_diff": float},
    "ray": {"rows": int, "scored": int, "rows_per_s": float, "job_seconds": float, "workers": int,
            "gpus_per_worker": float, "cpus_per_worker": float},
    "checks": {"lstm_fp32": bool, "loss_decreased": bool, "resume_within_tolerance": bool,
               "no_host_sync": (bool, type(None))},
}
TRAIN_FIELDS = {"steps": int, "images_per_s": float, "mfu": float, "data_wait": float, "loss_first": float,
                "loss_last": float, "loss_decreased": bool}


@pytest.mark.timeout(900)
def test_gpu_check_runs_on_cpu_at_tiny_size_and_writes_every_field(tmp_path):
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), "--tiny", "--out", str(out), "--cache", str(tmp_path / "cache")]
    done = subprocess.run(cmd, cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=880)
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(out.read_text())

    def check(section: dict, fields: dict, where: str) -> None:
        for name, kind in fields.items():
            assert name in section, f"{where}.{name} missing"
            value = section[name]
            ok = isinstance(value, kind) or (kind is float and isinstance(value, int) and not isinstance(value, bool))
            assert ok, f"{where}.{name} = {value!r} is not {kind}"

    for section, fields in GPU_CHECK_FIELDS.items():
        check(r[section], fields, section)
    assert set(r["train"]) == {"streaming", "resident"}
    for name, m in r["train"].items():
        check(m, TRAIN_FIELDS, f"train.{name}")
        assert m["steps"] == r["config"]["steps"] and m["images_per_s"] > 0 and 0 < m["mfu"] < 1
        assert 0 <= m["data_wait"] <= 1 and m["loss_first"] > 0 and m["loss_last"] > 0
    assert r["flops_per_image"] > 1e5 and r["device"]["matmul_peak_flops"] > 0 and r["seconds"] > 0
    assert r["config"]["mode"] == "tiny" and r["device"]["dtype"] == "fp32"
    assert r["lstm"]["all_fp32"] and r["lstm"]["param_dtypes"] == ["torch.float32"]
    assert r["resume"]["within_tolerance"] and r["resume"]["max_abs_diff"] == 0.0  # CPU fp32: bit-exact
    assert r["scoring"]["topk_agreement"] == 1.0 and r["scoring"]["pairs"] >= 20
    assert r["ray"]["rows"] == r["ray"]["scored"] > 0 and r["ray"]["rows_per_s"] > 0
    assert r["sync"] == {"checked": False, "ok": None, "error": "no CUDA device"}
    table = out.with_suffix(".md").read_text()
    assert "| streaming |" in table and "| resident |" in table and "kill + resume" in table
