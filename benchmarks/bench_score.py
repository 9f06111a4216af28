"""Batch scoring: rows/s of the Ray Data job (`itsim score`) with 1 and 2 workers against an
in-process loop over the same rows, and the driver's peak memory as the row count grows 10x.

Throughput: a CSV of (image path, caption) rows over synthetic 320-640 px JPEGs, a model of the
reference sizes (random weights) at a small image size. Rows repeat each image 5 times in a row (5
captions per image, Flickr-style), and both sides encode each distinct image once per batch (the
Scorer's own path). The in-process loop is what a user would
write with the library: `Scorer.score_rows` on 256-row chunks of the CSV read with pandas, one
Parquet file at the end; with torch's default threads (every core) and with one thread. Each repeat
also times a 256-row run of every case, which splits its time into a fixed part per job and a
steady-state rate per row. The Ray job is `run_score` on an already running local Ray (2 CPUs), timed
around the whole call (actor start, model load, Parquet output included).

Memory: `itsim score` run as users run it (a subprocess, joining the running local Ray), a tiny
model at 32 px over small images, batches of 1,024 rows, at two row counts; the driver's RSS is
sampled every 50 ms.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

# mode -> (images, rows, image size, repeats, memory row counts)
# Full: 20,480 rows (80 blocks of 256), so that a job's fixed cost (actor start, model load, about
# 2-5 s) is a small part of it, as for the large sets the Ray job is for.
SIZES = {"tiny": (20, 100, 32, 1, (200, 400)), "quick": (100, 1024, 128, 1, (2_000, 20_000)),
         "full": (200, 20_480, 128, 2, (20_000, 200_000))}
BATCH = 256
MEMORY_BATCH = 1024  # fewer, larger blocks: 200,000 rows in minutes; the driver's memory does not scale with it


def pairs_csv(data: Path, rows: int, out: Path) -> Path:
    """`rows` (image, caption) rows cycling through the synthetic captions, in file order."""
    import pandas as pd

    df = pd.read_csv(data / "results.csv", sep=r"\|\s*", engine="python")
    df = pd.DataFrame({"image": df.iloc[:, 0], "caption": df.iloc[:, 2].astype(str)})
    df = pd.concat([df] * (rows // len(df) + 1), ignore_index=True).iloc[:rows]
    df.to_csv(out, index=False)
    return out


def make_model(data: Path, out: Path, size: int, tiny: bool) -> Path:
    import pandas as pd
    import torch

    from itsim.model import ItsimModel, ModelConfig, Preprocess, save_model
    from itsim.text import Vocab

    captions = pd.read_csv(data / "results.csv", sep=r"\|\s*", engine="python").iloc[:, 2].astype(str)
    vocab = Vocab.build(captions)
    torch.manual_seed(0)
    model = ItsimModel(ModelConfig(vocab_size=len(vocab), **(common.TINY_MODEL if tiny else {})))
    return save_model(out, model.eval(), vocab, Preprocess(image_size=size))


def in_process(model: Path, csv: Path, images: Path, out: Path, threads: int | None = None) -> int:
    """The loop a library user writes: chunks of the table through `Scorer.score_rows`, then Parquet.

    `threads`: torch intra-op threads (None: torch's default, every core).
    """
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from itsim.score import Scorer

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        scorer = Scorer.from_dir(model, device="cpu", images_root=images, batch_size=BATCH)
        tables = []
        for chunk in pd.read_csv(csv, chunksize=BATCH):
            scores, errors = scorer.score_rows(chunk)
            table = pa.Table.from_pandas(chunk, preserve_index=False)
            table = table.append_column("score", pa.array(scores, pa.float32(), mask=np.isnan(scores)))
            tables.append(table.append_column("error", pa.array(errors, pa.string())))
    finally:
        torch.set_num_threads(previous)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(tables), out / "scores.parquet")
    return sum(t.num_rows for t in tables)


def ray_job(model: Path, csv: Path, images: Path, out: Path, workers: int) -> int:
    from itsim.score.ray_job import ScoreConfig, run_score

    summary = run_score(ScoreConfig(model=str(model), input=(str(csv),), output=str(out), images=str(images),
                                    workers=workers, batch_size=BATCH, overwrite=True))
    if summary["scored"] != summary["rows"]:
        raise RuntimeError(f"scored {summary['scored']} of {summary['rows']} rows: {summary['errors']}")
    return summary["rows"]


def driver_peak_rss(model: Path, csv: Path, images: Path, out: Path, address: str,
                    batch: int = MEMORY_BATCH) -> tuple[float, float]:
    """(peak RSS of the `itsim score` driver process in MiB, seconds), sampled every 50 ms.

    The command joins the Ray already running (`--address`): the driver does the same work as with a
    Ray of its own, and no Ray start-up is timed.
    """
    import psutil

    cmd = [sys.executable, "-m", "itsim.cli", "score", "--model", str(model), "--input", str(csv), "--output",
           str(out), "--images", str(images), "--workers", "1", "--batch-size", str(batch), "--overwrite",
           "--address", address]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.perf_counter()
    proc = psutil.Popen(cmd, env=env, cwd=common.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"itsim score failed ({proc.returncode}):\n{stderr[-3000:]}")
    return peak / 2**20, seconds


def main(argv: list[str] | None = None) -> int:
    import ray

    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    common.setup_logging()
    mode = common.mode_of(args)
    n_images, rows, size, repeats, memory_rows = SIZES[mode]
    repeats = args.repeats or repeats
    rec = common.Recorder("score", mode, args.out, **({"run_id": args.run_id} if args.run_id else {}))
    rec.machine()
    data = common.synth_data(args.cache, n_images, *((96, 160) if mode == "tiny" else (320, 640)))
    small = common.synth_data(args.cache, 400 if mode != "tiny" else 40, 64, 96)
    work = Path(tempfile.mkdtemp(prefix="bench-score-", dir=args.cache))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        model = make_model(data, work / "model", size, tiny=mode == "tiny")
        csv = pairs_csv(data, rows, work / "pairs.csv")
        warm_csv = pairs_csv(data, min(rows, BATCH), work / "warm.csv")
        images = data / "images"
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        cases = {"in-process loop (Scorer)": lambda c, o: in_process(model, c, images, o),
                 "in-process loop, 1 torch thread": lambda c, o: in_process(model, c, images, o, threads=1),
                 "Ray job, 1 worker": lambda c, o: ray_job(model, c, images, o, 1),
                 "Ray job, 2 workers": lambda c, o: ray_job(model, c, images, o, 2)}
        if mode == "tiny":  # a smoke test: one of each is enough
            del cases["Ray job, 1 worker"], cases["in-process loop, 1 torch thread"]
        for name, fn in cases.items():  # warm-up: Ray worker processes, imports, file cache
            if mode != "tiny":
                fn(warm_csv, work / "warm")
                shutil.rmtree(work / "warm", ignore_errors=True)
        rates: dict[str, list[float]] = {name: [] for name in cases}
        steady: dict[str, list[float]] = {name: [] for name in cases}
        fixed: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(repeats):
            for name, fn in cases.items():
                # A short run beside the full one splits each case's time into a fixed part (actors,
                # model loading, planning) and a per-row part.
                t_small = common.timed(lambda: fn(warm_csv, work / "out"))[0] if mode != "tiny" else None
                shutil.rmtree(work / "out", ignore_errors=True)
                seconds, n = common.timed(lambda: fn(csv, work / "out"))
                shutil.rmtree(work / "out", ignore_errors=True)
                if n != rows:
                    raise RuntimeError(f"{name}: {n} rows out of {rows}")
                rates[name].append(n / seconds)
                if t_small is not None and seconds > t_small:
                    per_row = (seconds - t_small) / (rows - min(rows, BATCH))
                    steady[name].append(1.0 / per_row)
                    fixed[name].append(max(1e-3, seconds - rows * per_row))
        params = {"rows": rows, "image_size": size, "batch": BATCH, "model": "tiny" if mode == "tiny" else
                  "reference sizes", "source": "synthetic 320-640 px JPEG, 5 captions per image"}
        r = {name: rec.measure(name, "rows/s", "rows/s", vals, **params) for name, vals in rates.items()}
        s_r = {name: rec.measure(name, "steady-state rows/s", "rows/s", vals, small_rows=BATCH, **params)
               for name, vals in steady.items() if vals}
        for name, vals in fixed.items():
            if vals:
                rec.measure(name, "fixed seconds per job", "s", vals, small_rows=BATCH, **params)
        loop = r["in-process loop (Scorer)"]
        rec.ratio("Ray 2 workers vs in-process loop", r["Ray job, 2 workers"], loop, target=1.6,
                  note="the loop's torch already uses every core for the model")
        if "in-process loop, 1 torch thread" in r:
            rec.ratio("Ray 2 workers vs in-process loop on 1 thread", r["Ray job, 2 workers"],
                      r["in-process loop, 1 torch thread"], target=1.6, note="2 cores against 1")
        if "Ray job, 1 worker" in r:
            rec.ratio("Ray 1 worker vs in-process loop", r["Ray job, 1 worker"], loop)
            rec.ratio("Ray 2 workers vs Ray 1 worker", r["Ray job, 2 workers"], r["Ray job, 1 worker"])
        if len(s_r) == len(cases):
            rec.ratio("steady state: Ray 2 workers vs in-process loop", s_r["Ray job, 2 workers"],
                      s_r["in-process loop (Scorer)"], note="fixed costs per job left out")
            rec.ratio("steady state: Ray 2 workers vs in-process loop on 1 thread", s_r["Ray job, 2 workers"],
                      s_r["in-process loop, 1 torch thread"], note="fixed costs per job left out")

        tiny_model = make_model(small, work / "tiny_model", 32, tiny=True)
        peaks = {}
        for n in memory_rows:
            common.log.info("driver memory at %d rows", n)
            mem_csv = pairs_csv(small, n, work / f"mem{n}.csv")
            peak, seconds = driver_peak_rss(tiny_model, mem_csv, small / "images", work / f"mem{n}",
                                            ray.get_runtime_context().gcs_address)
            shutil.rmtree(work / f"mem{n}", ignore_errors=True)
            mparams = {"rows": n, "image_size": 32, "model": "tiny", "batch": MEMORY_BATCH,
                       "source": "synthetic 64-96 px JPEG"}
            peaks[n] = rec.measure(f"itsim score driver, {n:,} rows", "peak RSS", "MiB", [peak], **mparams)
            rec.measure(f"itsim score driver, {n:,} rows", "rows/s (whole command)", "rows/s", [n / seconds],
                        **mparams)
        lo, hi = memory_rows
        rec.ratio(f"driver memory flatness: peak at {lo:,} / peak at {hi:,} rows", peaks[lo], peaks[hi], target=0.8,
                  note="1.0 = flat; 0.8 allows 25% growth for 10x the rows")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return common.finish(rec)


if __name__ == "__main__":
    raise SystemExit(main())
