"""Run every benchmark (each in its own process), then write the results table into RESULTS.md and the
ratio plot into results.png.

`make bench` runs this at full size: on 2 cores about 15 minutes for the throughput benchmarks plus up
to about an hour and a quarter for bench_quality.py, most of it the reference recipe's budget
(`--ref-budget` times itsim's wall time, on the demo data and on Flickr8k when present). The GPU
benchmark (`gpu.py`) runs too when a CUDA device is present. On a shared machine `--max-load` waits (up to `--wait`
seconds) before each benchmark for the 1-minute load average to drop; the load is recorded either way.
Only a full run rewrites RESULTS.md and results.png by default; `--results-md`/`--plot` choose
other paths (a quick or tiny run writes them only when asked). A benchmark disturbed by a busy
neighbour can be run again into the same run: `--only train --run-id ID` replaces that benchmark's
lines of run ID in the results (its lines keep their own times and load averages).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import common

BENCHES = ("shards", "loader", "storage", "train", "quality", "eval", "score", "breakdown")
SCRIPTS = {"shards": "bench_shards.py", "loader": "bench_loader.py", "storage": "bench_storage.py",
           "train": "bench_train.py",
           "quality": "bench_quality.py", "eval": "bench_eval.py", "score": "bench_score.py",
           "breakdown": "breakdown.py", "gpu": "gpu.py"}
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"


def read_run(path: Path, run_id: str) -> list[dict[str, Any]]:
    """The lines of one run; a benchmark run again under the same run id replaces its earlier lines."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("run_id") == run_id:
            records.append(record)
    latest = {r["bench"]: r.get("invocation") for r in records}
    return [r for r in records if r.get("invocation") == latest[r["bench"]]]


def ordered(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Benchmarks in run order (a re-run one moves back to its place); file order within each."""
    order = {b: i for i, b in enumerate(SCRIPTS)}
    return sorted(records, key=lambda r: order.get(r["bench"], len(order)))


def results_section(records: list[dict[str, Any]], mode: str, seconds: float, rerun: str | None = None) -> str:
    records = ordered(records)
    machines = [r for r in records if r["kind"] == "machine"]
    info = machines[0] if machines else common.machine_info()
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    loads: dict[str, list[float]] = {}
    for r in records:
        if r["kind"] != "machine":
            loads.setdefault(r["bench"], [r["load_1m_at_start"]]).append(r["load_1m"])
    load_text = "; ".join(f"{b} {v[0]:.2f} / {min(v[1:]):.2f}-{max(v[1:]):.2f}" for b, v in loads.items())
    targets = [r for r in records if r.get("target") is not None]
    met = sum(1 for r in targets if r["met"])
    spans = {}
    for r in records:
        spans.setdefault(r["bench"], []).append(r["time"])
    span_text = "; ".join(f"{b} {min(t)[:16].replace('T', ' ')}" for b, t in spans.items())
    what = ("rebuilt from the JSON lines" if rerun == "nothing (report only)" else
            f"re-ran {rerun} in {seconds / 60:.1f} min" if rerun else f"{seconds / 60:.1f} min")
    lines = [
        f"Run `{records[0]['run_id'] if records else '-'}` ({mode}), written {time.strftime('%Y-%m-%d %H:%M %Z')} "
        f"({what}).",
        "",
        f"- Started at (local time): {span_text}",
        f"- CPU: {info['cpu']}, {info['cores']} usable cores ({info['platform']})",
        f"- Versions: {versions}",
        f"- 1-minute load average per benchmark, at its start / when its lines were written (a benchmark "
        f"busy on both cores adds up to 2 itself): {load_text}",
        "",
        f"### Targets: {met} of {len(targets)} met",
        "",
        "| bench | comparison | ratio | min - max | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in targets:
        lines.append(f"| {r['bench']} | {r['case']} | {common._fmt(r['value'])}x | {common._fmt(r['min'])} - "
                     f"{common._fmt(r['max'])} | >= {r['target']:g} | {'yes' if r['met'] else '**no**'} |")
    lines += ["", "### Every measurement", "", common.markdown_table(records, with_bench=True)]
    return "\n".join(lines)


def write_results_md(path: Path, section: str) -> None:
    """Replace the generated part between the markers; hand-written notes around it are kept."""
    block = f"{BEGIN}\n{section}\n{END}"
    if path.is_file() and BEGIN in (text := path.read_text()) and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = f"# itsim throughput benchmarks\n\n{block}\n"
    path.write_text(text)


def plot(records: list[dict[str, Any]], path: Path) -> bool:
    """Horizontal bars: each targeted ratio (median, with its min-max range) against its target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ordered(records) if r.get("target") is not None]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.5))
    labels = [f"{r['bench']}: {r['case']}" for r in rows]
    y = list(range(len(rows)))[::-1]
    colours = ["#2a9d4b" if r["met"] else "#c8423b" for r in rows]
    err = [[max(0.0, r["value"] - r["min"]) for r in rows], [max(0.0, r["max"] - r["value"]) for r in rows]]
    ax.barh(y, [r["value"] for r in rows], xerr=err, color=colours, alpha=0.85, capsize=3)
    for yi, r in zip(y, rows):
        ax.plot([r["target"], r["target"]], [yi - 0.4, yi + 0.4], color="black", linewidth=2)
        ax.text(max(r["max"], r["target"]) * 1.06, yi, f"{r['value']:.3g}x", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(right=max(max(r["max"], r["target"]) for r in rows) * 1.6)
    ax.set_xlabel("ratio itsim / baseline (log scale); black line: target; green met, red missed")
    ax.set_title("itsim throughput against its baselines (same machine, same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help=f"comma list of {', '.join(SCRIPTS)} (default: all, gpu with CUDA)")
    p.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-minute load below this before each bench")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait at most for that load (default: do not wait)")
    p.add_argument("--results-md", type=Path, default=None, help="default: benchmarks/RESULTS.md on a full run")
    p.add_argument("--plot", type=Path, default=None, help="default: benchmarks/results.png on a full run")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the table and plot of --run-id from --out")
    p.add_argument("--with-keras", action="store_true",
                   help="bench_train also trains the reference design in Keras (needs TensorFlow)")
    args = p.parse_args(argv)
    common.setup_logging()
    mode = common.mode_of(args)
    run_id = args.run_id or uuid.uuid4().hex[:8]
    if args.only:
        benches = [b.strip() for b in args.only.split(",") if b.strip()]
        unknown = [b for b in benches if b not in SCRIPTS]
        if unknown:
            p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(SCRIPTS)}")
    else:
        import torch

        benches = list(BENCHES) + (["gpu"] if torch.cuda.is_available() else [])
    if args.report_only:
        if not args.run_id:
            p.error("--report-only needs --run-id")
        benches = []
    flags = ["--tiny"] if mode == "tiny" else ["--quick"] if mode == "quick" else []
    if args.repeats:
        flags += ["--repeats", str(args.repeats)]
    start = time.perf_counter()
    failed = []
    for bench in benches:
        if args.wait > 0:
            common.wait_until_quiet(args.max_load, args.wait)
        common.log.info("running %s (load %.2f)", bench, common.load_average())
        extra = ["--with-keras"] if bench == "train" and args.with_keras else []
        cmd = [sys.executable, str(common.BENCH_DIR / SCRIPTS[bench]), *flags, *extra, "--out", str(args.out),
               "--cache", str(args.cache), "--run-id", run_id]
        done = subprocess.run(cmd, cwd=common.ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode != 0:
            failed.append(bench)
            common.log.error("%s failed with exit code %d", bench, done.returncode)
    seconds = time.perf_counter() - start
    records = read_run(args.out, run_id)
    if not records:
        common.log.error("no lines of run %s in %s", run_id, args.out)
        return 1
    rerun = "nothing (report only)" if args.report_only else args.only if args.run_id else None
    section = results_section(records, records[0]["mode"], seconds, rerun=rerun)
    print("\n" + section)
    # A full run, or benchmarks re-run into an earlier full run (--only with its --run-id), updates the results.
    whole = (mode == "full" and (not args.only or bool(args.run_id))) or args.report_only
    results_md = args.results_md or (common.BENCH_DIR / "RESULTS.md" if whole else None)
    plot_path = args.plot or (common.BENCH_DIR / "results.png" if whole else None)
    if results_md:
        write_results_md(results_md, section)
        common.log.info("wrote %s", results_md)
    if plot_path and plot(records, plot_path):
        common.log.info("wrote %s", plot_path)
    if failed:
        common.log.error("failed: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
