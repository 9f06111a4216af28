"""`itsim score`: the batch scorer as a Ray Data job (local in-process Ray by default, or a cluster).

Pipeline, following Ray's batch-inference pattern:
read (`read.ScoreInputs`: stable `row_id`s, streamed blocks) -> repartition into batch-sized
blocks (a small file is one block: without this one actor would get all the work) -> a fixed pool of
actors, each loading the model once, running `scorer.prepare_rows` (decode, resize, tokenise; bad rows
get an `error`) and `Scorer.score_prepared` -> `write_parquet`. An actor encodes each distinct image
of its batch once. With GPU workers, preprocessing is a stage of CPU tasks before the actors (the GPU
must not wait for JPEG decoding); there each row's image key travels with its pixels as a global
string (a path, a digest of the JPEG bytes) because Ray may regroup rows between the stages. On CPU
workers that stage would only copy every row's pixels between processes.

Actor sizes and model shipping are in resources.py. Actor crashes are retried by Ray Data's own defaults for actor pools
(`max_restarts=-1`, `max_task_retries=-1`); row errors never raise, so they are never retried.

`--model`, `--input`, `--images`, image paths in a table and `--output` may be store URLs (`s3://...`);
the driver lists and checks them, tasks and actors read and write through `itsim.storage` with the
driver's storage options; how outputs are finalised (each part whole, `_summary.json` last) is in output.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import ray
import yaml
from ray.data.extensions import ArrowTensorArray

from itsim import config, storage
from itsim.errors import UserError
from itsim.io import ray_session
from itsim.model import Preprocess, load_model
from itsim.progress import interactive
from itsim.score.columns import IDS, IMAGE_KEY, JPG, LENGTHS, PIXELS, READ_ERROR, tensor_column
from itsim.score.config import ScoreConfig, images_root
from itsim.score.output import PartSink, count_output, prepare_output, write_summary, write_text
from itsim.score.read import ScoreInputs, check_tables, detect_format, expand_inputs
from itsim.score.resources import Resources, actor_options, plan_resources, put_model, scorer_from_files
from itsim.score.scorer import Prepared, prepare_rows
from itsim.score.topk import run_topk
from itsim.text import Vocab

log = logging.getLogger(__name__)

# --- pipeline stages ------------------------------------------------------------------------------

def prepare_block(table: pa.Table, *, pre: Preprocess, vocab: Vocab, image_col: str, caption_col: str,
                  images_root: str | None, base_dir: str, max_pixels: int, from_bytes: bool,
                  options: Mapping[str, Any] | None = None) -> tuple[Any, pa.Table]:
    """`prepare_rows` on a block: (model inputs, the block without the reader's internal columns)."""
    images = table.column(JPG if from_bytes else image_col).to_pylist()
    prep = prepare_rows(images, table.column(caption_col).to_pylist(), pre, vocab, images_root, max_pixels,
                        table.column(READ_ERROR).to_pylist(), base_dir, options)
    return prep, table.drop_columns([c for c in (JPG, READ_ERROR) if c in table.column_names])


def preprocess_block(table: pa.Table, **prep_kwargs: Any) -> pa.Table:
    """CPU stage before GPU actors: model inputs travel as extra columns to the actors."""
    prep, out = prepare_block(table, **prep_kwargs)
    out = out.append_column(PIXELS, ArrowTensorArray.from_numpy(prep.pixels))
    out = out.append_column(IDS, ArrowTensorArray.from_numpy(prep.ids))
    out = out.append_column(LENGTHS, pa.array(prep.lengths, pa.int32()))
    out = out.append_column(IMAGE_KEY, pa.array(prep.image_keys, pa.string()))
    return out.append_column("error", pa.array(prep.errors, pa.string()))


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
            "images_root": images_root(cfg), "base_dir": os.getcwd(), "max_pixels": cfg.max_pixels,
            "from_bytes": from_bytes, "options": storage.portable_options(cfg.storage_options)}


def read_blocks(cfg: ScoreConfig, res: Resources, source: Any) -> Any:
    """read -> batch-sized blocks (a small file is one block: without this one actor gets all the work)."""
    ds = ray.data.read_datasource(source, override_num_blocks=max(1, len(source.read_plan())),
                                  num_cpus=res.read_cpus)
    return ds.repartition(target_num_rows_per_block=cfg.batch_size)


def prepared_dataset(cfg: ScoreConfig, res: Resources, source: Any, pre: Preprocess, vocab: Vocab,
                     from_bytes: bool) -> Any:
    """read -> batch-sized blocks -> CPU preprocessing tasks (in front of GPU actors)."""
    return read_blocks(cfg, res, source).map_batches(
        preprocess_block, fn_kwargs=prep_kwargs(cfg, pre, vocab, from_bytes), batch_format="pyarrow",
        batch_size=cfg.batch_size, num_cpus=res.prep_cpus)


# --- what the job prints -------------------------------------------------------------------------

# Ray's core worker prints this at error level for every actor of a Ray Data actor pool, with or without
# our model: Ray Data itself passes each pool actor its DataContext and its map function through the
# object store (ray.put) and restarts actors by default (ray-project/ray#57733, open). Only
# `max_restarts=0` silences it, which would lose the restart of a killed scoring actor
# (tests/test_faults.py). It is harmless here: the driver holds those objects, and the model bytes
# (resources.put_model), until the job ends, so a restarted actor still finds them.
RAY_ACTOR_ARGS_NOTE = ("Ray may print 'Actor ... has constructor arguments in the object store and max_restarts "
                       "> 0' once per scoring actor: harmless here (Ray Data ships each actor its own settings "
                       "through the object store, ray-project/ray#57733; this process keeps them, and the model, "
                       "until the job ends, so a restarted actor finds them)")


def quiet_progress_bars() -> None:
    """Ray Data draws its bars when stdout is a terminal and otherwise logs a plain summary every 10 s
    (RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL). The bars go to stderr: with only stderr redirected to a
    file they would fill it with carriage-return fragments, so there they are turned off (the job's
    summary line still says what was done)."""
    if sys.stdout.isatty() and not interactive():
        ray.data.DataContext.get_current().enable_progress_bars = False


# --- errors ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def user_errors_from_ray() -> Iterator[None]:
    """A UserError raised inside a Ray task or actor (a StorageError naming a URL) reaches the user as
    its own one line: Ray wraps it in a RayTaskError whose text is the remote traceback. Ray Data would
    also put a map's error behind a UserCodeException, which loses it on the way to the driver (an
    exception's `__cause__` is not pickled), so datasets made inside this block raise the original."""
    context = ray.data.DataContext.get_current()
    before, context.raise_original_map_exception = context.raise_original_map_exception, True
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unless a UserError is inside
        seen, todo = set(), [exc]
        while todo:
            e = todo.pop()
            if e is None or id(e) in seen:
                continue
            seen.add(id(e))
            if isinstance(e, UserError) and not isinstance(e, ray.exceptions.RayTaskError):
                e.args = ((str(e).splitlines() or [""])[0],)  # Ray Data appends lines on retry policy
                raise e from None
            todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
        raise
    finally:
        context.raise_original_map_exception = before


def run_pairs(cfg: ScoreConfig, res: Resources, source: Any, pre: Preprocess, vocab: Vocab,
              model_ref: list[Any], out: str | Path) -> dict[str, Any]:
    from_bytes = source.fmt == "shards"
    if res.gpus_per_worker > 0:  # CPU tasks decode while the GPUs score
        ds, actor_prep = prepared_dataset(cfg, res, source, pre, vocab, from_bytes), None
    else:  # each CPU actor preprocesses its own rows
        ds, actor_prep = read_blocks(cfg, res, source), prep_kwargs(cfg, pre, vocab, from_bytes)
    ds = ds.map_batches(ScoreActor, fn_constructor_kwargs={
        "model_ref": model_ref, "threads": res.threads, "use_gpu": res.gpus_per_worker > 0,
        "batch_size": cfg.batch_size, "prep_kwargs": actor_prep}, batch_format="pyarrow",
        batch_size=cfg.batch_size, **actor_options(res))
    ds.write_datasink(PartSink(out, max(cfg.batch_size, 100_000), cfg.storage_options))
    return count_output(out, cfg.storage_options)


def check_inputs(cfg: ScoreConfig) -> tuple[Vocab, Preprocess, list[Any], str, dict | None]:
    """Everything the driver checks before any Ray work: the model, images root and inputs (listing a
    store also checks its bucket and credentials). Returns (vocab, preprocessing, files, format, columns)."""
    config.check(cfg, ("model", "output"), [(cfg.batch_size >= 1, "--batch-size must be at least 1"),
                                            (cfg.k >= 1, "--k must be at least 1")])
    opts = cfg.storage_options
    if cfg.images and storage.is_remote(cfg.images):
        if not storage.ls(cfg.images, opts):
            raise UserError(f"--images {storage.scrub(cfg.images)}: nothing stored under this prefix")
    elif cfg.images and not Path(storage.resolve(cfg.images).path).is_dir():
        raise UserError(f"--images {cfg.images}: no such folder")
    _, vocab, pre = load_model(cfg.model, "cpu", opts)  # validates the model folder before any Ray work
    files = expand_inputs(cfg.input, cfg.split, opts)
    fmt = detect_format(files, cfg.format)
    if cfg.columns and fmt == "shards":
        raise UserError("--columns names the columns of headerless CSV/TSV tables; shards have none")
    columns = None if fmt == "shards" else check_tables(files, fmt, (cfg.image_col, cfg.caption_col), cfg.columns,
                                                        opts)
    return vocab, pre, files, fmt, columns


def run_score(cfg: ScoreConfig) -> dict[str, Any]:
    """Run the job described by `cfg`; returns (and writes, last) the summary."""
    vocab, pre, files, fmt, columns = check_inputs(cfg)
    opts = cfg.storage_options
    out = storage.location(cfg.output)
    prepare_output(out, cfg.overwrite, opts)
    write_text(out, "_config.yaml", yaml.safe_dump(config.to_dict(cfg), sort_keys=False), opts)
    log.info("%s", config.describe(cfg))
    start = time.perf_counter()
    with ray_session(cfg.address), user_errors_from_ray():
        started = time.perf_counter()
        res = plan_resources(cfg, ray.cluster_resources())
        log.info("scoring %d %s file(s) with %d worker(s) x %g CPU, %g GPU (torch threads %d); "
                 "preprocessing tasks %g CPU", len(files), fmt, res.workers, res.cpus_per_worker,
                 res.gpus_per_worker, res.threads, res.prep_cpus)
        model_ref = put_model(cfg.model, opts)
        quiet_progress_bars()
        log.info("%s", RAY_ACTOR_ARGS_NOTE)
        if cfg.mode == "topk":
            counts = run_topk(cfg, res, files, fmt, columns, pre, vocab, model_ref, out)
        else:
            source = ScoreInputs(files, fmt, cfg.batch_size, columns, options=opts)
            counts = run_pairs(cfg, res, source, pre, vocab, model_ref, out)
        job = time.perf_counter() - started
    seconds = time.perf_counter() - start
    # rows/s over the job itself: starting a local Ray takes seconds that do not grow with the input.
    summary = {"mode": cfg.mode, "inputs": len(files), "format": fmt, **counts, "seconds": round(seconds, 2),
               "job_seconds": round(job, 2), "rows_per_second": round(counts["rows"] / job, 1) if job > 0 else None,
               "output": storage.scrub(out), "resources": dataclasses.asdict(res)}
    if cfg.mode == "topk":
        summary["pairs_per_second"] = round(counts["pairs"] / job, 1) if job > 0 else None
    write_summary(out, summary, opts)
    return summary


run = run_score  # every stage's entry point is `run(cfg)`


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
