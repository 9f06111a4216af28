"""How a score job uses a Ray cluster: actor sizes, and the model shipped to the actors through the object store.

CPU accounting matters on small machines: the actors' CPU requests are sized so at least half a CPU
stays free for reading (and, with GPUs, preprocessing), otherwise the actors can hold every CPU while
the read waits for one (a deadlock).

GPU actors get about a tenth of each GPU's share of the cluster's CPUs (`GPU_ACTOR_CPU_SHARE`, at
least 1, at most 4) and as many torch threads: CPU tasks in front of them decode and resize, and the
actor's own host work per row (its pixels gathered from the Arrow block into pinned memory, one
copy) measured 7% of a preprocessing task's per-row work at 299 px when every row is a new image
(0.44 vs 6.0 ms per row on this loaded 2-core machine; 1 in 5 with repeated images), so a tenth of
the CPUs keeps the actors at the pace the other nine tenths preprocess at. More than 4 does not help
one actor: it takes one block at a time and its copy is memory-bound.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import ray
import torch

from itsim import storage
from itsim.errors import UserError
from itsim.model import MODEL_FILES
from itsim.score.config import ScoreConfig
from itsim.score.scorer import Scorer


GPU_ACTOR_CPU_SHARE = 0.1  # of each GPU's share of the CPUs (see the module doc)
GPU_ACTOR_MAX_CPUS = 4.0


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
        # With a GPU an actor feeds it (CPU tasks preprocess): a tenth of its share, see the module doc.
        # On CPU an actor preprocesses and scores its own rows, so the actors share every CPU but one.
        if gpw > 0:
            share = min(share, max(1.0, min(GPU_ACTOR_MAX_CPUS, round(share * GPU_ACTOR_CPU_SHARE))))
        cpw = max(0.25, math.floor(share * 4) / 4)
    free = cpus - workers * cpw
    if cpw <= 0 or free < 0.5:
        raise UserError(f"{workers} workers x {cpw:g} CPUs leave {free:g} of the cluster's {cpus:g} CPUs for "
                        "reading and preprocessing (need 0.5); use fewer --workers or less --cpus-per-worker")
    read_cpus = min(0.25, free / 2)
    return Resources(workers, cpw, gpw, max(1, int(cpw)), min(1.0, free - read_cpus), read_cpus)


def actor_options(res: Resources) -> dict[str, Any]:
    opts: dict[str, Any] = {"compute": ray.data.ActorPoolStrategy(size=res.workers), "num_cpus": res.cpus_per_worker}
    if res.gpus_per_worker > 0:
        opts["num_gpus"] = res.gpus_per_worker
    return opts


def put_model(model_dir: str | Path, options: Mapping[str, Any] | None = None) -> list[Any]:
    """The model directory's bytes (a folder or a store URL) in Ray's object store, so actors on other
    nodes need neither a shared filesystem nor the store's credentials. Wrapped in a list so Ray passes
    the ref itself (not its value) to the actor, which fetches it; the driver owns it for the whole
    job, so a restarted actor can fetch it again."""
    return [ray.put({name: storage.read_bytes(storage.join(os.fspath(model_dir), name), options)
                     for name in MODEL_FILES})]


def scorer_from_files(model_ref: list[Any], threads: int, use_gpu: bool, batch_size: int) -> Any:
    files = ray.get(model_ref[0])
    torch.set_num_threads(threads)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="itsim-model-") as tmp:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        return Scorer.from_dir(tmp, device=device, batch_size=batch_size)
