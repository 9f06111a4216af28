"""A run whose `--out` is a store URL: the layout and contracts of a local run, kept in the bucket.

`itsim train --out s3://bucket/run` leaves `RUN/config.yaml`, `RUN/metrics.jsonl`,
`RUN/checkpoints/step_XXXXXXX/` and `RUN/model/` (plus `tb/`, `audit/`, `train_summary.json`) in the
bucket, exactly where a local run has them. Each process writes into its own local staging folder
(`--stage-dir`/rank<N>, by default a temporary folder, removed when the process ends) as a local run
writes its folder, and uploads:

- `config.yaml` at the start, which also proves the run folder can be written before any training;
- each checkpoint: every rank uploads the files it wrote itself (on several machines without a shared
  filesystem a rank's RNG state exists only on its machine), the ranks meet and pass their files'
  SHA-256 to rank 0, which uploads the checksummed `trainer_state.json` LAST. S3 has no rename; the
  state file is the commit, so a checkpoint in the bucket is complete or not there (`--resume auto`
  ignores one without it, or whose objects do not match it), as a local one is;
- `metrics.jsonl` after every checkpoint; at the end `RUN/model/` (`config.json` last), `metrics.jsonl`,
  `tb/`, the audit files (each rank its own) and `train_summary.json`.

`--keep` deletes old checkpoints state file first, so a half-deleted one is never "complete".
`--resume auto`: rank 0 lists the checkpoints, downloads the newest that has a state file into its
staging folder and checks every checksum (and that its pickles load safely), falling back to older ones;
its choice is broadcast (`checkpoint.choose_resume`) and every other rank downloads the same checkpoint.

Why this rather than open_clip's `--remote-sync` (a local run folder copied to a bucket now and then):
one contract for where a run lives. A reader of the bucket (`--resume auto`, `itsim eval --model
RUN/model`, a person) sees the layout of a local run, never a mirror caught halfway through a copy;
what is uploaded is complete, in an order that commits it; and no local folder has to outlive the job
(a preempted node's disk is gone), since a resumed run needs nothing but the bucket.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from accelerate.utils import gather_object

from itsim import storage, storage_stream
from itsim.errors import UserError
from itsim.io import atomic_write, sha256_file, write_error
from itsim.storage import NotFound, StorageError
from itsim.storage_errors import scrub
from itsim.train import checkpoint
from itsim.train.checkpoint import STATE_FILE, CheckpointError
from itsim.train.config import TrainConfig
from itsim.train.runtime import any_rank

log = logging.getLogger("itsim.train")

RESUME_DIR = ".resume"  # in the staging folder: the checkpoint downloaded to resume from


@dataclass
class RunDir:
    """Where a run lives (`url`: --out as given) and where this process writes it (`local`): the run
    folder itself for a local run, this process's staging folder for a URL."""

    url: str
    local: Path
    remote: bool = False
    options: Mapping[str, Any] | None = field(default=None, repr=False)

    def url_of(self, *names: str) -> str:
        return storage.join(self.url, *names)

    def fetch(self, name: str) -> None:
        """A URL run: copy `RUN/name` into the staging folder when it exists (a file a resumed run appends to)."""
        if self.remote:
            try:
                storage_stream.download(self.url_of(name), str(self.local / name), self.options)
            except NotFound:
                pass

    def push(self, *names: str) -> None:
        """A URL run: upload each staged file that exists to the same name below RUN."""
        for name in names if self.remote else ():
            if (self.local / name).is_file():
                storage.upload_file(str(self.local / name), self.url_of(name), self.options)

    def push_tree(self, name: str, last: tuple[str, ...] = ()) -> None:
        if self.remote and (self.local / name).is_dir():
            storage.upload_tree(str(self.local / name), self.url_of(name), self.options, last=last)

    def publish(self, accelerator: Any) -> None:
        """End of the run: each rank's audit file; the main process's tracker logs, metrics, model
        (config.json, which readers open first, last) and summary."""
        self.push(f"audit/rank{accelerator.process_index}.jsonl")
        if accelerator.is_main_process:
            for name in ("tb", "wandb"):
                self.push_tree(name)
            self.push("metrics.jsonl")
            self.push_tree("model", last=("config.json",))
            self.push("train_summary.json")
        if self.remote:
            log.info("run uploaded to %s", scrub(self.url))

    def drop_resume_copy(self) -> None:
        """A URL run: the checkpoint downloaded to resume from is loaded; its local copy goes."""
        if self.remote:
            shutil.rmtree(self.local / RESUME_DIR, ignore_errors=True)

    def close(self) -> None:
        """Remove the staging folder: everything a run needs again is in the bucket (a run whose last
        uploads failed resumes from its last checkpoint there and exports its model again)."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def open_run(cfg: TrainConfig) -> RunDir:
    """`--out` resolved (an unsupported URL is refused here, never made a local folder); a URL gets this
    process's staging folder, emptied of anything an earlier process left."""
    loc = storage.resolve(cfg.out, cfg.storage_options)
    if loc.fs is None:
        if cfg.stage_dir:
            log.warning("--stage-dir is used only with a URL --out; ignored")
        return RunDir(cfg.out, Path(loc.path))
    rank = os.environ.get("RANK", "0")
    if cfg.stage_dir:
        local = Path(storage.require_local(cfg.stage_dir, "--stage-dir")) / f"rank{rank}"
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
    else:
        local = Path(tempfile.mkdtemp(prefix=f"itsim-run-rank{rank}-"))
    log.debug("staging %s in %s", scrub(cfg.out), local)
    return RunDir(cfg.out, local, remote=True, options=cfg.storage_options)


# ---- checkpoints in a store ----------------------------------------------------------------------

def list_checkpoints(run: RunDir) -> list[str]:
    """URLs of `RUN/checkpoints/step_*`, oldest first, complete or not."""
    found = []
    for url in storage.ls(run.url_of("checkpoints"), run.options):
        step = checkpoint.step_of(url.rstrip("/").rsplit("/", 1)[-1])
        if step is not None:
            found.append((step, url))
    return [url for _, url in sorted(found)]


def _delete(url: str, options: Mapping[str, Any] | None) -> None:
    """Remove a checkpoint, its state file first: a half-deleted checkpoint is never taken for a complete one."""
    storage.delete(storage.join(url, STATE_FILE), options)
    storage.delete(url, options, recursive=True)


def prune(run: RunDir, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (all with 0); remove incomplete ones (a killed run's uploads)."""
    found = list_checkpoints(run)
    complete = [u for u in found if storage.exists(storage.join(u, STATE_FILE), run.options)]
    old = complete[:-keep] if keep > 0 else []
    for url in old + [u for u in found if u not in complete]:
        _delete(url, run.options)


def _why(exc: BaseException, where: Path) -> str:
    if isinstance(exc, StorageError):
        return str(exc)
    return write_error(exc, where)


def save(accelerator: Any, run: RunDir, step: int, state: dict[str, Any], keep: int) -> str:
    """Write checkpoint `step` to `RUN/checkpoints/step_XXXXXXX` from all ranks: each rank its own files,
    then the main process the state file with every rank's checksums; prune beyond `keep`. Any failure
    leaves earlier checkpoints as they were and raises CheckpointError on every rank."""
    name = checkpoint.checkpoint_name(step)
    url = run.url_of("checkpoints", name)
    tmp = run.local / "checkpoints" / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:  # a rerun reaching the same step: the old checkpoint stops being complete before it is replaced
            _delete(url, run.options)
        except StorageError as exc:
            error = exc
    accelerator.wait_for_everyone()
    files: dict[str, str] = {}
    try:
        accelerator.save_state(str(tmp))
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        if error is None:
            storage.upload_tree(str(tmp), url, run.options)
    except Exception as exc:  # noqa: BLE001 - OSError, StorageError, torch's RuntimeError, ...
        error = error or exc
    reports = gather_object([{"files": files, "error": _why(error, tmp.parent) if error else None}])
    problems = [r["error"] for r in reports if r["error"]]
    if accelerator.is_main_process and not problems:
        try:
            merged = {k: v for r in reports for k, v in r["files"].items()}
            atomic_write(tmp / STATE_FILE, json.dumps({**state, "step": step, "files": merged}, indent=2))
            storage.upload_file(str(tmp / STATE_FILE), storage.join(url, STATE_FILE), run.options)  # the commit
            prune(run, keep)
        except Exception as exc:  # noqa: BLE001
            problems.append(_why(exc, tmp.parent))
    failed = any_rank(accelerator, bool(problems))
    shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        why = problems[0] if problems else "failed on the main process"
        raise CheckpointError(f"could not write checkpoint {name} to {scrub(url)}: {why}; earlier checkpoints kept")
    return url


def download(run: RunDir, url: str) -> tuple[Path, dict[str, Any]]:
    """Copy checkpoint `url` into the staging folder and verify it there: (local folder, trainer state).
    CheckpointError when it is incomplete (no state file, a file missing) or does not match its state file."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    local = run.local / RESUME_DIR / name
    shutil.rmtree(local, ignore_errors=True)
    try:
        raw = storage.read_bytes(storage.join(url, STATE_FILE), run.options)
    except NotFound:
        raise CheckpointError(f"{scrub(url)}: no {STATE_FILE} (incomplete checkpoint)") from None
    try:
        listed = sorted(json.loads(raw).get("files", {}))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{scrub(url)}/{STATE_FILE}: unreadable ({exc})") from None
    present = set(storage.files_under(url, run.options))
    for file in listed:
        if "/" in file or file.startswith(".") or file not in present:
            raise CheckpointError(f"{scrub(url)}: missing {file}")
    local.mkdir(parents=True)
    (local / STATE_FILE).write_bytes(raw)
    for file in listed:
        storage_stream.download(storage.join(url, file), str(local / file), run.options)
    try:
        return local, checkpoint.verify(local)
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace(str(local), scrub(url))) from None


def find_resume(run: RunDir, resume: str) -> tuple[str, dict[str, Any]] | None:
    """`auto`: the newest usable checkpoint in the bucket (downloaded; a warning for each one skipped), or
    None. A URL: that checkpoint, or a UserError saying why it cannot be used."""
    if resume != "auto":
        try:
            return resume, download(run, resume)[1]
        except CheckpointError as exc:
            raise UserError(f"--resume {scrub(resume)}: {exc}") from None
    for url in reversed(list_checkpoints(run)):
        try:
            return url, download(run, url)[1]
        except CheckpointError as exc:
            log.warning("skipping unusable checkpoint %s: %s", url.rstrip("/").rsplit("/", 1)[-1], exc)
    log.info("--resume auto: no usable checkpoint in %s, starting fresh", scrub(run.url_of("checkpoints")))
    return None


def choose_resume(accelerator: Any, run: RunDir, resume: str) -> tuple[Path, str, dict[str, Any]] | None:
    """The checkpoint to resume from on every rank: (its local copy, its URL, trainer state). The main
    process chooses (and has downloaded it), the others download its choice; a failed download on
    any rank is an error on every rank."""
    found = checkpoint.choose_resume(accelerator, run, resume, find=find_resume)
    if not found:
        return None
    url, state = str(found[0]), found[1]
    local, error = run.local / RESUME_DIR / url.rstrip("/").rsplit("/", 1)[-1], None
    if not accelerator.is_main_process:
        try:
            local = download(run, url)[0]
        except (CheckpointError, StorageError) as exc:
            error = f"rank {accelerator.process_index}: --resume {scrub(url)}: {exc}"
    if any_rank(accelerator, error is not None):
        raise UserError(error or f"--resume {scrub(url)}: the download failed on another rank")
    return local, url, state


def find_checkpoint(cfg: TrainConfig, accelerator: Any, run_dir: RunDir) -> tuple[Path, Any, dict] | None:
    """(local folder to load, where it lives, trainer state) of the checkpoint to resume from; the main
    process decides. A URL run looks in the bucket (and downloads the choice), unless `--resume` names a
    local folder."""
    if run_dir.remote and (cfg.resume == "auto" or storage.is_url(cfg.resume)):
        found = choose_resume(accelerator, run_dir, cfg.resume)
        return (found[0], scrub(found[1]), found[2]) if found else None
    if storage.is_url(cfg.resume):
        storage.require_local(cfg.resume, "--resume with a local --out")
    found = checkpoint.choose_resume(accelerator, run_dir.local / "checkpoints", cfg.resume)
    return (found[0], found[0], found[1]) if found else None
