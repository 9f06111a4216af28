"""Checkpoint folders that are either complete or ignored.

A checkpoint is written by every rank into `checkpoints/.tmp-step_XXXXXXX` (Accelerate's
`save_state`: model, optimizer, grad scaler, each rank's RNG state), then the main process records
the training position and a SHA-256 of every file in `trainer_state.json` and renames the folder to
`step_XXXXXXX`. A folder without that file, or whose files no longer match it (truncated, garbage),
is never resumed from.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from itsim.errors import UserError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d{7,})$")


class CheckpointError(Exception):
    """A checkpoint could not be written or is not usable."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        if _sha256(f) != digest:
            raise CheckpointError(f"{path}: {name} is corrupt (checksum mismatch)")
    return state


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


def save(accelerator, directory: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically from all ranks; prune beyond `keep` (main process only).

    A full disk or any other OSError leaves earlier checkpoints untouched and raises CheckpointError.
    """
    directory = Path(directory)
    final = directory / checkpoint_name(step)
    tmp = directory / f".tmp-{final.name}"
    error: OSError | None = None
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except (OSError, RuntimeError) as exc:
        error = exc if isinstance(exc, OSError) else OSError(errno.EIO, str(exc))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            if error is not None:
                raise error
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            payload = json.dumps({**state, "step": step, "files": files}, indent=2)
            with (tmp / STATE_FILE).open("w") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # a rerun reached the same step: replace the old folder
                shutil.rmtree(final)
            tmp.rename(final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            why = "disk full" if exc.errno == errno.ENOSPC else str(exc)
            error = CheckpointError(f"could not write checkpoint {final.name}: {why}; earlier checkpoints kept")  # type: ignore[assignment]
        else:
            for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            for stale in directory.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
    if _any_rank(accelerator, error is not None):
        if isinstance(error, CheckpointError):
            raise error
        raise CheckpointError(f"could not write checkpoint {final.name}: {error or 'failed on another rank'}; "
                              "earlier checkpoints kept")
    return final


def _any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (so all ranks stop together)."""
    import torch

    return bool(accelerator.gather(torch.tensor([int(flag)], device=accelerator.device)).max().item())
