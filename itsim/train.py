"""The training loop: one obvious loop driven by Accelerate.

Run it as `itsim train ...` on one process, or `accelerate launch -m itsim.train ...` on many
processes and machines. Accelerate handles devices, DDP, mixed precision and gradient accumulation;
the data pipeline is built per rank (see data/loader.py) and never passed through `prepare()`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from itsim import checkpoint, config
from itsim.augment import augment, parse_ops
from itsim.data.loader import StreamSpec, batches_per_epoch, make_loader, read_manifest, split_shards
from itsim.data.pairs import step_generator
from itsim.errors import UserError
from itsim.model import ItsimModel, ModelConfig, Preprocess, count_parameters, images_to_float, save_model
from itsim.objective import step_loss
from itsim.text import Vocab
from itsim.train_runtime import (StopFlag, any_rank, cpu_threads, looks_like_peer_failure, make_accelerator,
                                 param_checksum)
from itsim.validate import ValidationSet

log = logging.getLogger("itsim.train")


@dataclass
class TrainConfig:
    shards: str = field(default="", metadata={"help": "shard folder written by `itsim build-shards`"})
    out: str = field(default="runs/train", metadata={"help": "run folder (checkpoints, metrics, model)"})
    steps: int = field(default=0, metadata={"help": "optimizer steps; 0 = derive from --epochs"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the train images when --steps is 0"})
    batch_size: int = field(default=64, metadata={"help": "images per batch per process"})
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = field(default=0.05, metadata={"help": "cosine schedule floor, as a fraction of --lr"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 = off"})
    grad_accum: int = 1
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "auto = bf16 on GPU, no (fp32) on CPU"})
    pairs: Literal["balanced", "in-batch"] = field(default="balanced", metadata={"help": "how to form true/false pairs"})
    negatives: Literal["random", "hard"] = field(default="random", metadata={"help": "in-batch negatives"})
    negatives_k: int = field(default=7, metadata={"help": "negative captions per image (in-batch)"})
    captions_per_image: int = field(default=0, metadata={
        "help": "captions per image per step: 0 = all of them (every image-caption pair, one CNN pass), N = N random"})
    label_smoothing: float = 0.0
    augment: str = field(default="", metadata={"help": "comma list of crop,flip ('' = none)"})
    checkpoint_every: int = 250
    keep: int = field(default=3, metadata={"help": "checkpoints kept"})
    eval_every: int = field(default=250, metadata={"help": "validate every N steps (0 = only at the end)"})
    log_every: int = 10
    val_split: str = "val"
    val_max_images: int = 1000
    resume: str = field(default="", metadata={"help": "'auto' (newest complete checkpoint) or a checkpoint path"})
    seed: int = 0
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes per rank"})
    threads: int = field(default=0, metadata={
        "help": "CPU compute threads per rank; 0 = OMP_NUM_THREADS if set, else the CPUs / local ranks"})
    shuffle_buffer: int = 1000
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm across GPUs"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the image encoder and head"})
    dist_timeout: int = field(default=600, metadata={"help": "seconds before a stuck collective fails"})
    tensorboard: bool = field(default=True, metadata={"help": "log to TensorBoard when it is installed"})
    audit: bool = field(default=False, metadata={
        "help": "each rank writes the sample keys it trained on and a parameter checksum to RUN/audit/"})
    # Model sizes (defaults: the reference design).
    channels: tuple[int, ...] = (32, 64, 128, 256)
    cnn_dropout: float = 0.2
    image_dim: int = 512
    embed_dim: int = 128
    lstm_hidden: int = 128
    lstm_layers: int = 3
    lstm_dropout: float = 0.2
    text_dim: int = 256
    head_dim: int = 256
    head_dropout: float = 0.3
    fusion: Literal["concat", "concat_product"] = field(
        default="concat", metadata={"help": "head input: concat (reference) or concat_product"})
    channels_last: bool = False

    def model_config(self, vocab_size: int) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(vocab_size=vocab_size, **{k: v for k, v in dataclasses.asdict(self).items() if k in names
                                                     and k != "vocab_size"})


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warm-up then cosine decay to `min_lr_ratio`; a pure function of the step (nothing to save)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, checkpoint, validate, export `RUN/model/`; returns the final summary."""
    from accelerate.utils import set_seed

    if not cfg.shards:
        raise UserError("--shards is required")
    if cfg.negatives_k < 1 or cfg.captions_per_image < 0:
        raise UserError(f"--negatives-k must be >= 1 and --captions-per-image >= 0 "
                        f"(got {cfg.negatives_k} and {cfg.captions_per_image})")
    manifest = read_manifest(cfg.shards)
    train_shards = split_shards(cfg.shards, "train")
    n_train = int(manifest.get("splits", {}).get("train", {}).get("images", 0))
    if not train_shards or n_train == 0:
        raise UserError(f"{cfg.shards}: the train split is empty")
    params = manifest.get("params", manifest.get("config", {}))
    pre = Preprocess(image_size=int(params.get("image_size", 299)), resize=str(params.get("resize", "stretch")),
                     max_len=int(params.get("max_len", 100)))
    vocab = Vocab.load(Path(cfg.shards) / "vocab.json")
    aug_ops = parse_ops(cfg.augment)

    accelerator, trackers = make_accelerator(cfg)
    out = Path(cfg.out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        config.save(cfg, out / "config.yaml")
        log.info("%s", config.describe(cfg))
        log.info("distributed: %s, %d process(es), device %s, mixed precision %s",
                 accelerator.distributed_type, accelerator.num_processes, accelerator.device, accelerator.mixed_precision)
    set_seed(cfg.seed)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))))
    model = ItsimModel(cfg.model_config(len(vocab)))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and accelerator.num_processes > 1:
        if accelerator.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.warning("--sync-bn needs GPUs; ignored on %s", accelerator.device)
    if cfg.compile:
        model.image_encoder.compile()
        model.fusion.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device

    workers = max(0, cfg.workers)
    bpe = batches_per_epoch(n_train, cfg.batch_size, accelerator.num_processes, workers)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * bpe / cfg.grad_accum))

    step = 0
    ckpt_dir = out / "checkpoints"
    found = checkpoint.find_resume(ckpt_dir, cfg.resume) if cfg.resume else None
    if found:
        path, state = found
        accelerator.load_state(str(path))
        step = int(state["step"])
        if state.get("workers") != workers or state.get("world_size") != accelerator.num_processes:
            log.warning("resuming with a different worker/process count: the data order will differ")
        log.info("resumed from %s (step %d)", path, step)
    if step >= total:
        log.info("already at step %d of %d", step, total)

    spec = StreamSpec(shards=train_shards, batch_size=cfg.batch_size, batches_per_epoch=bpe, seed=cfg.seed,
                      rank=accelerator.process_index, world_size=accelerator.num_processes,
                      shuffle_buffer=cfg.shuffle_buffer, start_batch=step * cfg.grad_accum)
    if len(train_shards) < accelerator.num_processes * max(1, workers):
        log.warning("%d train shards for %d ranks x %d workers: sampling shards with replacement",
                    len(train_shards), accelerator.num_processes, max(1, workers))
    loader = make_loader(spec, workers=workers, pin_memory=device.type == "cuda")

    val = None
    if accelerator.is_main_process and manifest.get("splits", {}).get(cfg.val_split, {}).get("shards"):
        val = ValidationSet.from_shards(cfg.shards, cfg.val_split, cfg.val_max_images)
    if trackers:
        accelerator.init_trackers("itsim", config=config.to_dict(cfg))

    metrics_file = (out / "metrics.jsonl").open("a") if accelerator.is_main_process else None
    audit_file = None
    if cfg.audit:  # one file per rank: no rank writes another's file
        (out / "audit").mkdir(parents=True, exist_ok=True)
        audit_file = (out / "audit" / f"rank{accelerator.process_index}.jsonl").open("a")

    def record(row: dict[str, Any]) -> None:
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            if trackers:
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def save_checkpoint() -> None:
        checkpoint.save(accelerator, ckpt_dir, step, {
            "epoch": step * cfg.grad_accum // bpe, "batches_consumed": step * cfg.grad_accum,
            "workers": workers, "world_size": accelerator.num_processes, "seed": cfg.seed, "total_steps": total,
        }, keep=cfg.keep)

    stop = StopFlag().install()
    progress = None
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
    log.info("model: %s parameters; %d train images, %d batches/epoch/rank, %d steps", f"{count_parameters(model):,}",
             n_train, bpe, total)
    window = {"loss": 0.0, "correct": 0.0, "pairs": 0, "images": 0, "wait": 0.0, "time": 0.0, "batches": 0}
    bad_samples: dict[int, int] = {}
    last_val: dict[str, Any] = {}
    batch_index = step * cfg.grad_accum
    data_iter = iter(loader)
    model.train()
    try:
        while step < total:
            t0 = time.perf_counter()
            batch = next(data_iter)
            t_data = time.perf_counter() - t0
            bad_samples[batch["worker"]] = batch["bad_samples"]
            gen = step_generator(cfg.seed, batch_index, accelerator.process_index)
            with accelerator.accumulate(model):
                images = images_to_float(batch["images"].to(device, non_blocking=True), cfg.channels_last)
                images = augment(images, aug_ops, gen)
                loss, correct, n_pairs = step_loss(model, images, batch, cfg, gen)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, cfg, total)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if audit_file:
                audit_file.write(json.dumps({"batch": batch_index, "keys": batch["keys"]}) + "\n")
            batch_index += 1
            window["loss"] += loss.item()
            window["correct"] += float(correct)
            window["pairs"] += n_pairs
            window["images"] += images.shape[0]
            window["wait"] += t_data
            window["time"] += time.perf_counter() - t0
            window["batches"] += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            if progress:
                progress.update(1)
            if step % cfg.log_every == 0 or step == total:
                n = accelerator.num_processes
                row = {"step": step, "epoch": round(batch_index / bpe, 3), "loss": window["loss"] / window["batches"],
                       "lr": lr_at(step - 1, cfg, total), "train_acc": window["correct"] / max(1, window["pairs"]),
                       "images_per_s": n * window["images"] / window["time"], "pairs_per_s": n * window["pairs"] / window["time"],
                       "data_wait": window["wait"] / window["time"], "bad_samples": sum(bad_samples.values())}
                record(row)
                if progress:
                    progress.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['train_acc']:.3f}",
                                         img_s=f"{row['images_per_s']:.0f}")
                window = dict.fromkeys(window, 0.0)
            if val is not None and (step == total or (cfg.eval_every and step % cfg.eval_every == 0)):
                last_val = val.evaluate(accelerator.unwrap_model(model), device)
                record({"step": step, **last_val})
                log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in last_val.items()))
                model.train()
            should_stop = any_rank(accelerator, stop.raised)
            if step % cfg.checkpoint_every == 0 or step == total or should_stop:
                save_checkpoint()
            if should_stop:
                log.warning("stopped by signal at step %d; resume with --resume auto", step)
                break
    except checkpoint.CheckpointError as exc:
        raise UserError(str(exc)) from None
    except RuntimeError as exc:
        if accelerator.num_processes > 1 and looks_like_peer_failure(exc):
            raise UserError(f"rank {accelerator.process_index}: a collective failed, another rank probably died "
                            f"({str(exc).splitlines()[0][:200]})") from None
        raise
    finally:
        stop.restore()
        if progress:
            progress.close()
        if metrics_file:
            metrics_file.close()
        if audit_file:
            audit_file.write(json.dumps({"final_step": step, "param_checksum": param_checksum(model)}) + "\n")
            audit_file.close()

    summary = {"step": step, "total_steps": total, "stopped_early": step < total, **last_val}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and step >= total:
        model_dir = save_model(out / "model", accelerator.unwrap_model(model), vocab, pre,
                               extra={"train": {"steps": step, "shards": str(cfg.shards), **last_val}})
        summary["model_dir"] = str(model_dir)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        log.info("model written to %s", model_dir)
    if trackers:
        accelerator.end_training()
    return summary


def _cli(args: argparse.Namespace) -> int:
    cfg = config.from_args(TrainConfig, args)
    summary = train(cfg)
    return 0 if summary else 1


def add_cli(subparsers) -> None:
    config.add_command(subparsers, "train", TrainConfig, _cli,
                       help="train a model on shards (also: accelerate launch -m itsim.train)")


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m itsim.train` / `accelerate launch -m itsim.train`."""
    from itsim.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
