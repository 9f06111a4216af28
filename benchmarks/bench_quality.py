"""Time to quality: wall time until a validation accuracy is first reached, itsim's default recipe against
the reference recipe, side by side in one run on the same data, the same trainer and the same machine.

- itsim's recipe: on the synthetic data, the demo's (`itsim demo`: in-batch pairs with every caption of
  each image and k = 7 negatives per image, the concat_product head, AdamW with warm-up and cosine
  decay; the demo's model sizes); on Flickr8k, launch/flickr8k_cpu.yaml (the recorded CPU recipe).
- the reference recipe: balanced pairs with one caption per image per step (one CNN pass per pair, half
  of them negatives), the reference's concat head, Adam at a constant 1e-3 (weight decay 0, no warm-up,
  no clipping, no augmentation), with the same model sizes, batch size, images and validation pairs.

Both run as `itsim train` subprocesses; this script follows `RUN/metrics.jsonl` as it is written and
stamps each validation with the wall time since the process started, less the time spent validating
(the gap between a step's log line and its validation line), so the time counts start-up, data
loading and training, and not the measuring. Accuracy is the trainer's `val_accuracy`: accuracy at 0.5
on the val split's fixed, seeded balanced pairs (half positive), the same pairs for both recipes.

The level compared is the highest validation accuracy both recipes reach: the lower of the two best
values. The reference runs until it reaches itsim's best accuracy or until `--ref-budget` times
itsim's whole wall time has passed (then it gets SIGTERM: it finishes its step and exits). The target
is the ratio of the times to that level, reference / itsim: >= 5.

Data: the synthetic demo data at the demo's size (2,000 images, 64 px, 80/10/10 split) and, when
`../shared/data/flickr8k` (or $ITSIM_FLICKR8K) exists, Flickr8k at 96 px with itm_dev.tsv's images as
the val split (the recipe of docs/results.md) for a short budget. Full mode only for Flickr8k.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

FLICKR8K = Path(os.environ.get("ITSIM_FLICKR8K", common.ROOT.parent / "shared" / "data" / "flickr8k"))
TARGET = 5.0

# The demo's training recipe (itsim/demo.py builds this TrainConfig; tests/test_demo.py checks these
# fields against the run/config.yaml a real demo run writes).
DEMO_RECIPE: dict[str, Any] = {
    "batch_size": 32, "lr": 2e-3, "pairs": "in-batch", "negatives_k": 7, "captions_per_image": 0,
    "fusion": "concat_product", "channels": (32, 64, 96, 128), "embed_dim": 64, "lstm_hidden": 64, "text_dim": 128,
    "image_dim": 256, "head_dim": 128, "lstm_layers": 2, "cnn_dropout": 0.1, "lstm_dropout": 0.1,
    "head_dropout": 0.1, "workers": 1, "seed": 0,
}
# The reference's training choices, applied on top of the same model sizes and batch size.
REFERENCE_RECIPE: dict[str, Any] = {
    "pairs": "balanced", "captions_per_image": 1, "fusion": "concat", "lr": 1e-3, "weight_decay": 0.0,
    "warmup_steps": 0, "min_lr_ratio": 1.0, "grad_clip": 0.0, "label_smoothing": 0.0, "augment": "",
}
# mode -> synthetic images, image size, itsim steps, validate every, most reference steps, tiny model
SIZES: dict[str, tuple[int, int, int, int, int, bool]] = {
    "tiny": (40, 32, 6, 2, 12, True),  # the smoke test: the reference stops at 12 steps whatever it reaches
    "quick": (600, 64, 200, 25, 20_000, False),  # quick and full: --ref-budget stops it
    "full": (2000, 64, 1500, 100, 150_000, False),
}
FLICKR8K_STEPS, FLICKR8K_EVERY = 200, 25  # full mode: a short budget (the recorded recipe runs 800)


def flags(values: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{flag[2:]}")
        else:
            out += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return out


def follow(cmd: list[str], run: Path, log: Path, budget_s: float | None = None,
           stop_at: float | None = None) -> list[dict[str, float]]:
    """Run `itsim train`, following its metrics.jsonl; returns each validation as {step, accuracy, seconds}.

    `seconds`: wall time since the process started, less the time spent in validations so far. The run
    gets SIGTERM once a validation reaches `stop_at`, or once `budget_s` seconds have passed.
    """
    shutil.rmtree(run, ignore_errors=True)
    metrics = run / "metrics.jsonl"
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    read, logged, validating, points, stopped = 0, {}, 0.0, [], False
    while True:
        finished = proc.poll() is not None
        now = time.monotonic() - start
        if metrics.is_file():
            text = metrics.read_text()
            complete = text[:text.rfind("\n") + 1]
            for line in complete[read:].splitlines():
                row = json.loads(line)
                if "val_accuracy" in row:
                    validating += now - logged.get(row["step"], now)
                    points.append({"step": row["step"], "accuracy": row["val_accuracy"], "seconds": now - validating})
                    if stop_at is not None and row["val_accuracy"] >= stop_at and not stopped:
                        proc.send_signal(signal.SIGTERM)
                        stopped = True
                elif "loss" in row:
                    logged[row["step"]] = now
            read = len(complete)
        if finished:
            break
        if budget_s is not None and now > budget_s and not stopped:
            common.log.info("budget of %.0f s reached: stopping the run", budget_s)
            proc.send_signal(signal.SIGTERM)
            stopped = True
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"itsim train failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    if not points:
        raise RuntimeError(f"no validation in {metrics}")
    return points


def first_reach(points: list[dict[str, float]], level: float) -> dict[str, float]:
    return next(p for p in points if p["accuracy"] >= level)


def compare(rec: common.Recorder, name: str, shards: Path, work: Path, itsim_args: list[str], ref_args: list[str],
            steps: int, every: int, ref_steps: int, budget: float, params: dict[str, Any]) -> None:
    """Both recipes on `shards`; records the times to the common level and their ratio."""
    base = [sys.executable, "-m", "itsim.cli", "train", "--shards", str(shards), "--eval-every", str(every),
            "--log-every", str(every), "--checkpoint-every", "1000000", "--keep", "1", "--no-tensorboard",
            "--mixed-precision", "no"]
    slug = name.split(" ")[0].lower()
    common.log.info("%s: itsim recipe, %d steps", name, steps)
    started = time.monotonic()
    ours = follow([*base, "--out", str(work / f"{slug}-itsim"), *itsim_args, "--steps", str(steps)],
                  work / f"{slug}-itsim", work / f"{slug}-itsim.log")
    wall = time.monotonic() - started
    best = max(p["accuracy"] for p in ours)
    common.log.info("%s: itsim best val accuracy %.3f in %.0f s; reference recipe for up to %.0f s", name, best,
                    wall, budget * wall)
    theirs = follow([*base, "--out", str(work / f"{slug}-ref"), *ref_args, "--steps", str(ref_steps)],
                    work / f"{slug}-ref", work / f"{slug}-ref.log", budget_s=budget * wall, stop_at=best)
    ref_best = max(p["accuracy"] for p in theirs)
    level = min(best, ref_best)
    mine, ref = first_reach(ours, level), first_reach(theirs, level)
    metric = f"seconds to val accuracy {level:.3f}"
    p = {**params, "level": level, "validate_every": every, "ref_budget_x": budget}
    m_ours = rec.measure(f"{name}: itsim recipe", metric, "s", [mine["seconds"]], step=mine["step"],
                         curve=[(q["step"], round(q["seconds"], 1), q["accuracy"]) for q in ours], **p)
    m_ref = rec.measure(f"{name}: reference recipe", metric, "s", [ref["seconds"]], step=ref["step"],
                        curve=[(q["step"], round(q["seconds"], 1), q["accuracy"]) for q in theirs], **p)
    rec.info(f"{name}: itsim recipe", "best val accuracy", "fraction", best, steps=steps, **params)
    rec.info(f"{name}: reference recipe", "best val accuracy", "fraction", ref_best,
             steps=theirs[-1]["step"], **params)
    rec.ratio(f"{name}: time to the same val accuracy, reference recipe / itsim recipe", m_ref, m_ours,
              target=TARGET, note="seconds to the highest val accuracy both recipes reach (the lower best)")


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--ref-budget", type=float, default=2.0,
                   help="the reference recipe runs at most this many times itsim's wall time (default: %(default)s)")
    args = p.parse_args(argv)
    common.setup_logging()
    mode = common.mode_of(args)
    n_images, size, steps, every, ref_steps, tiny = SIZES[mode]
    rec = common.Recorder("quality", mode, args.out, **({"run_id": args.run_id} if args.run_id else {}))
    rec.machine()
    work = Path(tempfile.mkdtemp(prefix="bench-quality-", dir=args.cache))
    try:
        # The demo's data: 2,000 synthetic images at the synth defaults (320-640 px), 64 px shards of
        # 250, split 80/10/10.
        data = common.synth_data(args.cache, n_images, *((96, 160) if tiny else (320, 640)))
        shards = common.shards_for(args.cache, data, size, shard_size=250, tag="-demo", splits=(0.8, 0.1, 0.1))
        recipe = {**DEMO_RECIPE, "warmup_steps": min(50, steps // 10)}
        if tiny:
            recipe.update({**common.TINY_MODEL, "batch_size": 8})
        reference = {**recipe, **REFERENCE_RECIPE}
        compare(rec, f"synthetic ({n_images} images, {size} px)", shards, work, flags(recipe), flags(reference),
                steps, every, ref_steps, args.ref_budget,
                {"images": n_images, "image_size": size, "batch": recipe["batch_size"],
                 "model": "tiny" if tiny else "the demo's"})

        case = "Flickr8k (96 px)"
        if mode != "full":
            rec.not_measured(case, "seconds to the same val accuracy", f"full mode only (this is --{mode})")
        elif not (FLICKR8K / "captions.txt").is_file():
            rec.not_measured(case, "seconds to the same val accuracy", f"no Flickr8k at {FLICKR8K}")
        else:
            f8k = common.shards_for(args.cache, FLICKR8K, 96, shard_size=500, captions=FLICKR8K / "captions.txt",
                                    tag="-itmdev", splits=(1.0, 0.0, 0.0), min_count=3,
                                    val_images=str(FLICKR8K / "itm_dev.tsv"))
            recipe_file = common.ROOT / "launch" / "flickr8k_cpu.yaml"
            batch = 64  # the file's batch size; the reference keeps it
            compare(rec, case, f8k, work, ["--config", str(recipe_file)],
                    ["--config", str(recipe_file), *flags(REFERENCE_RECIPE)], FLICKR8K_STEPS, FLICKR8K_EVERY,
                    100 * FLICKR8K_STEPS, args.ref_budget,
                    {"image_size": 96, "batch": batch, "model": "reference sizes",
                     "recipe": "launch/flickr8k_cpu.yaml"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return common.finish(rec)


if __name__ == "__main__":
    raise SystemExit(main())
