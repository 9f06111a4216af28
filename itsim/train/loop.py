"""The training loop: one obvious loop driven by Accelerate.

Run it as `itsim train ...` on one process, or `accelerate launch -m itsim.train ...` on many
processes and machines. Accelerate handles devices, DDP, mixed precision and gradient accumulation;
the data pipeline is built per rank (see data/loader.py, or data/resident.py with --data-on-device)
and never passed through `prepare()`.
`train()` reads top to bottom; each phase (setup, step, logging, validation, checkpoint, export) is a
named function below it. `--shards` and `--out` may be store URLs: the loader streams shards from the
store, and a URL run is written through a local staging folder and uploaded (train/remote.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from accelerate.utils import set_seed

from itsim import config, progress as progress_lines
from itsim.data.loader import (StreamSpec, batch_nbytes, batches_per_epoch, load_vocab, make_loader, one_line_errors,
                               plan_prefetch, read_manifest, shm_free, split_shards)
from itsim.data.pairs import step_generator
from itsim.data.resident import ResidentBatches, ResidentSplit, check_fits, load_split, memory_budget
from itsim.errors import UserError
from itsim.model import ItsimModel, Preprocess, count_parameters, images_to_float, save_model
from itsim.storage_errors import scrub
from itsim.text import Vocab
from itsim.train import checkpoint, remote, trackers as tracking
from itsim.train.augment import augment, parse_ops
from itsim.train.config import TrainConfig, lr_at
from itsim.train.objective import step_loss
from itsim.train.runtime import (StopFlag, any_rank, configure_backends, cpu_threads, looks_like_peer_failure,
                                 make_accelerator, param_checksum)
from itsim.train.validate import ValidationSet

log = logging.getLogger("itsim.train")


@dataclass
class Run:
    """Everything the loop works with, built once by `setup`."""

    cfg: TrainConfig
    accelerator: Any
    trackers: list[str]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: Any
    val: ValidationSet | None
    vocab: Vocab
    pre: Preprocess
    out: Path  # where this process writes the run: RUN itself, or its staging folder when --out is a URL
    dir: remote.RunDir
    n_train: int
    batches_per_epoch: int
    total: int
    workers: int
    step: int = 0
    aug_ops: tuple[str, ...] = ()
    metrics_file: TextIO | None = None
    audit_file: TextIO | None = None
    last_checkpoint: Path | str | None = None
    stopped_by: str | None = None  # the signal that stopped training early


@dataclass
class Window:
    """Running sums between two log lines. Loss and correct pairs stay device tensors until the log
    step reads them (one host sync per `--log-every` steps instead of two per step)."""

    loss: torch.Tensor | float = 0.0
    correct: torch.Tensor | float = 0.0
    pairs: int = 0
    images: int = 0
    wait: float = 0.0
    time: float = 0.0
    batches: int = 0
    bad_samples: dict[int, int] = field(default_factory=dict)  # per loader worker, cumulative


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, checkpoint, validate, export `RUN/model/`; returns the final summary."""
    run_dir = remote.open_run(cfg)  # --out resolved; a URL gets this process's staging folder
    try:
        return run_training(setup(cfg, run_dir))
    finally:
        run_dir.close()


def run_training(run: Run) -> dict[str, Any]:
    """The loop itself, from `setup`'s Run to `finish`'s summary."""
    cfg = run.cfg
    stop = StopFlag().install()
    # A bar on a terminal; in a log file one line per --log-every steps (set_postfix in log_window).
    progress = progress_lines.progress(run.total, "train", "step", logger=log, initial=run.step, seconds=0,
                                       disable=not run.accelerator.is_main_process, dynamic_ncols=True)
    window, last_val = Window(), {}
    batch_index = run.step * cfg.grad_accum
    data_iter = one_line_errors(run.loader)  # a worker's store error as its own one line
    run.model.train()
    try:
        while run.step < run.total:
            t0 = time.perf_counter()
            batch = next(data_iter)
            t_data = time.perf_counter() - t0
            loss, correct, n_pairs = train_step(run, batch, batch_index)
            if run.audit_file:
                run.audit_file.write(json.dumps({"batch": batch_index, "keys": batch["keys"]}) + "\n")
            batch_index += 1
            window.bad_samples[batch["worker"]] = batch["bad_samples"]
            add_to_window(window, loss, correct, n_pairs, batch["images"].shape[0], t_data, time.perf_counter() - t0)
            if not run.accelerator.sync_gradients:
                continue
            run.step += 1
            progress.update(1)
            log_step = run.step % cfg.log_every == 0 or run.step == run.total
            if log_step:
                log_window(run, window, batch_index, progress)
                window = Window(bad_samples=window.bad_samples)
            if run.val is not None and (run.step == run.total or (cfg.eval_every and run.step % cfg.eval_every == 0)):
                last_val = validate(run)
            # The ranks agree on stopping at log steps only: a collective (and a host sync) per step
            # would stall the GPU; a signal therefore ends the run within --log-every steps.
            should_stop = log_step and any_rank(run.accelerator, stop.raised)
            if run.step % cfg.checkpoint_every == 0 or run.step == run.total or should_stop:
                save_checkpoint(run)
            if should_stop:
                run.stopped_by = stop.signal or "a signal on another rank"
                log.warning("stopped by signal at step %d; resume with --resume auto", run.step)
                break
    except checkpoint.CheckpointError as exc:
        raise UserError(str(exc)) from None
    except RuntimeError as exc:
        if run.accelerator.num_processes > 1 and looks_like_peer_failure(exc):
            raise UserError(f"rank {run.accelerator.process_index}: a collective failed, another rank probably died "
                            f"({str(exc).splitlines()[0][:200]})") from None
        raise
    finally:
        data_iter.close()  # the loader's workers end here (see one_line_errors)
        stop.restore()
        progress.close()
        close_files(run)
    return finish(run, last_val)


def setup(cfg: TrainConfig, run_dir: remote.RunDir | None = None) -> Run:
    """Check the inputs, build the accelerator, model, optimizer and this rank's data stream; resume."""
    config.check(cfg, ("shards",), [
        (cfg.negatives_k >= 1, f"--negatives-k must be >= 1 (got {cfg.negatives_k})"),
        (cfg.captions_per_image >= 0, f"--captions-per-image must be >= 0 (got {cfg.captions_per_image})"),
        (cfg.contrastive_dim > 0 or (cfg.itc_weight == 0 and cfg.negatives != "itc"),
         "--itc-weight and --negatives itc need --contrastive-dim > 0"),
        (0 <= cfg.word_dropout < 1, f"--word-dropout must be in [0, 1) (got {cfg.word_dropout})")])
    opts = cfg.storage_options
    manifest = read_manifest(cfg.shards, opts)
    train_shards = split_shards(cfg.shards, "train", opts)
    n_train = int(manifest.get("splits", {}).get("train", {}).get("images", 0))
    if not train_shards or n_train == 0:
        raise UserError(f"{cfg.shards}: the train split is empty")
    params = manifest.get("config", {})
    pre = Preprocess(image_size=int(params.get("image_size", 299)), resize=str(params.get("resize", "stretch")),
                     max_len=int(params.get("max_len", 100)))
    vocab = load_vocab(cfg.shards, opts)
    aug_ops = parse_ops(cfg.augment)

    run_dir = run_dir or remote.open_run(cfg)
    accelerator, trackers = make_accelerator(cfg, run_dir.local)
    out = run_dir.local
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        config.save(cfg, out / "config.yaml")
        run_dir.push("config.yaml")  # a URL --out: writable, before any training
        run_dir.fetch("metrics.jsonl")  # appended to, as a local run's
        log.info("%s", config.describe(cfg))
        log.info("distributed: %s, %d process(es), device %s, mixed precision %s",
                 accelerator.distributed_type, accelerator.num_processes, accelerator.device, accelerator.mixed_precision)
    set_seed(cfg.seed)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))))
    configure_backends(accelerator.device)
    model, optimizer = accelerator.prepare(*build_model(cfg, len(vocab), accelerator.device, accelerator.num_processes))

    workers = max(0, cfg.workers)
    resident = load_resident(cfg, accelerator.device, pre, n_train) if cfg.data_on_device else None
    n_train = len(resident) if resident is not None else n_train
    bpe = batches_per_epoch(n_train, cfg.batch_size, accelerator.num_processes)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * bpe / cfg.grad_accum))
    step = resume(cfg, accelerator, run_dir, workers, total)
    if resident is not None:
        loader: Any = ResidentBatches(resident, cfg.batch_size, bpe, cfg.seed, accelerator.process_index,
                                      accelerator.num_processes, start_batch=step * cfg.grad_accum)
    else:
        loader = stream_loader(cfg, accelerator, manifest, pre, train_shards, bpe, step * cfg.grad_accum)

    val = None
    if accelerator.is_main_process and manifest.get("splits", {}).get(cfg.val_split, {}).get("shards"):
        val = ValidationSet.from_shards(cfg.shards, cfg.val_split, cfg.val_max_images, opts)
    if trackers:  # each started on its own: one that fails only warns (trackers.py)
        tracking.start(accelerator, config.to_dict(cfg), out)
    run = Run(cfg=cfg, accelerator=accelerator, trackers=trackers, model=model, optimizer=optimizer, loader=loader,
              val=val, vocab=vocab, pre=pre, out=out, dir=run_dir, n_train=n_train, batches_per_epoch=bpe, total=total,
              workers=workers, step=step, aug_ops=aug_ops)
    open_files(run)
    log.info("model: %s parameters; %d train images, %d batches/epoch/rank, %d steps", f"{count_parameters(model):,}",
             n_train, bpe, total)
    return run


def load_resident(cfg: TrainConfig, device: torch.device, pre: Preprocess, n_train: int) -> ResidentSplit:
    """--data-on-device: the train split decoded once onto the device, or a UserError when it would not fit."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    budget, source = memory_budget(device, cfg.device_memory_gb, local_ranks)
    need = check_fits(n_train, pre.image_size, budget, source)
    start = time.perf_counter()
    data = load_split(cfg.shards, "train", n_train, pre.image_size, device, threads=max(1, cfg.workers),
                      options=cfg.storage_options)
    log.info("--data-on-device: %d train images decoded into %.2f GB on %s in %.1f s (budget %.2f GB: %s)",
             len(data), need / 1e9, device, time.perf_counter() - start, budget / 1e9, source)
    return data


def stream_loader(cfg: TrainConfig, accelerator: Any, manifest: dict[str, Any], pre: Preprocess,
                  train_shards: list[str], bpe: int, start_batch: int) -> Any:
    """The default data path: this rank's WebDataset stream (data/loader.py)."""
    workers = max(0, cfg.workers)
    spec = StreamSpec(shards=train_shards, batch_size=cfg.batch_size, batches_per_epoch=bpe, seed=cfg.seed,
                      rank=accelerator.process_index, world_size=accelerator.num_processes,
                      shuffle_buffer=cfg.shuffle_buffer, start_batch=start_batch, options=cfg.storage_options)
    if len(train_shards) < accelerator.num_processes * max(1, workers):
        log.warning("%d train shards for %d ranks x %d workers: sampling shards with replacement",
                    len(train_shards), accelerator.num_processes, max(1, workers))
    return make_loader(spec, workers=workers, pin_memory=accelerator.device.type == "cuda",
                       prefetch=loader_prefetch(manifest, cfg, pre, workers, accelerator.num_processes))


def loader_prefetch(manifest: dict[str, Any], cfg: TrainConfig, pre: Preprocess, workers: int,
                    num_processes: int) -> int:
    """Prefetch factor that fits this machine's /dev/shm (see `plan_prefetch`)."""
    train = manifest.get("splits", {}).get("train", {})
    captions = max(5, math.ceil(train.get("captions", 0) / max(1, train.get("images", 1))))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
    return plan_prefetch(batch_nbytes(cfg.batch_size, pre.image_size, captions, pre.max_len), workers, local_ranks,
                         shm_free())


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device,
                num_processes: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model: torch.nn.Module = ItsimModel(cfg.model_config(vocab_size))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and num_processes > 1:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.warning("--sync-bn needs GPUs; ignored on %s", device)
    if cfg.compile:
        model.image_encoder.compile()
        model.fusion.compile()
    return model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def resume(cfg: TrainConfig, accelerator: Any, run_dir: remote.RunDir, workers: int, total: int) -> int:
    """Load the checkpoint `--resume` names (or the newest intact one); the step to continue from."""
    found = remote.find_checkpoint(cfg, accelerator, run_dir)
    step = 0
    if found:
        path, where, state = found
        accelerator.load_state(str(path))
        run_dir.drop_resume_copy()
        step = int(state["step"])
        same_data = (state.get("world_size") == accelerator.num_processes
                     and bool(state.get("data_on_device")) == cfg.data_on_device
                     and (cfg.data_on_device or state.get("workers") == workers))
        if not same_data:
            log.warning("resuming with a different worker/process count or data path: the data order will differ")
        log.info("resumed from %s (step %d)", where, step)
    if step >= total:
        log.info("already at step %d of %d", step, total)
    return step


def train_step(run: Run, batch: dict[str, Any], batch_index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One forward/backward (and an optimizer step when gradients are synced): (loss, correct, pairs)."""
    cfg, accelerator = run.cfg, run.accelerator
    gen = step_generator(cfg.seed, batch_index, accelerator.process_index)
    with accelerator.accumulate(run.model):
        images = images_to_float(batch["images"].to(accelerator.device, non_blocking=True), cfg.channels_last)
        images = augment(images, run.aug_ops, gen)
        loss, correct, n_pairs = step_loss(run.model, images, batch, cfg, gen)
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        for group in run.optimizer.param_groups:
            group["lr"] = lr_at(run.step, cfg, run.total)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss, correct, n_pairs


def add_to_window(w: Window, loss: torch.Tensor, correct: torch.Tensor, n_pairs: int, n_images: int,
                  wait: float, seconds: float) -> None:
    """Accumulate one step; device tensors are added on the device, nothing is read back here."""
    w.loss = w.loss + loss.detach()
    w.correct = w.correct + correct.detach()
    w.pairs += n_pairs
    w.images += n_images
    w.wait += wait
    w.time += seconds
    w.batches += 1


def log_window(run: Run, w: Window, batch_index: int, progress: Any) -> None:
    n = run.accelerator.num_processes
    loss, correct = float(w.loss), float(w.correct)  # the window's one host sync
    row = {"step": run.step, "epoch": round(batch_index / run.batches_per_epoch, 3), "loss": loss / w.batches,
           "lr": lr_at(run.step - 1, run.cfg, run.total), "train_acc": correct / max(1, w.pairs),
           "images_per_s": n * w.images / w.time, "pairs_per_s": n * w.pairs / w.time,
           "data_wait": w.wait / w.time, "bad_samples": sum(w.bad_samples.values())}
    record(run, row)
    progress.set_postfix(**{"loss": f"{row['loss']:.4f}", "acc": f"{row['train_acc']:.3f}",
                            "img/s": f"{row['images_per_s']:.0f}", "data wait": f"{row['data_wait']:.0%}"})


def validate(run: Run) -> dict[str, Any]:
    result = run.val.evaluate(run.accelerator.unwrap_model(run.model), run.accelerator.device)
    record(run, {"step": run.step, **result})
    log.info("step %d: %s", run.step, ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    run.model.train()
    return result


def record(run: Run, row: dict[str, Any]) -> None:
    """One line of metrics.jsonl (main process) and the trackers."""
    if run.metrics_file:
        run.metrics_file.write(json.dumps(row) + "\n")
        run.metrics_file.flush()
        if run.trackers:
            tracking.log_values(run.accelerator, {k: v for k, v in row.items() if k != "step"}, row["step"])


def save_checkpoint(run: Run) -> None:
    state = {"epoch": run.step * run.cfg.grad_accum // run.batches_per_epoch,
             "batches_consumed": run.step * run.cfg.grad_accum, "workers": run.workers,
             "world_size": run.accelerator.num_processes, "seed": run.cfg.seed, "total_steps": run.total,
             "data_on_device": run.cfg.data_on_device}
    if not run.dir.remote:
        run.last_checkpoint = checkpoint.save(run.accelerator, run.out / "checkpoints", run.step, state, keep=run.cfg.keep)
        return
    run.last_checkpoint = scrub(remote.save(run.accelerator, run.dir, run.step, state, keep=run.cfg.keep))
    if run.metrics_file:
        run.dir.push("metrics.jsonl")


def open_files(run: Run) -> None:
    if run.accelerator.is_main_process:
        run.metrics_file = (run.out / "metrics.jsonl").open("a")
    if run.cfg.audit:  # one file per rank: no rank writes another's file
        (run.out / "audit").mkdir(parents=True, exist_ok=True)
        run.dir.fetch(f"audit/rank{run.accelerator.process_index}.jsonl")
        run.audit_file = (run.out / "audit" / f"rank{run.accelerator.process_index}.jsonl").open("a")


def close_files(run: Run) -> None:
    if run.metrics_file:
        run.metrics_file.close()
    if run.audit_file:
        run.audit_file.write(json.dumps({"final_step": run.step, "param_checksum": param_checksum(run.model)}) + "\n")
        run.audit_file.close()


def finish(run: Run, last_val: dict[str, Any]) -> dict[str, Any]:
    """Export `RUN/model/` when training reached its last step; the summary either way."""
    summary = {"step": run.step, "total_steps": run.total, "stopped_early": run.step < run.total, **last_val,
               "stopped_by": run.stopped_by, "checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None}
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process and run.step >= run.total:
        model_dir = save_model(run.out / "model", run.accelerator.unwrap_model(run.model), run.vocab, run.pre,
                               extra={"train": {"steps": run.step, "shards": scrub(run.cfg.shards), **last_val}})
        summary["model_dir"] = scrub(run.dir.url_of("model")) if run.dir.remote else str(model_dir)
        (run.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        log.info("model written to %s", summary["model_dir"])
    tracking.finish(run.accelerator)  # also with no tracker: it ends the process group (a clean exit)
    run.dir.publish(run.accelerator)  # a URL run: the model, metrics, logs and summary to the bucket
    return summary


run = train  # every stage's entry point is `run(cfg)`


def _cli(args: Any) -> int:
    summary = train(config.from_args(TrainConfig, args))
    return 0 if summary else 1


def add_cli(subparsers: Any) -> None:
    config.add_command(subparsers, "train", TrainConfig, _cli,
                       help="train a model on shards (also: accelerate launch -m itsim.train)")
