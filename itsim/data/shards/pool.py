"""Running many shard writers: in-process, a pool of local processes, or Ray tasks.

Pool processes end with the builder. Killed with SIGKILL, a builder gets no chance to stop its pool,
and its workers (blocked on a queue that they themselves hold open) and fork server would wait
forever. On Linux each of them asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG):
the fork server when the builder dies, a worker when the fork server dies. The kernel tracks the
parent *thread*: the fork server is started from the thread that calls `start_workers_early` (the
builder's main thread in `itsim build-shards`). Ray tasks are Ray's to stop.

Kept free of torch/webdataset imports so that worker processes start fast; the fork server imports
this module (and so the writer) once, for every worker it forks.
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from typing import Any

from itsim.data.shards.writer import ShardTask, read_complete_stats, write_shard
from itsim.io import ray_session
from itsim.progress import every_tenth, progress

log = logging.getLogger(__name__)

_PARENT_ENV = "ITSIM_SHARDS_BUILDER_PID"  # set only while this process starts its fork server
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
REMOTE_CHECKS = 16  # stats reads + HEADs in flight when checking which shards a store already holds


def die_with_parent() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent (thread) ends. False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            return True
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("cannot ask to die with the parent process: %s", exc)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# In a fork server that a builder started (start_workers_early sets the variable only meanwhile): die
# with the builder. The builder may have died before the prctl: the fork server has another parent
# then, and leaves now.
if (_builder := os.environ.pop(_PARENT_ENV, "")).isdigit():
    if die_with_parent() and os.getppid() != int(_builder):
        os._exit(1)


def _init_worker(builder: int, environ: dict[str, str]) -> None:
    """Die with the fork server (or the builder, for spawned workers); leave at once if the builder
    is already gone. Take the builder's environment of now (a fork server keeps the one it started
    with: store credentials set since would be missing). One thread per worker: parallelism comes
    from the workers, not BLAS/torch threads."""
    die_with_parent()
    if not _alive(builder):
        os._exit(1)
    os.environ.clear()
    os.environ.update(environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _mp_context() -> multiprocessing.context.BaseContext:
    """A fork server where there is one (safe when the caller has threads), else spawn.

    The fork server imports this module (numpy, PIL) once, so each worker forked from it starts ready
    instead of spending ~0.15 s importing it, on every build. `__main__` stays preloaded as by default.
    This only affects a fork server this process has not started yet.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", __name__])
    return ctx


def start_workers_early() -> None:
    """Start the fork server now, so that it imports while the caller reads captions and plans shards.

    Costs an idle process when the plan turns out to need no pool; saves its start-up when it does.
    The fork server learns this process's id from the environment (only while it starts), so that it
    dies with this process.
    """
    if _mp_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        os.environ[_PARENT_ENV] = str(os.getpid())
        try:
            forkserver.ensure_running()
        finally:
            os.environ.pop(_PARENT_ENV, None)


def _run_processes(todo: list[ShardTask], workers: int, bar: Any) -> list[dict]:
    if workers <= 1:
        return [write_shard(task, progress=bar.update) for task in todo]
    results = []
    start_workers_early()  # a no-op when running; else starts it so that it dies with this process
    pool = cf.ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_init_worker,
                                  initargs=(os.getpid(), dict(os.environ)))
    try:
        futures = [pool.submit(write_shard, task) for task in todo]
        for future in cf.as_completed(futures):
            stats = future.result()
            bar.update(stats["images_planned"])
            results.append(stats)
    finally:  # on Ctrl-C or an error, do not start the queued shards
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _run_ray(todo: list[ShardTask], workers: int, address: str | None, bar: Any) -> list[dict]:
    with ray_session(address, num_cpus=workers or None) as ray:
        remote = ray.remote(num_cpus=1, max_retries=2)(write_shard)
        pending = [remote.remote(task) for task in todo]
        results = []
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for stats in ray.get(done):
                bar.update(stats["images_planned"])
                results.append(stats)
        return results


def complete_stats(tasks: list[ShardTask]) -> dict[str, dict]:
    """Shard name -> stats for the tasks whose shard is complete; on a store the checks (two requests
    per shard) run REMOTE_CHECKS at a time."""
    if not any(t.remote for t in tasks):
        found = [read_complete_stats(t) for t in tasks]
    else:
        with cf.ThreadPoolExecutor(REMOTE_CHECKS) as pool:
            found = list(pool.map(read_complete_stats, tasks))
    return {t.name: s for t, s in zip(tasks, found) if s is not None}


def run_shards(tasks: list[ShardTask], workers: int = 0, engine: str = "processes",
               ray_address: str | None = None, done: dict[str, dict] | None = None
               ) -> tuple[list[dict], int, float]:
    """Write the shards that are not complete yet, with `workers` processes (0 = all CPUs) or Ray tasks.

    `done`: `complete_stats(tasks)` when the caller has it already. Returns the stats of every task in
    plan order, the images written now and the seconds taken.
    """
    done = dict(complete_stats(tasks) if done is None else done)
    # Largest shards first, so the last few small ones fill in around them (output order is the plan's).
    todo = sorted((t for t in tasks if t.name not in done), key=lambda t: -len(t.items))
    if done:
        log.info("resuming: %d of %d shards already complete, %d to write", len(done), len(tasks), len(todo))
    n_workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    n_images = sum(len(t.items) for t in todo)
    start = time.perf_counter()
    with progress(n_images, "build-shards", "img", logger=log, every=every_tenth(n_images), smoothing=0.1,
                  mininterval=0.5) as bar:
        if todo and engine == "ray":
            results = _run_ray(todo, workers, ray_address, bar)
        else:
            results = _run_processes(todo, n_workers, bar)
    done.update({s["shard"]: s for s in results})
    return [done[t.name] for t in tasks], n_images, time.perf_counter() - start
