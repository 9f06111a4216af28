"""Training step throughput: itsim's trainer against a reference-style step in the same PyTorch.

itsim: `itsim train` as users run it (a subprocess: Accelerate, the shard loader with 2 workers, fp32
on CPU, `--threads` set to the reference-style step's compute threads), for a fixed number of steps; `RUN/metrics.jsonl` gives images/s, pairs/s and the data-wait
fraction per logging window. The first window (worker start, first batches) is the warm-up; each
later window is one repeat. Two pair modes, both over every caption of each image (the default
`--captions-per-image 0`): in-batch (each caption with its image, plus k=7 other images' captions per
image) and balanced (the reference's pairing, one pair per caption); captions packed. At 299 px also
in-batch with one caption per image; at the small size also the trainer's default threads.

Reference-style step (in this process, same model sizes, same image size, fp32): balanced pairs,
one CNN pass per pair, the caption LSTM run over all 100 padded positions (no packing), the same
optimiser and gradient clipping. Its batches are decoded before timing, so it never waits for data
(which favours it).

Also compared: the reference's own stack (Keras 3.15 / TensorFlow 2.21, batch 32) as measured on
this machine and given in the issue: 3.3-3.5 pairs/s at 299 px, 13 pairs/s at 128 px.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

BATCH = 32
# mode -> (images, [(image size, steps per window, windows after warm-up)], tiny model)
SIZES: dict[str, tuple[int, list[tuple[int, int, int]], bool]] = {
    "tiny": (24, [(32, 1, 2)], True),
    "quick": (160, [(128, 2, 2)], False),
    "full": (400, [(299, 2, 3), (128, 4, 3)], False),
}
KERAS_PAIRS_PER_S = {299: 3.5, 128: 13.0}  # the measurements (upper end of 3.3-3.5 at 299 px)


def model_flags(tiny: bool) -> list[str]:
    if not tiny:
        return []
    flags = []
    for name, value in common.TINY_MODEL.items():
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        flags += [f"--{name.replace('_', '-')}", text]
    return flags


def itsim_train(shards: Path, out: Path, pairs: str, steps_per_window: int, windows: int, tiny: bool,
                threads: int = 0, k: int = 7, per_image: int = 0) -> list[dict[str, Any]]:
    """Run `itsim train` for (1 + windows) logging windows; returns the windows after the warm-up.

    `threads`: the trainer's `--threads` (0 = its default: every core, OMP_NUM_THREADS removed here).
    """
    steps = steps_per_window * (1 + windows)
    cmd = [sys.executable, "-m", "itsim.cli", "train", "--shards", str(shards), "--out", str(out),
           "--steps", str(steps), "--batch-size", str(BATCH), "--pairs", pairs, "--negatives-k", str(k),
           "--captions-per-image", str(per_image),
           "--log-every", str(steps_per_window), "--warmup-steps", "1", "--eval-every", "0", "--val-split", "none",
           "--checkpoint-every", str(10 * steps), "--keep", "1", "--workers", "2", "--mixed-precision", "no",
           "--no-tensorboard", "--threads", str(threads), *model_flags(tiny)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads == 0:
        env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run(cmd, env=env, cwd=common.ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"itsim train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "images_per_s" in r]
    if len(rows) != 1 + windows:
        raise RuntimeError(f"expected {1 + windows} metric windows, got {len(rows)}")
    return rows[1:]


def padded_text(model: Any, ids: Any) -> Any:
    """The reference's text path: the LSTM runs over every one of the 100 padded positions."""
    import torch

    enc = model.text_encoder
    _, (h_n, _) = enc.lstm(enc.embed(ids.long()))
    return enc.proj(torch.cat([h_n[-2], h_n[-1]], dim=1))


def reference_style(shards: Path, steps_per_window: int, windows: int, tiny: bool) -> list[float]:
    """Pairs/s per window of the reference-style step (warm-up window first, dropped)."""
    import torch
    import torch.nn.functional as F
    from itertools import islice

    from itsim.data.loader import StreamSpec, make_loader, split_shards
    from itsim.data.pairs import balanced_pairs, step_captions, step_generator
    from itsim.model import ItsimModel, ModelConfig, images_to_float
    from itsim.text import Vocab

    vocab = Vocab.load(shards / "vocab.json")
    torch.manual_seed(0)
    model = ItsimModel(ModelConfig(vocab_size=len(vocab), **(common.TINY_MODEL if tiny else {}))).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    spec = StreamSpec(shards=split_shards(shards, "train"), batch_size=BATCH, batches_per_epoch=8, shuffle_buffer=64)
    batches = list(islice(make_loader(spec, workers=0), 8))
    rates = []
    step = 0
    for _ in range(1 + windows):
        start = time.perf_counter()
        pairs = 0
        for _ in range(steps_per_window):
            batch = batches[step % len(batches)]
            gen = step_generator(0, step, 0)
            caps = step_captions(batch, 1, gen)  # one pair per image: a CNN pass per pair
            pairs_ = balanced_pairs(caps, batch["key_ids"], gen)
            ids, labels = caps.ids[pairs_.text_index], pairs_.labels
            logits = model.head(model.encode_image(images_to_float(batch["images"])), padded_text(model, ids))
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            pairs += labels.shape[0]
            step += 1
        rates.append(pairs / (time.perf_counter() - start))
    return rates[1:]


def main(argv: list[str] | None = None) -> int:
    import torch

    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    common.setup_logging()
    mode = common.mode_of(args)
    n_images, configs, tiny = SIZES[mode]
    rec = common.Recorder("train", mode, args.out, **({"run_id": args.run_id} if args.run_id else {}))
    rec.machine()
    data = common.synth_data(args.cache, n_images, *((96, 160) if mode == "tiny" else (320, 640)))
    work = Path(tempfile.mkdtemp(prefix="bench-train-", dir=args.cache))
    threads = torch.get_num_threads()  # the reference-style step's compute threads; itsim gets as many
    try:
        for size, per_window, windows in configs:
            windows = args.repeats or windows
            shards = common.shards_for(args.cache, data, size, shard_size=max(4, n_images // 16))
            params = {"image_size": size, "batch": BATCH, "steps_per_repeat": per_window, "fp32": True,
                      "model": "tiny" if tiny else "reference sizes", "train_images": n_images,
                      "compute_threads": threads, "loader_workers": 2}
            common.log.info("%d px: itsim in-batch", size)
            inb = itsim_train(shards, work / f"inb{size}", "in-batch", per_window, windows, tiny, threads)
            common.log.info("%d px: itsim balanced", size)
            bal = itsim_train(shards, work / f"bal{size}", "balanced", per_window, windows, tiny, threads)
            common.log.info("%d px: reference-style step", size)
            ref = reference_style(shards, per_window, windows, tiny)
            tag = f"{size} px"
            r_inb = rec.measure(f"itsim in-batch k=7, {tag}", "pairs/s", "pairs/s",
                                [w["pairs_per_s"] for w in inb], **params)
            rec.measure(f"itsim in-batch k=7, {tag}", "images/s", "images/s", [w["images_per_s"] for w in inb],
                        **params)
            rec.measure(f"itsim in-batch k=7, {tag}", "data wait", "fraction", [w["data_wait"] for w in inb],
                        **params)
            r_bal = rec.measure(f"itsim balanced, {tag}", "pairs/s", "pairs/s", [w["pairs_per_s"] for w in bal],
                                **params)
            r_bal_img = rec.measure(f"itsim balanced, {tag}", "images/s", "images/s",
                                    [w["images_per_s"] for w in bal], **params)
            rec.measure(f"itsim balanced, {tag}", "data wait", "fraction", [w["data_wait"] for w in bal], **params)
            r_ref = rec.measure(f"reference-style step (PyTorch), {tag}", "pairs/s", "pairs/s", ref, **params)
            rec.ratio(f"in-batch vs reference-style, {tag}", r_inb, r_ref, target=10.0)
            rec.ratio(f"balanced vs reference-style, {tag}", r_bal, r_ref,
                      note="every caption of an image from one CNN pass, packed captions")
            if not tiny and size in KERAS_PAIRS_PER_S:
                keras = KERAS_PAIRS_PER_S[size]
                rec.ratio(f"balanced images/s vs the reference's Keras stack, {tag}", r_bal_img, keras, target=1.0,
                          note=f"Keras/TensorFlow measured on this machine: {keras} pairs/s = images/s (issue)")
                rec.ratio(f"reference-style PyTorch vs the reference's Keras stack, {tag}", r_ref, keras)
            if not tiny and size == configs[-1][0]:  # smallest size: the trainer's own thread default
                common.log.info("%d px: itsim in-batch with the default --threads", size)
                dflt = itsim_train(shards, work / f"dflt{size}", "in-batch", per_window, windows, tiny, 0)
                r_dflt = rec.measure(f"itsim in-batch k=7, default --threads, {tag}", "pairs/s", "pairs/s",
                                     [w["pairs_per_s"] for w in dflt], **{**params, "compute_threads": "default"})
                rec.ratio(f"default --threads vs --threads {threads}, {tag}", r_dflt, r_inb,
                          note="default: the cores / local ranks (OMP_NUM_THREADS unset), 2 threads here")
            if not tiny and size == configs[0][0]:  # largest size, where the CNN dominates
                common.log.info("%d px: itsim in-batch, one caption per image", size)
                one = itsim_train(shards, work / f"one{size}", "in-batch", per_window, windows, tiny, threads,
                                  per_image=1)
                r_one = rec.measure(f"itsim in-batch k=7, 1 caption per image, {tag}", "pairs/s", "pairs/s",
                                    [w["pairs_per_s"] for w in one], **{**params, "captions_per_image": 1})
                rec.ratio(f"in-batch, 1 caption per image vs reference-style, {tag}", r_one, r_ref,
                          note="--captions-per-image 1: 1 + 7 pairs per image instead of 5 + 7")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return common.finish(rec)


if __name__ == "__main__":
    raise SystemExit(main())
