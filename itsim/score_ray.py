"""`itsim score`: the batch scorer as a Ray Data job (local in-process Ray by default, or a cluster).

Pipeline, following Ray's batch-inference pattern:
read (`score_read.ScoreInputs`: stable `row_id`s, streamed blocks) -> repartition into batch-sized
blocks (a small file is one block: without this one actor would get all the work) -> a fixed pool of
actors, each loading the model once, running `score.prepare_rows` (decode, resize, tokenise; bad rows
get an `error`) and `Scorer.score_prepared` -> `write_parquet`. An actor encodes each distinct image
of its batch once. With GPU workers, preprocessing is a stage of CPU tasks before the actors (the GPU
must not wait for JPEG decoding); there each row's image key travels with its pixels as a global
string (a path, a digest of the JPEG bytes) because Ray may regroup rows between the stages. On CPU
workers that stage would only copy every row's pixels between processes.

CPU accounting matters on small machines: the actors' CPU requests are sized so at least half a CPU
stays free for reading (and, with GPUs, preprocessing), otherwise the actors can hold every CPU while the read
waits for one (a deadlock). Actor crashes are retried by Ray Data's own defaults for actor pools
(`max_restarts=-1`, `max_task_retries=-1`); row errors never raise, so they are never retried.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import pyarrow as pa

from itsim import config
from itsim.errors import UserError
from itsim.images import DEFAULT_MAX_PIXELS
from itsim.model import Preprocess
from itsim.score_columns import IDS, IMAGE_KEY, LENGTHS, PIXELS  # columns between the job's stages
from itsim.text import Vocab

log = logging.getLogger(__name__)

MODEL_FILES = ("model.safetensors", "config.json", "vocab.json")
OUR_OUTPUTS = ("_summary.json", "_config.yaml", "image_topk", "caption_topk", "topk_errors.parquet")


@dataclasses.dataclass
class ScoreConfig:
    model: str = dataclasses.field(default="", metadata={"help": "model directory (from itsim train)"})
    input: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"help": "CSV/TSV/Parquet pair tables, shard folders or tars; globs allowed"})
    output: str = dataclasses.field(default="", metadata={"help": "output folder (Parquet + _summary.json)"})
    images: str | None = dataclasses.field(
        default=None, metadata={"help": "folder that image paths are relative to (paths may not escape it)"})
    address: str | None = dataclasses.field(
        default=None, metadata={"help": "Ray cluster (auto or ray://host:port); none = local Ray in-process"})
    workers: int | None = dataclasses.field(
        default=None, metadata={"help": "model actors; none = one per GPU, or 1 without GPUs"})
    gpus_per_worker: float | None = dataclasses.field(
        default=None, metadata={"help": "GPUs per actor; none = 1 when the cluster has GPUs, else 0"})
    cpus_per_worker: float | None = dataclasses.field(
        default=None, metadata={"help": "CPUs per actor; none = sized so reads and preprocessing always fit"})
    batch_size: int = dataclasses.field(default=256, metadata={"help": "rows per model batch"})
    image_col: str = dataclasses.field(default="image", metadata={"help": "image path column of tables"})
    caption_col: str = dataclasses.field(default="caption", metadata={"help": "caption column of tables"})
    columns: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"help": "names for the columns of headerless CSV/TSV tables, e.g. image,caption,label "
                                      "(the first line is then data); empty = the first line is the header"})
    mode: Literal["pairs", "topk"] = dataclasses.field(
        default="pairs", metadata={"help": "score each row, or rank every caption for every image and back"})
    k: int = dataclasses.field(default=5, metadata={"help": "neighbours per image and per caption (topk)"})
    format: Literal["auto", "csv", "tsv", "parquet", "shards"] = dataclasses.field(
        default="auto", metadata={"help": "input format; auto = from file names"})
    split: str | None = dataclasses.field(default=None, metadata={"help": "shards: only this split"})
    max_pixels: int = dataclasses.field(default=DEFAULT_MAX_PIXELS, metadata={"help": "refuse larger images"})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "replace an earlier output in --output"})


@dataclasses.dataclass
class Resources:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    threads: int  # torch threads per actor
    prep_cpus: float  # per preprocessing task
    read_cpus: float  # per read task


def plan_resources(cfg: ScoreConfig, cluster: dict[str, float]) -> Resources:
    """Actor sizes that leave room for the read and preprocessing tasks (see the module doc)."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    gpw = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (min(1.0, gpus) if gpus > 0 else 0.0)
    if gpw > 0 and gpus < gpw:
        raise UserError(f"--gpus-per-worker {gpw} but the Ray cluster has {gpus:g} GPUs")
    workers = cfg.workers or (max(1, int(gpus // gpw)) if gpw > 0 else 1)
    if workers < 1:
        raise UserError("--workers must be at least 1")
    if cfg.cpus_per_worker is not None:
        cpw = float(cfg.cpus_per_worker)
    else:
        share = (cpus - 1) / workers
        # With a GPU an actor mostly feeds it (CPU tasks preprocess); on CPU an actor preprocesses and
        # scores its own rows, so the actors share every CPU but one (reading, the driver).
        share = min(share, 1.0) if gpw > 0 else share
        cpw = max(0.25, math.floor(share * 4) / 4)
    free = cpus - workers * cpw
    if cpw <= 0 or free < 0.5:
        raise UserError(f"{workers} workers x {cpw:g} CPUs leave {free:g} of the cluster's {cpus:g} CPUs for "
                        "reading and preprocessing (need 0.5); use fewer --workers or less --cpus-per-worker")
    read_cpus = min(0.25, free / 2)
    return Resources(workers, cpw, gpw, max(1, int(cpw)), min(1.0, free - read_cpus), read_cpus)


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Reuse a running Ray (tests, notebooks), connect to `address`, or start a local one sized to
    this machine and shut it down afterwards."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    if address:
        ray.init(address=address)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster needs no token
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


# --- model shipping -------------------------------------------------------------------------------

def put_model(model_dir: str | Path) -> list[Any]:
    """The model directory's bytes in the object store, so actors on other nodes need no shared
    filesystem. Wrapped in a list so Ray passes the ref itself (not its value) to the actor, which
    fetches it; the driver owns it for the whole job, so a restarted actor can fetch it again."""
    import ray

    return [ray.put({name: (Path(model_dir) / name).read_bytes() for name in MODEL_FILES})]


def scorer_from_files(model_ref: list[Any], threads: int, use_gpu: bool, batch_size: int) -> Any:
    import ray
    import torch

    from itsim.score import Scorer

    files = ray.get(model_ref[0])
    torch.set_num_threads(threads)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="itsim-model-") as tmp:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        return Scorer.from_dir(tmp, device=device, batch_size=batch_size)


# --- pipeline stages ------------------------------------------------------------------------------

def prepare_block(table: pa.Table, *, pre: Preprocess, vocab: Vocab, image_col: str, caption_col: str,
                  images_root: str | None, base_dir: str, max_pixels: int, from_bytes: bool) -> tuple[Any, pa.Table]:
    """`prepare_rows` on a block: (model inputs, the block without the reader's internal columns)."""
    from itsim.score import prepare_rows
    from itsim.score_read import JPG, READ_ERROR

    images = table.column(JPG if from_bytes else image_col).to_pylist()
    prep = prepare_rows(images, table.column(caption_col).to_pylist(), pre, vocab, images_root, max_pixels,
                        table.column(READ_ERROR).to_pylist(), base_dir)
    return prep, table.drop_columns([c for c in (JPG, READ_ERROR) if c in table.column_names])


def preprocess_block(table: pa.Table, **prep_kwargs: Any) -> pa.Table:
    """CPU stage before GPU actors: model inputs travel as extra columns to the actors."""
    from ray.data.extensions import ArrowTensorArray

    prep, out = prepare_block(table, **prep_kwargs)
    out = out.append_column(PIXELS, ArrowTensorArray.from_numpy(prep.pixels))
    out = out.append_column(IDS, ArrowTensorArray.from_numpy(prep.ids))
    out = out.append_column(LENGTHS, pa.array(prep.lengths, pa.int32()))
    out = out.append_column(IMAGE_KEY, pa.array(prep.image_keys, pa.string()))
    return out.append_column("error", pa.array(prep.errors, pa.string()))


def tensor_column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).combine_chunks().to_numpy()


class ScoreActor:
    """Loads the model once; scores blocks. Output: the input columns, `score`, `error`.

    With `prep_kwargs` the actor preprocesses its own raw blocks (CPU workers: a separate stage would
    only copy every row's pixels between processes, which cost a quarter of the throughput on 2
    cores); without, it takes blocks from `preprocess_block` (GPU workers, fed by CPU tasks).
    """

    def __init__(self, model_ref: list[Any], threads: int, use_gpu: bool, batch_size: int,
                 prep_kwargs: dict[str, Any] | None = None):
        self.scorer = scorer_from_files(model_ref, threads, use_gpu, batch_size)
        self.prep_kwargs = prep_kwargs

    def __call__(self, table: pa.Table) -> pa.Table:
        from itsim.score import Prepared

        if self.prep_kwargs is not None:
            prep, out = prepare_block(table, **self.prep_kwargs)
        else:
            prep = Prepared(tensor_column(table, PIXELS), tensor_column(table, IDS), table.column(LENGTHS).to_numpy(),
                            table.column("error").to_pylist(), table.column(IMAGE_KEY).to_pylist())
            out = table.drop_columns([PIXELS, IDS, LENGTHS, IMAGE_KEY, "error"])
        scores = self.scorer.score_prepared(prep)
        out = out.append_column("score", pa.array(scores, pa.float32(), mask=np.isnan(scores)))
        return out.append_column("error", pa.array(prep.errors, pa.string()))


def prep_kwargs(cfg: ScoreConfig, pre: Preprocess, vocab: Vocab, from_bytes: bool) -> dict[str, Any]:
    return {"pre": pre, "vocab": vocab, "image_col": cfg.image_col, "caption_col": cfg.caption_col,
            "images_root": str(Path(cfg.images).resolve()) if cfg.images else None, "base_dir": os.getcwd(),
            "max_pixels": cfg.max_pixels, "from_bytes": from_bytes}


def read_blocks(cfg: ScoreConfig, res: Resources, source: Any) -> Any:
    """read -> batch-sized blocks (a small file is one block: without this one actor gets all the work)."""
    import ray

    ds = ray.data.read_datasource(source, override_num_blocks=max(1, len(source.read_plan())),
                                  num_cpus=res.read_cpus)
    return ds.repartition(target_num_rows_per_block=cfg.batch_size)


def prepared_dataset(cfg: ScoreConfig, res: Resources, source: Any, pre: Preprocess, vocab: Vocab,
                     from_bytes: bool) -> Any:
    """read -> batch-sized blocks -> CPU preprocessing tasks (in front of GPU actors)."""
    return read_blocks(cfg, res, source).map_batches(
        preprocess_block, fn_kwargs=prep_kwargs(cfg, pre, vocab, from_bytes), batch_format="pyarrow",
        batch_size=cfg.batch_size, num_cpus=res.prep_cpus)


def actor_options(res: Resources) -> dict[str, Any]:
    import ray

    opts: dict[str, Any] = {"compute": ray.data.ActorPoolStrategy(size=res.workers), "num_cpus": res.cpus_per_worker}
    if res.gpus_per_worker > 0:
        opts["num_gpus"] = res.gpus_per_worker
    return opts


# --- output ---------------------------------------------------------------------------------------

def prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file")
    existing = [p for p in out.iterdir()] if out.exists() else []
    if existing and not overwrite:
        raise UserError(f"--output {out} is not empty; pass --overwrite to replace an earlier score run")
    for p in existing:
        if p.name in OUR_OUTPUTS or p.suffix == ".parquet":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        else:
            raise UserError(f"--output {out} holds {p.name}, which itsim score did not write; choose another folder")
    out.mkdir(parents=True, exist_ok=True)


def count_output(out: Path) -> dict[str, Any]:
    """Rows, scored rows and errors by reason, reading only those two columns back."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    rows = scored = 0
    errors: Counter[str] = Counter()
    files = sorted(str(p) for p in out.glob("*.parquet"))
    for batch in pds.dataset(files, format="parquet").to_batches(columns=["score", "error"]) if files else []:
        rows += batch.num_rows
        scored += batch.num_rows - batch.column("score").null_count
        for item in pc.value_counts(batch.column("error")).to_pylist():
            if item["values"] is not None:
                errors[item["values"]] += item["counts"]
    return {"rows": rows, "scored": scored, "errors": dict(sorted(errors.items()))}


def run_pairs(cfg: ScoreConfig, res: Resources, source: Any, pre: Preprocess, vocab: Vocab,
              model_ref: list[Any], out: Path) -> dict[str, Any]:
    from_bytes = source.fmt == "shards"
    if res.gpus_per_worker > 0:  # CPU tasks decode while the GPUs score
        ds, actor_prep = prepared_dataset(cfg, res, source, pre, vocab, from_bytes), None
    else:  # each CPU actor preprocesses its own rows
        ds, actor_prep = read_blocks(cfg, res, source), prep_kwargs(cfg, pre, vocab, from_bytes)
    ds = ds.map_batches(ScoreActor, fn_constructor_kwargs={
        "model_ref": model_ref, "threads": res.threads, "use_gpu": res.gpus_per_worker > 0,
        "batch_size": cfg.batch_size, "prep_kwargs": actor_prep}, batch_format="pyarrow",
        batch_size=cfg.batch_size, **actor_options(res))
    ds.write_parquet(str(out), min_rows_per_file=max(cfg.batch_size, 100_000))
    return count_output(out)


def run_score(cfg: ScoreConfig) -> dict[str, Any]:
    """Run the job described by `cfg`; returns (and writes) the summary."""
    from itsim.model import load_model
    from itsim.score_read import ScoreInputs, check_tables, detect_format, expand_inputs

    if not cfg.model or not cfg.output:
        raise UserError("--model and --output are required")
    if cfg.batch_size < 1 or cfg.k < 1:
        raise UserError("--batch-size and --k must be at least 1")
    if cfg.images and not Path(cfg.images).is_dir():
        raise UserError(f"--images {cfg.images}: no such folder")
    _, vocab, pre = load_model(cfg.model, "cpu")  # validates the model folder before any Ray work
    files = expand_inputs(cfg.input, cfg.split)
    fmt = detect_format(files, cfg.format)
    if cfg.columns and fmt == "shards":
        raise UserError("--columns names the columns of headerless CSV/TSV tables; shards have none")
    columns = None if fmt == "shards" else check_tables(files, fmt, (cfg.image_col, cfg.caption_col), cfg.columns)
    out = Path(cfg.output).resolve()
    prepare_output(out, cfg.overwrite)
    config.save(cfg, out / "_config.yaml")
    log.info("%s", config.describe(cfg))
    start = time.perf_counter()
    with ray_session(cfg.address) as ray:
        started = time.perf_counter()
        res = plan_resources(cfg, ray.cluster_resources())
        log.info("scoring %d %s file(s) with %d worker(s) x %g CPU, %g GPU (torch threads %d); "
                 "preprocessing tasks %g CPU", len(files), fmt, res.workers, res.cpus_per_worker,
                 res.gpus_per_worker, res.threads, res.prep_cpus)
        model_ref = put_model(cfg.model)
        if cfg.mode == "topk":
            from itsim.score_topk import run_topk

            counts = run_topk(cfg, res, files, fmt, columns, pre, vocab, model_ref, out)
        else:
            source = ScoreInputs(files, fmt, cfg.batch_size, columns)
            counts = run_pairs(cfg, res, source, pre, vocab, model_ref, out)
        job = time.perf_counter() - started
    seconds = time.perf_counter() - start
    # rows/s over the job itself: starting a local Ray takes seconds that do not grow with the input.
    summary = {"mode": cfg.mode, "inputs": len(files), "format": fmt, **counts, "seconds": round(seconds, 2),
               "job_seconds": round(job, 2), "rows_per_second": round(counts["rows"] / job, 1) if job > 0 else None,
               "output": str(out), "resources": dataclasses.asdict(res)}
    if cfg.mode == "topk":
        summary["pairs_per_second"] = round(counts["pairs"] / job, 1) if job > 0 else None
    (out / "_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def summary_line(s: dict[str, Any]) -> str:
    errors = ", ".join(f"{k}={v}" for k, v in s.get("errors", {}).items()) or "none"
    if s["mode"] == "topk":
        return (f"top-{s['k']} for {s['images']} images x {s['captions']} captions ({s['pairs']} pairs), "
                f"errors: {errors}; {s['seconds']} s wall ({s['pairs_per_second']} pairs/s) -> {s['output']}")
    return (f"{s['rows']} rows in, {s['scored']} scored, errors: {errors}; {s['seconds']} s wall, "
            f"{s['job_seconds']} s in the Ray job ({s['rows_per_second']} rows/s) -> {s['output']}")


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = config.from_args(ScoreConfig, args)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(f"itsim score: {summary_line(run_score(cfg))}")
    return 0


def add_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser("score", help="score image-caption pairs (Ray Data job) -> Parquet",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML/TOML file of ScoreConfig fields (flags override it)")
    parser.add_argument("--input", nargs="+", default=argparse.SUPPRESS, metavar="FILE_OR_GLOB",
                        help="CSV/TSV/Parquet pair tables, shard folders or .tar shards; globs allowed")
    config.add_arguments(parser, ScoreConfig, skip=("input",))
    parser.set_defaults(func=_main)
