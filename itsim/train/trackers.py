"""Experiment trackers (`--report-to`): which ones, their config values, and keeping them from failing a run.

Accelerate runs the trackers (`Accelerator(log_with=...)`); three things are ours:
- which trackers: `auto` is TensorBoard when it is installed (nothing to set up, files in RUN/tb), a name
  asks for that tracker (a warning when it is not installed), `all` is every supported one installed;
  the older `--tensorboard/--no-tensorboard` adds or removes TensorBoard from that list;
- the config they record: TensorBoard's hparams take only int/float/str/bool (a tuple such as
  `channels` made `itsim train` crash before its first step), so values are flattened once for all of
  them: sequences -> "32,64,128", None -> "none";
- failures: a tracker is a side channel. Each one is started on its own (Accelerate's `init_trackers`
  starts them in one loop, so one failure would stop all), and one that fails to start or to log is
  dropped with one warning while training goes on.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from itsim.train.config import TrainConfig

log = logging.getLogger("itsim.train")

SUPPORTED = ("tensorboard", "wandb", "mlflow")
CHOICES = ("auto", "all", "none", *SUPPORTED)
PROJECT = "itsim"
_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def installed(name: str) -> bool:
    return any(importlib.util.find_spec(module) is not None for module in _MODULES[name])


def parse(report_to: str) -> list[str]:
    """`--report-to` as a list of words; raises ValueError naming a word that is not a choice."""
    words = [w.strip().lower() for w in str(report_to or "none").split(",") if w.strip()] or ["none"]
    bad = [w for w in words if w not in CHOICES]
    if bad:
        raise ValueError(f"--report-to {report_to!r}: {', '.join(bad)} is not one of {', '.join(CHOICES)} "
                         "(or a comma list of tensorboard, wandb, mlflow)")
    if len(words) > 1 and set(words) & {"auto", "all", "none"}:
        raise ValueError(f"--report-to {report_to!r}: auto, all and none stand alone")
    return words


def resolve(cfg: TrainConfig) -> list[str]:
    """The trackers to run: `--report-to` and the `--tensorboard/--no-tensorboard` alias, keeping only
    installed ones (with a warning for each one asked for by name that is not installed)."""
    words = parse(cfg.report_to)
    if words == ["auto"]:
        wanted, named = ["tensorboard"], set()
    elif words == ["all"]:
        wanted, named = list(SUPPORTED), set()
    elif words == ["none"]:
        wanted, named = [], set()
    else:
        wanted, named = list(dict.fromkeys(words)), set(words)
    if cfg.tensorboard is True and "tensorboard" not in wanted:
        wanted.append("tensorboard")
        named.add("tensorboard")
    elif cfg.tensorboard is False:
        wanted = [w for w in wanted if w != "tensorboard"]
    chosen = []
    for name in wanted:
        if installed(name):
            chosen.append(name)
        elif name in named and os.environ.get("RANK", "0") == "0":  # one warning, not one per rank
            log.warning("--report-to %s: %s is not installed (pip install %s); training goes on without it",
                        name, name, name)
    return chosen


def flat_config(values: dict[str, Any]) -> dict[str, int | float | str | bool]:
    """Config values every tracker accepts: sequences -> "a,b,c", None -> "none", mappings -> JSON."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in values.items():
        if value is None:
            flat[key] = "none"
        elif isinstance(value, (list, tuple)):
            flat[key] = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            flat[key] = json.dumps(value, sort_keys=True)
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        else:
            flat[key] = str(value)
    return flat


def _make(name: str, out: Path, logging_dir: str | None) -> Any:
    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":
        return cls(PROJECT, logging_dir)
    if name == "wandb":
        return cls(PROJECT, dir=str(out))  # the offline/online run folder goes in RUN/wandb
    return cls(PROJECT)


def start(accelerator: Any, config: dict[str, Any], out: Path) -> list[str]:
    """Start each tracker Accelerate was given (`log_with`) and record the config; returns the names
    that started. Main process only, as Accelerate does."""
    if not accelerator.is_main_process:
        return []
    values = flat_config(config)
    started = []
    for kind in accelerator.log_with:
        name = str(kind)
        try:
            tracker = _make(name, out, accelerator.logging_dir)
            tracker.start()
            tracker.store_init_configuration(values)
        except Exception as exc:  # noqa: BLE001 - a tracker must never fail the run
            log.warning("tracker %s did not start (%s: %s); training goes on without it", name,
                        type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
            continue
        accelerator.trackers.append(tracker)
        started.append(name)
    if started:
        log.info("logging to %s%s", ", ".join(started),
                 f" (TensorBoard: {Path(accelerator.logging_dir) / PROJECT})" if "tensorboard" in started else "")
    return started


def log_values(accelerator: Any, values: dict[str, Any], step: int) -> None:
    """`accelerator.log`, one tracker at a time: one that fails is dropped with one warning."""
    for tracker in list(accelerator.trackers):
        try:
            tracker.log(values, step=step)
        except Exception as exc:  # noqa: BLE001
            log.warning("tracker %s failed to log at step %d (%s: %s); no longer logging to it", tracker.name,
                        step, type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
            accelerator.trackers.remove(tracker)


def finish(accelerator: Any) -> None:
    """Close every tracker (a failure to close is a warning), then Accelerate's own end of training."""
    for tracker in list(accelerator.trackers):
        try:
            tracker.finish()
        except Exception as exc:  # noqa: BLE001
            log.warning("tracker %s failed to close (%s: %s)", tracker.name, type(exc).__name__, exc)
    accelerator.trackers.clear()
    accelerator.end_training()
