"""Shared parts of the benchmarks: sizes per mode, cached inputs, repeat timing, JSON lines, tables.

Every benchmark measures itsim and its baseline in the same process run, interleaving their repeats
where it can, so a neighbour's load on this shared machine hits both sides alike. One JSON line per
measurement (median, min, max, every repeat) carries the load average it ran under, so a reader can
tell a quiet measurement from a noisy one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:  # `python benchmarks/bench_x.py` from a checkout without `pip install -e`
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = BENCH_DIR / "results.jsonl"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "itsim-bench-cache"
MODES = ("tiny", "quick", "full")
# Tiny model flags (as in tests/conftest.py): a few thousand parameters.
TINY_MODEL = {"channels": (8, 16), "embed_dim": 16, "lstm_hidden": 16, "lstm_layers": 1, "text_dim": 32,
              "image_dim": 32, "head_dim": 16}

log = logging.getLogger("bench")


# ---- command line ------------------------------------------------------------------------------

def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats (a few minutes at most)")
    size.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds; numbers mean nothing)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON lines appended here (default: {DEFAULT_OUT})")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help="folder for generated images and shards, reused between runs (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default: per mode)")
    p.add_argument("--run-id", default=None, help="tag shared by the lines of one run_all (default: new)")
    return p


def mode_of(args: argparse.Namespace) -> str:
    return "tiny" if args.tiny else "quick" if args.quick else "full"


def setup_logging() -> None:
    """Benchmark progress at INFO; itsim's own INFO lines (configs, split reports) would drown it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("itsim").setLevel(logging.WARNING)


# ---- machine -----------------------------------------------------------------------------------

def load_average() -> float:
    """1-minute load average (the machine is shared: record it with every number)."""
    return round(os.getloadavg()[0], 2)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for dist in ("torch", "pillow", "numpy", "webdataset", "ray", "accelerate", "pyarrow"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    return {"cpu": cpu_model(), "cores": usable_cores(), "platform": platform.platform(), "versions": versions}


# ---- statistics and records --------------------------------------------------------------------

@dataclass
class Summary:
    median: float
    min: float
    max: float
    n: int
    values: list[float]

    @property
    def spread(self) -> float:
        """(max - min) / median: 0.1 means the repeats span 10% of the median."""
        return (self.max - self.min) / self.median if self.median else 0.0


def summarize(values: Sequence[float]) -> Summary:
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to summarise")
    return Summary(statistics.median(vals), min(vals), max(vals), len(vals), vals)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


@dataclass
class Recorder:
    """Collects one benchmark's records and appends each as one JSON line to `out`."""

    bench: str
    mode: str
    out: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    invocation: str = field(default_factory=lambda: uuid.uuid4().hex[:8])  # this process's lines of the run
    records: list[dict[str, Any]] = field(default_factory=list)
    load_start: float = field(default_factory=load_average)

    def _write(self, record: dict[str, Any]) -> dict[str, Any]:
        base = {"bench": self.bench, "run_id": self.run_id, "invocation": self.invocation, "mode": self.mode,
                "time": datetime.datetime.now().isoformat(timespec="seconds"),
                "load_1m": load_average(), "load_1m_at_start": self.load_start, "cores": usable_cores()}
        record = {**base, **record}
        self.records.append(record)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with self.out.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        return record

    def measure(self, case: str, metric: str, unit: str, values: Sequence[float], **params: Any) -> dict[str, Any]:
        """A rate or a duration over repeats (median, spread, every value)."""
        s = summarize(values)
        return self._write({"kind": "measurement", "case": case, "metric": metric, "unit": unit,
                            "value": s.median, "min": s.min, "max": s.max, "spread": round(s.spread, 4),
                            "repeats": s.n, "values": s.values, "params": params})

    def ratio(self, case: str, num: dict[str, Any], den: dict[str, Any], target: float | None = None,
              scale: float = 1.0, note: str = "") -> dict[str, Any]:
        """num / (scale * den), two records of this run: higher-is-better rates (or, for times, the
        baseline's seconds over itsim's). Never a constant: both sides are measured in the same run.

        The range pairs the extremes (num.min / den.max .. num.max / den.min), so it is the widest
        the repeats allow.
        """
        if not isinstance(den, dict) or den.get("kind") not in ("measurement", "derived"):
            raise TypeError(f"{case}: the denominator must be a measurement of this run, not {den!r}")
        d_med, d_min, d_max, d_name = den["value"], den["min"], den["max"], f"{den['case']} {den['metric']}"
        value = num["value"] / (scale * d_med)
        lo, hi = num["min"] / (scale * d_max), num["max"] / (scale * d_min)
        return self._write({
            "kind": "ratio", "case": case, "metric": "ratio", "unit": "x", "value": value, "min": lo, "max": hi,
            "spread": round((hi - lo) / value, 4) if value else 0.0, "repeats": num["repeats"],
            "numerator": f"{num['case']} {num['metric']}", "denominator": d_name, "scale": scale,
            "target": target, "met": None if target is None else bool(value >= target), "note": note})

    def info(self, case: str, metric: str, unit: str, value: float, **params: Any) -> dict[str, Any]:
        """A single derived number (an extrapolation, a count): no repeats."""
        return self._write({"kind": "derived", "case": case, "metric": metric, "unit": unit, "value": float(value),
                            "min": float(value), "max": float(value), "spread": 0.0, "repeats": 1,
                            "params": params})

    def not_measured(self, case: str, metric: str, reason: str, **params: Any) -> dict[str, Any]:
        """A comparison this run could not make (e.g. no TensorFlow here): reported, never filled with a constant."""
        return self._write({"kind": "not_measured", "case": case, "metric": metric, "unit": "", "value": None,
                            "min": None, "max": None, "spread": None, "repeats": 0, "reason": reason,
                            "params": params})

    def machine(self) -> dict[str, Any]:
        return self._write({"kind": "machine", "case": "machine", "metric": "info", "unit": "", "value": 1.0,
                            **machine_info()})

    def table(self) -> str:
        return markdown_table(self.records)


def _fmt(x: float | None) -> str:
    if x is None:
        return ""
    if x == 0:
        return "0"
    if abs(x) >= 1e7:
        exp = min(4, int(math.log10(abs(x)) // 3))
        return f"{x / 1000**exp:.3g} {' kMGT'[exp]}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.01:
        return f"{x:.2f}"
    return f"{x:.2g}"


def markdown_table(records: Sequence[dict[str, Any]], with_bench: bool = False) -> str:
    """Measurements and ratios as one Markdown table (machine records left out)."""
    head = (["bench"] if with_bench else []) + ["case", "metric", "median", "min - max", "n", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r.get("kind") == "machine":
            continue
        target = r.get("target")
        met = "" if r.get("met") is None else ("yes" if r["met"] else "**no**")
        unit = f" {r['unit']}" if r.get("unit") else ""
        metric = r["metric"]
        if r.get("kind") == "not_measured":
            row = ([r["bench"]] if with_bench else []) + [r["case"], metric, f"not measured: {r['reason']}", "", "0",
                                                           "", ""]
            lines.append("| " + " | ".join(row) + " |")
            continue
        row = ([r["bench"]] if with_bench else []) + [
            r["case"], metric, _fmt(r["value"]) + unit,
            "" if r["kind"] == "derived" else f"{_fmt(r['min'])} - {_fmt(r['max'])}", str(r.get("repeats", "")),
            "" if target is None else f">= {target:g}", met]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def finish(rec: Recorder) -> int:
    """The CLI summary of one benchmark: its Markdown table on stdout."""
    print(f"\n## {rec.bench} ({rec.mode}, load {rec.load_start} -> {load_average()})\n")
    print(rec.table())
    return 0


# ---- inputs ------------------------------------------------------------------------------------

def synth_data(cache: Path, n_images: int, min_size: int = 320, max_size: int = 640, seed: int = 0) -> Path:
    """A folder of synthetic captioned images (results.csv + images/), generated once and reused."""
    from itsim.data.synth import generate

    folder = Path(cache) / f"synth-{n_images}-{min_size}-{max_size}-s{seed}"
    csv = folder / "results.csv"
    if not csv.is_file():
        log.info("generating %d synthetic images in %s", n_images, folder)
        generate(folder, n_images, seed=seed, min_size=min_size, max_size=max_size,
                 workers=min(2, usable_cores()), progress=False)
    return folder


def shards_for(cache: Path, data: Path, image_size: int, shard_size: int = 50, workers: int = 2,
               captions: Path | None = None, tag: str = "", **options: Any) -> Path:
    """Shards of `data` (results.csv + images/, or `captions` + `data / "images"`) at `image_size`,
    built once with `build_shards` and reused; `options` are further ShardConfig fields, and `tag` names
    them in the cache folder."""
    from itsim.data.shards import ShardConfig, build_shards

    folder = Path(cache) / f"shards-{data.name}-{image_size}px-{shard_size}{tag}"
    if not (folder / "manifest.json").is_file():
        log.info("building shards in %s", folder)
        build_shards(ShardConfig(captions=str(captions or data / "results.csv"), images=str(data / "images"),
                                 out=str(folder), image_size=image_size, shard_size=shard_size, workers=workers,
                                 overwrite=True, **options))
    return folder


def wait_until_quiet(max_load: float, timeout_s: float, poll_s: float = 15.0) -> float:
    """Wait (up to `timeout_s`) for the 1-minute load to drop below `max_load`; returns the last reading."""
    deadline = time.monotonic() + timeout_s
    load = load_average()
    while load >= max_load and time.monotonic() < deadline:
        log.info("load %.2f >= %.2f: waiting for a quieter machine", load, max_load)
        time.sleep(poll_s)
        load = load_average()
    return load
