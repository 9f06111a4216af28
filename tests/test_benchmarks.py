"""The benchmarks at tiny size: every script runs as users run it and writes well-formed numbers.

No timing assertions (benchmarks are not tests): only that each measurement line has its fields and
positive numbers, that every ratio divides two measurements of the same run (never a constant) and
agrees with its own target, that the bare training loop does exactly itsim's step's work, and that
run_all writes its table and plot. One `run_all.py --tiny` covers every CPU benchmark, each as its own
process.
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
MAY_BE_NEGATIVE = {"overhead"}  # itsim may be the faster side
BENCHES = {"shards", "loader", "storage", "train", "quality", "eval", "score", "breakdown"}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.jsonl"
    cmd = [sys.executable, str(BENCH / "run_all.py"), "--tiny", "--out", str(out), "--cache", str(tmp / "cache"),
           "--results-md", str(tmp / "RESULTS.md"), "--plot", str(tmp / "results.png")]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"tmp": tmp, "records": _lines(out), "stdout": done.stdout}


def _check_record(r: dict) -> None:
    missing = [f for f in FIELDS if f not in r]
    assert not missing, f"{r.get('bench')}/{r.get('case')}: missing {missing}"
    assert r["mode"] == "tiny" and r["cores"] >= 1 and r["load_1m"] >= 0
    if r["kind"] == "not_measured":  # said so, with why; no number stands in for it
        assert r["value"] is None and r["repeats"] == 0 and r["reason"], r
        return
    assert r["repeats"] >= 1
    if r["metric"] in MAY_BE_NEGATIVE:
        assert r["min"] <= r["value"] <= r["max"], r
    elif r["metric"] in MAY_BE_ZERO:
        assert 0 <= r["min"] <= r["value"] <= r["max"] <= 1, r
    else:
        assert 0 < r["min"] <= r["value"] <= r["max"], r
    if r["kind"] == "measurement":
        assert len(r["values"]) == r["repeats"] and min(r["values"]) == r["min"]


@pytest.mark.timeout(600)
def test_every_cpu_benchmark_writes_measurements_with_fields_and_positive_numbers(tiny_run):
    records = tiny_run["records"]
    assert len({r["run_id"] for r in records}) == 1  # one run_all, one tag
    by_bench: dict[str, list[dict]] = {}
    for r in records:
        by_bench.setdefault(r["bench"], []).append(r)
    assert set(by_bench) == BENCHES
    for bench, rows in by_bench.items():
        machine = [r for r in rows if r["kind"] == "machine"]
        assert len(machine) == 1 and machine[0]["cpu"] and machine[0]["versions"]["torch"]
        numbers = [r for r in rows if r["kind"] != "machine"]
        assert any(r["kind"] == "measurement" for r in numbers)
        assert any(r["kind"] == "ratio" for r in numbers) == (bench != "breakdown")  # breakdown: parts, no baseline
        for r in numbers:
            _check_record(r)
    cases = {(r["bench"], r["case"], r["metric"]) for r in records}
    for expected in [("shards", "itsim build-shards 2 workers", "images/s"), ("shards", "bare PIL loop", "images/s"),
                     ("loader", "reference generator (1 core)", "decoded images/s"),
                     ("loader", "itsim loader, workers=0 (1 core)", "decoded images/s"),
                     ("loader", "itsim loader, workers=2", "pairs/s"),
                     ("storage", "loader from local disk, workers=2", "decoded images/s"),
                     ("storage", "loader from S3 (local moto server), workers=2", "decoded images/s"),
                     ("train", "itsim train, in-batch k=7, 32 px", "images/s"),
                     ("train", "itsim train, in-batch k=7, 32 px", "data wait"),
                     ("train", "bare PyTorch loop, same work, in-batch k=7, 32 px", "images/s"),
                     ("train", "itsim train overhead over the bare loop, in-batch k=7, 32 px", "overhead"),
                     ("train", "reference-style step (PyTorch), 32 px", "pairs/s"),
                     ("train", "reference design in Keras/TensorFlow, 32 px", "pairs/s"),
                     ("quality", "synthetic (40 images, 32 px): itsim recipe", "best val accuracy"),
                     ("quality", "synthetic (40 images, 32 px): reference recipe", "best val accuracy"),
                     ("quality", "Flickr8k (96 px)", "seconds to the same val accuracy"),
                     ("eval", "every pair through the model", "retrieval seconds (extrapolated)"),
                     ("eval", "encode once: head over every pair, concat_product head", "seconds"),
                     ("score", "Ray job, 2 workers", "rows/s"), ("score", "itsim score driver, 400 rows", "peak RSS"),
                     ("breakdown", "shards: tar member headers, write_shard's template", "us per image (4 headers)"),
                     ("breakdown", "shards: tar member headers, tarfile.TarInfo.tobuf", "us per image (4 headers)")]:
        assert expected in cases, expected
    # The targets as defined: equal-work training overhead, time to the same accuracy, decoded images/s.
    targets = {(r["bench"], r["case"]): r["target"] for r in records if r.get("target") is not None}
    assert targets[("train", "itsim train vs bare PyTorch loop (equal work), in-batch k=7, 32 px")] == 0.952
    assert targets[("quality", "synthetic (40 images, 32 px): time to the same val accuracy, reference recipe / "
                               "itsim recipe")] == 5.0
    assert targets[("loader", "decoded images/s, itsim loader vs reference generator, 1 core vs 1 core")] == 1.0
    assert targets[("storage", "decoded images/s, loader from S3 vs from local disk, 2 workers")] == 0.8
    assert not [c for b, c in targets if b == "loader" and "pairs/s" in c]  # pairs/s is information only
    quality = [r for r in records if r["bench"] == "quality" and r["metric"].startswith("seconds to val accuracy")]
    assert len(quality) == 2 and len({r["metric"] for r in quality}) == 1  # both timed to the same level
    prefixes = {r["case"].split(":")[0] for r in records if r["bench"] == "breakdown" and r["kind"] != "machine"}
    assert prefixes == {"shards", "loader", "train step part", "score"}


def test_ratios_divide_their_own_measurements_and_judge_their_targets(tiny_run):
    records = tiny_run["records"]
    values = {f"{r['case']} {r['metric']}": r["value"] for r in records if r["kind"] != "ratio"}
    ratios = [r for r in records if r["kind"] == "ratio"]
    assert len([r for r in ratios if r["target"] is not None]) >= 7
    for r in ratios:
        assert r["denominator"] in values and r["numerator"] in values, r  # two measurements of this run
        den = values[r["denominator"]]
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


def test_the_bare_training_loop_does_exactly_itsims_step_work(tiny_shards):
    """bench_train's equal-work baseline: on the same batch, model and step, its loss and pairs are those of
    the trainer's own objective (itsim.train.objective.step_loss), and one step of each moves the weights alike."""
    import copy

    import torch

    sys.path.insert(0, str(BENCH))
    try:
        import bench_train
    finally:
        sys.path.remove(str(BENCH))
    from itsim.data.pairs import step_generator
    from itsim.model import ItsimModel, ModelConfig, images_to_float
    from itsim.text import Vocab
    from itsim.train import TrainConfig
    from itsim.train.objective import step_loss

    batch = bench_train.decoded_batches(tiny_shards, 1)[0]
    vocab = Vocab.load(tiny_shards / "vocab.json")
    for pairs in ("in-batch", "balanced"):
        torch.manual_seed(0)
        model = ItsimModel(ModelConfig(vocab_size=len(vocab), cnn_dropout=0.0, lstm_dropout=0.0, head_dropout=0.0,
                                       **{k: v for k, v in bench_train.common.TINY_MODEL.items()})).train()
        twin = copy.deepcopy(model)
        prepared = bench_train.bare_prepare(batch, pairs, step=3)
        cfg = TrainConfig(pairs=pairs, negatives_k=bench_train.K)
        loss, _, n_pairs = step_loss(twin, images_to_float(batch["images"]), batch, cfg, step_generator(0, 3, 0))
        assert n_pairs == prepared[3].shape[0]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
        bare_loss = bench_train.bare_step(model, opt, prepared)
        assert bare_loss.item() == pytest.approx(loss.item(), rel=1e-6)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=1e-4)
        twin_opt.step()
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            assert torch.allclose(a, b, atol=1e-6), name


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
