"""The process around the training loop: Accelerate setup, CPU threads, signals, cross-rank checks.

Kept apart from `loop.py` so that the loop reads as a loop; nothing here touches data or the model's
maths.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from itsim.errors import Interrupted, UserError
from itsim.train import trackers as tracking
from itsim.train.config import TrainConfig

log = logging.getLogger("itsim.train")


class StopFlag:
    """Set by SIGTERM/SIGINT: finish the step, checkpoint, exit 0 (preemptible clusters)."""

    def __init__(self) -> None:
        self.raised = False
        self.signal: str | None = None  # the first signal's name, for the summary
        self._old = {}

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if not self.raised:
            log.warning("received %s: finishing this step, then checkpointing", signal.Signals(signum).name)
            self.signal = signal.Signals(signum).name
        self.raised = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_finished(summary: dict, resume_command: str) -> None:
    """For commands that wrap training (the demo): training stopped by a signal checkpoints and returns
    normally (exit 0 for `itsim train`, as preemptible clusters expect), but its model was never
    exported, so the wrapper must stop here instead of going on to evaluate it. Raises `Interrupted`
    with one line: the step, the checkpoint and the command that resumes."""
    if not summary.get("stopped_early"):
        return
    name = summary.get("stopped_by") or "SIGTERM"
    number = getattr(signal.Signals, name, signal.SIGTERM)
    raise Interrupted(f"training was interrupted by {name} at step {summary['step']} of {summary['total_steps']}; "
                      f"checkpoint {summary.get('checkpoint') or 'none'}; resume with: {resume_command}",
                      128 + int(number))


def mixed_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    cpu_only = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()
    return "no" if cpu_only else "bf16"


def make_accelerator(cfg: TrainConfig, out: str | Path | None = None):
    """The Accelerator, and the trackers (`--report-to`) it was given, which `trackers.start` starts.
    `out`: the local folder the run is written into (default `--out`; a URL run's staging folder)."""
    out = Path(cfg.out if out is None else out)
    try:
        trackers = tracking.resolve(cfg)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    mp = mixed_precision(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # Accelerate keeps process-wide state; a second in-process run (tests, notebooks, the demo)
        # with other settings would otherwise be refused.
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        mixed_precision=mp,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tb")),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout))],
    )
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if world_env > 1 and accelerator.num_processes == 1:
        raise UserError(
            f"WORLD_SIZE={world_env} but Accelerate sees one process: the processes would train alone and "
            "write the same checkpoints. On CPU launch with ACCELERATE_USE_CPU=1 (see launch/README.md).")
    if "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ and accelerator.num_processes == 1:
        # `accelerate launch --cpu --num_machines N` starts N unconnected single-process trainings.
        raise UserError("a distributed launch (MASTER_PORT is set) started a single-process training: "
                        "on CPU use ACCELERATE_USE_CPU=1 with --multi_gpu (see launch/README.md)")
    return accelerator, trackers


def configure_backends(device: torch.device) -> None:
    """cuDNN autotuning on CUDA: a run's convolution shapes are fixed (batch size, image size), so the
    few steps spent searching for the fastest algorithms pay back over the run. Nothing on CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def cpu_threads(cfg: TrainConfig, local_processes: int) -> int:
    """Compute threads per rank: --threads, else OMP_NUM_THREADS (what launchers and users set), else
    the cores divided among the local ranks. DataLoader workers are not subtracted: they sleep once
    their prefetch queue is full (data wait under 1% of a step here), and leaving a core to them cost
    a third of the steps/s on a quiet 2-core machine. On a machine shared with busy neighbours,
    OpenMP threads spin-wait for a busy core (steps 5-10x slower, measured): use --threads 1 there."""
    if cfg.threads > 0:
        return cfg.threads
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, local_processes))


def param_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on all ranks when DDP keeps them in sync.

    Buffers (BatchNorm running statistics) are left out: each rank updates them from its own last
    batch, and DDP re-broadcasts rank 0's at the next forward.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (so all ranks stop together)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.gather(torch.tensor([int(flag)], device=accelerator.device)).max().item())


def looks_like_peer_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("connection", "gloo", "nccl", "timed out", "timeout", "peer", "broken pipe"))
