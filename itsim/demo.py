"""`itsim demo`: the main job end to end on the embedded synthetic data.

synth -> build-shards -> train -> evaluate on val -> score a few hundred pairs with the Ray job.
Sized to finish in a few minutes on a 2-core laptop CPU (small images, a small model); the same
stages run at full size on real data (see docs/results.md and launch/).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itsim import config, storage
from itsim.data import shards, synth
from itsim.eval import EvalConfig, evaluate
from itsim.score.ray_job import ScoreConfig, run_score
from itsim.train import TrainConfig, check_finished, train

log = logging.getLogger("itsim.demo")


@dataclass
class DemoConfig:
    out: str = field(default="runs/demo", metadata={"help": "folder for everything the demo writes"})
    images: int = field(default=2000, metadata={"help": "synthetic images to generate"})
    seed: int = 0
    image_size: int = field(default=64, metadata={"help": "side of the stored images (the reference uses 299)"})
    steps: int = field(default=1500, metadata={"help": "training steps"})
    batch_size: int = 32
    pairs: str = field(default="in-batch", metadata={"help": "balanced | in-batch"})
    negatives_k: int = 7
    captions_per_image: int = field(default=0, metadata={"help": "captions per image per step (0 = all)"})
    fusion: str = field(default="concat_product", metadata={"help": "head input: concat | concat_product"})
    lr: float = 2e-3
    workers: int = field(default=0, metadata={"help": "processes for synth/shards; 0 = all CPUs"})
    loader_workers: int = field(default=1, metadata={"help": "DataLoader workers while training"})
    data_on_device: bool = field(default=False, metadata={
        "help": "train from the split decoded once into memory (itsim train --data-on-device) instead of streaming"})
    min_accuracy: float = field(default=0.90, metadata={"help": "fail when val balanced accuracy is lower"})


def resume_command(cfg: DemoConfig) -> str:
    """The command that carries on this demo: the same flags again. Every stage resumes: synth is skipped
    when its CSV exists, build-shards keeps complete shards, training uses `--resume auto`."""
    flags = [f"--out {shlex.quote(cfg.out)}"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name != "out" and value != f.default:
            flags.append(f"--{f.name.replace('_', '-')} {shlex.quote(str(value))}")
    return "itsim demo " + " ".join(flags)


def _stage(name: str) -> float:
    log.info("=== %s", name)
    return time.perf_counter()


def train_config(cfg: DemoConfig, shard_dir: Path, run_dir: Path) -> TrainConfig:
    """The demo's training stage (also what measurements of the demo's training reuse)."""
    return TrainConfig(
        shards=str(shard_dir), out=str(run_dir), steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
        warmup_steps=min(50, cfg.steps // 10), pairs=cfg.pairs, negatives_k=cfg.negatives_k,
        captions_per_image=cfg.captions_per_image,
        checkpoint_every=max(1, cfg.steps // 2), eval_every=max(1, cfg.steps // 4), workers=cfg.loader_workers,
        resume="auto", seed=cfg.seed, channels=(32, 64, 96, 128), embed_dim=64, lstm_hidden=64, text_dim=128,
        image_dim=256, head_dim=128, lstm_layers=2, cnn_dropout=0.1, lstm_dropout=0.1, head_dropout=0.1,
        fusion=cfg.fusion, tensorboard=False, data_on_device=cfg.data_on_device)


def run(cfg: DemoConfig) -> dict[str, Any]:
    out = Path(storage.require_local(cfg.out, "--out"))  # every stage writes below it: a local folder
    out.mkdir(parents=True, exist_ok=True)
    config.save(cfg, out / "demo_config.yaml")
    workers = cfg.workers or os.cpu_count() or 1
    timings: dict[str, float] = {}
    start = time.perf_counter()

    t = _stage("1/5 synth: generating captioned images")
    data = out / "data"
    captions = data / "results.csv"
    if not captions.exists():
        synth.run(synth.SynthConfig(out=str(data), images=cfg.images, seed=cfg.seed, workers=workers))
    timings["synth_s"] = time.perf_counter() - t

    t = _stage("2/5 build-shards")
    shard_dir = out / "shards"
    manifest = shards.build_shards(shards.ShardConfig(
        captions=str(captions), images=str(data / "images"), out=str(shard_dir), image_size=cfg.image_size,
        shard_size=250, workers=workers, seed=cfg.seed, splits=(0.8, 0.1, 0.1)))
    timings["shards_s"] = time.perf_counter() - t

    t = _stage("3/5 train")
    run_dir = out / "run"
    # Stopped by SIGTERM/SIGINT: the trainer checkpointed and returned; no model to evaluate, so stop here
    # (itsim exits 128 + the signal's number, with one line naming the checkpoint and the resume command).
    check_finished(train(train_config(cfg, shard_dir, run_dir)), resume_command(cfg))
    timings["train_s"] = time.perf_counter() - t

    t = _stage("4/5 evaluate on val")
    eval_dir = run_dir / "eval"
    metrics = evaluate(EvalConfig(model=str(run_dir / "model"), shards=str(shard_dir), split="val",
                                  out=str(eval_dir)))
    timings["eval_s"] = time.perf_counter() - t

    t = _stage("5/5 score the test split's image-caption pairs with the Ray job")
    score_dir = out / "scores"
    score_summary = run_score(ScoreConfig(model=str(run_dir / "model"), input=(str(shard_dir),), format="shards",
                                          split="test", output=str(score_dir), overwrite=True))
    timings["score_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    accuracy = float(metrics.get("balanced_accuracy", 0.0))
    summary = {"val_balanced_accuracy": accuracy, "val_roc_auc": metrics.get("roc_auc"),
               "i2t_r1": metrics.get("i2t_r1"), "t2i_r1": metrics.get("t2i_r1"), **timings,
               "shards_images_per_s": manifest.get("images_per_second"), "outputs": {
                   "data": str(data), "shards": str(shard_dir), "run": str(run_dir), "model": str(run_dir / "model"),
                   "eval": str(eval_dir), "scores": str(score_dir)}, "score": score_summary}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _cli(args: argparse.Namespace) -> int:
    cfg = config.from_args(DemoConfig, args)
    log.info("%s", config.describe(cfg))
    summary = run(cfg)
    acc = summary["val_balanced_accuracy"]
    print(f"\nitsim demo finished in {summary['total_s']:.0f} s")
    print(f"  val balanced-pair accuracy {acc:.3f} (target {cfg.min_accuracy:.2f}), ROC-AUC {summary['val_roc_auc']:.3f}")
    score = summary.get("score") or {}
    print(f"  scored {score.get('scored', 0)} of {score.get('rows', 0)} test-split pairs with the Ray job "
          f"({score.get('rows_per_second', 0):.0f} rows/s; errors: {score.get('errors') or 'none'})")
    for name, path in summary["outputs"].items():
        print(f"  {name:8s} {path}")
    print(f"  summary  {Path(cfg.out) / 'demo_summary.json'}")
    return 0 if acc >= cfg.min_accuracy else 1


def add_cli(subparsers) -> None:
    config.add_command(subparsers, "demo", DemoConfig, _cli,
                       help="the main job on synthetic data: synth -> shards -> train -> eval -> score")
