"""Checkpoint folders that are either complete or ignored.

A checkpoint is written by every rank into `checkpoints/.tmp-step_XXXXXXX` (Accelerate's
`save_state`: model, optimizer, grad scaler, each rank's RNG state), then the main process records
the training position and a SHA-256 of every file in `trainer_state.json` and renames the folder to
`step_XXXXXXX`. A folder without that file, whose files no longer match it (truncated, garbage), or
whose pickled files torch.load(weights_only=True) refuses (a planted payload), is never resumed from.
A run in an object store keeps the same contract with uploads instead of a rename (train/remote.py).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from accelerate.utils import broadcast_object_list

from itsim.errors import UserError
from itsim.io import atomic_write, sha256_file, write_error
from itsim.train.runtime import any_rank

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
PICKLED = (".bin", ".pkl", ".pt", ".pth")  # what Accelerate reads back with torch.load
_NAME = re.compile(r"^step_(\d{7,})$")


class CheckpointError(Exception):
    """A checkpoint could not be written or is not usable."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder's name (`step_0000012` -> 12); None for any other name."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temp folders and stray files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def verify(path: str | Path) -> dict[str, Any]:
    """The checkpoint's trainer state if every recorded file is present and intact; else CheckpointError."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path}: no {STATE_FILE} (incomplete checkpoint)")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{state_file}: unreadable ({exc})") from None
    for name, digest in state.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{path}: {name} is corrupt (checksum mismatch)")
        if f.suffix in PICKLED:
            _check_loads_safely(f)
    return state


def _check_loads_safely(path: Path) -> None:
    """Load a pickled state file as Accelerate's `load_state` will: torch.load(weights_only=True).

    The checksums only prove the files are the ones recorded, and anyone who can write the folder
    can record new ones. A file that weights_only refuses (a planted pickle payload, a foreign
    object) would crash the resume (optimizer) or, for the RNG states, be skipped by Accelerate
    with only an info log, silently breaking exact resume; so the checkpoint is unusable.
    """
    from accelerate.utils import load

    try:
        load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(f"{path.parent}: {path.name} cannot be loaded safely "
                              f"({type(exc).__name__}: {first})") from None


def find_resume(directory: str | Path, resume: str) -> tuple[Path, dict[str, Any]] | None:
    """`auto`: the newest intact checkpoint (warning about each bad one skipped), or None.
    A path: that checkpoint, or a UserError saying why it cannot be used."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"--resume {resume}: no such checkpoint folder")
        try:
            return path, verify(path)
        except CheckpointError as exc:
            raise UserError(f"--resume {resume}: {exc}") from None
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, verify(path)
        except CheckpointError as exc:
            log.warning("skipping unusable checkpoint %s: %s", path.name, exc)
    log.info("--resume auto: no usable checkpoint in %s, starting fresh", directory)
    return None


def choose_resume(accelerator: Any, directory: Any, resume: str,
                  find: Callable[[Any, str], tuple[Any, dict[str, Any]] | None] = find_resume
                  ) -> tuple[Any, dict[str, Any]] | None:
    """`find(directory, resume)` (`find_resume`: a local folder) on the main process only; every rank gets
    its choice (path, a Path, or a store URL, a str; and trainer state).

    On a shared filesystem with attribute caching (NFS) ranks can list the checkpoint folder
    differently, pick different "newest" checkpoints, and then issue mismatched collectives. A
    UserError on the main process (a bad `--resume` path) reaches every rank, so none waits for the
    broadcast in vain.
    """
    if not resume:
        return None
    if accelerator.num_processes == 1:
        return find(directory, resume)
    choice: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            found = find(directory, resume)
            choice = [{"path": str(found[0]), "url": isinstance(found[0], str), "state": found[1]} if found
                      else {"path": None}]
        except UserError as exc:
            choice = [{"error": str(exc)}]
    choice = broadcast_object_list(choice, from_process=0)[0]
    if "error" in choice:
        raise UserError(choice["error"])
    if not choice["path"]:
        return None
    return (choice["path"] if choice["url"] else Path(choice["path"])), choice["state"]


def _why(exc: BaseException, directory: Path) -> str:
    """The failure in words; a failed write with less space free than the newest checkpoint took is a full disk."""
    done = list_checkpoints(directory)
    needed = sum(p.stat().st_size for p in done[-1].iterdir() if p.is_file()) if done else 0
    return write_error(exc, directory, needed)


def save(accelerator, directory: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically from all ranks; prune beyond `keep` (main process only).

    A full disk or any other write error leaves earlier checkpoints untouched, removes the partial
    folder and raises CheckpointError.
    """
    directory = Path(directory)
    final = directory / checkpoint_name(step)
    tmp = directory / f".tmp-{final.name}"
    error: BaseException | None = None
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except Exception as exc:  # noqa: BLE001 - OSError, torch's RuntimeError, safetensors' SafetensorError
        error = exc
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if error is None:
            try:
                files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
                atomic_write(tmp / STATE_FILE, json.dumps({**state, "step": step, "files": files}, indent=2), fsync=True)
                if final.exists():  # a rerun reached the same step: replace the old folder
                    shutil.rmtree(final)
                tmp.rename(final)
            except OSError as exc:
                error = exc
        if error is not None:
            why = _why(error, directory)  # before the partial folder frees its space
            shutil.rmtree(tmp, ignore_errors=True)
            error = CheckpointError(f"could not write checkpoint {final.name}: {why}; earlier checkpoints kept")
        else:
            for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            for stale in directory.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
    if any_rank(accelerator, error is not None):
        if isinstance(error, CheckpointError):
            raise error
        why = _why(error, directory) if error is not None else "failed on another rank"
        raise CheckpointError(f"could not write checkpoint {final.name}: {why}; earlier checkpoints kept")
    return final
