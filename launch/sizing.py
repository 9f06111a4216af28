"""Measure the numbers behind the sizing note in launch/README.md, on whatever machine runs it.

    python launch/sizing.py [--images DIR] [--size 299] [--batch 16] [--steps 3] [--json OUT]

1. FLOPs per image of the default model (ModelConfig()) at `--size` px, forward + backward, counted
   by `torch.utils.flop_counter.FlopCounterMode` for the reference balanced pairs (one caption per
   image) and for in-batch hard negatives (every image x caption through the head).
2. JPEG decode rate of one core: `itsim.images.decode_rgb` on the images exactly as build-shards
   stores them (`--size` px, quality 95), from `--images` (e.g. Flickr8k) or synthetic pictures.
3. Training throughput of this machine: forward + backward + AdamW of the default model, fp32, on
   random uint8 images (no data loading), torch threads as configured.
4. The scorer's per-row image work on one core: decode a source file, resize, to uint8.
5. Bytes per sample in a shard (JPEG + token ids + lengths + json), for shard sizing.

Only measurements are printed; the arithmetic that turns them into cluster sizes is in the README.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from itsim.images import decode_rgb, encode_jpeg, load_image, to_array
from itsim.model import ItsimModel, ModelConfig

log = logging.getLogger("itsim.sizing")

MAX_LEN = 100


def _batch(b: int, size: int, caption_len: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g)
    ids = torch.zeros(b, MAX_LEN, dtype=torch.int32)
    ids[:, :caption_len] = torch.randint(2, vocab, (b, caption_len), generator=g, dtype=torch.int32)
    lengths = torch.full((b,), caption_len, dtype=torch.int32)
    return images, ids, lengths


def count_flops(size: int, batch: int, caption_len: int) -> dict[str, float]:
    """GFLOP per image counted by FlopCounterMode: training (forward + backward) for both pair modes,
    and inference (forward only, what the scorer pays per image).

    FlopCounterMode has no formula for the fused LSTM kernels (`aten.mkldnn_rnn_layer` on CPU,
    `_cudnn_rnn` on CUDA): a plain count sees the CNN and the head only. The text encoder is therefore
    counted on its own with oneDNN off, where the LSTM runs as matmuls the counter sees, and added.
    """
    model = ItsimModel(ModelConfig()).train()
    images, ids, lengths = _batch(batch, size, caption_len, model.cfg.vocab_size)
    out: dict[str, float] = {}
    for mode in ("balanced", "in_batch_hard"):
        counter = FlopCounterMode(display=False)
        with counter:
            if mode == "balanced":
                logits = model(images, ids, lengths)
            else:  # each image against every caption of the batch (VSE++ hard-negative mining)
                index = torch.arange(batch)
                logits = model(images, ids, lengths, index.repeat_interleave(batch), index.repeat(batch))
            F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
        model.zero_grad(set_to_none=True)
        out[f"train_{mode}_counted_gflop_per_image"] = counter.get_total_flops() / batch / 1e9
    counter = FlopCounterMode(display=False)
    with warnings.catch_warnings():  # toggling oneDNN warns about Intel-GPU TF32 on CPU-only builds
        warnings.simplefilter("ignore", UserWarning)
        with torch.backends.mkldnn.flags(enabled=False), counter:
            model.encode_text(ids, lengths).sum().backward()
    model.zero_grad(set_to_none=True)
    out["train_text_gflop_per_caption"] = counter.get_total_flops() / batch / 1e9
    for mode in ("balanced", "in_batch_hard"):  # one caption per image in both modes
        out[f"train_{mode}_gflop_per_image"] = (out[f"train_{mode}_counted_gflop_per_image"]
                                                + out["train_text_gflop_per_caption"])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval().encode_image(images)
    out["forward_image_gflop_per_image"] = counter.get_total_flops() / batch / 1e9
    return out


def lstm_gflop_analytic(cfg: ModelConfig, caption_len: int) -> float:
    """Forward GFLOP of the BiLSTM for one caption: per token, layer and direction 4 gates x h x (in + h)
    multiply-adds (backward is about twice that)."""
    macs = 0
    in_dim = cfg.embed_dim
    for _ in range(cfg.lstm_layers):
        macs += 2 * 4 * cfg.lstm_hidden * (in_dim + cfg.lstm_hidden)  # two directions
        in_dim = 2 * cfg.lstm_hidden
    return 2 * macs * caption_len / 1e9


def source_images(folder: str | None, n: int, size: int) -> list[bytes]:
    """`n` source JPEG files as bytes: from `folder`, else synthetic pictures of about `size` px."""
    if folder:
        paths = sorted(Path(folder).glob("*.jpg"))[:n]
        if not paths:
            raise SystemExit(f"{folder}: no *.jpg files")
        return [p.read_bytes() for p in paths]
    import tempfile

    from itsim.data.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, n, seed=0, min_size=size, max_size=size + 100)
        return [p.read_bytes() for p in sorted(Path(tmp, "images").glob("*.jpg"))]


def decode_rate(jpegs: list[bytes], seconds: float = 5.0) -> float:
    """Images decoded per second by one thread (Pillow releases the GIL; one DataLoader worker = one core)."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for data in jpegs:
            decode_rgb(data)
        done += len(jpegs)
    return done / (time.perf_counter() - start)


def prepare_rate(sources: list[bytes], size: int, seconds: float = 5.0) -> float:
    """Images/s of one thread doing the scorer's per-row image work: decode the source file (JPEG draft
    mode), resize to `size`, to uint8 (`itsim.images.load_image` + `to_array`)."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for data in sources:
            to_array(load_image(data, size))
        done += len(sources)
    return done / (time.perf_counter() - start)


def shard_bytes_per_sample(jpegs: list[bytes], captions: int = 5) -> float:
    """Mean tar bytes per sample: each member is padded to 512 B and has a 512 B header."""
    def member(n: int) -> int:
        return 512 + -(-n // 512) * 512

    ids = np.zeros((captions, MAX_LEN), dtype=np.int32)
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    other = member(len(buf.getvalue())) + member(128 + 8 * captions) + member(600)  # ids, lengths, json
    return float(np.mean([member(len(j)) for j in jpegs])) + other


def train_rate(size: int, batch: int, steps: int, caption_len: int) -> float:
    """Images/s of forward + backward + AdamW on this machine's CPU (fp32), no data loading."""
    model = ItsimModel(ModelConfig()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, ids, lengths = _batch(batch, size, caption_len, model.cfg.vocab_size)
    labels = (torch.arange(batch) % 2).float()

    def step() -> None:
        loss = F.binary_cross_entropy_with_logits(model(images, ids, lengths), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocator, oneDNN primitives)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", help="folder of *.jpg to measure decoding on (default: synthetic pictures)")
    p.add_argument("--size", type=int, default=299)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed training steps (0 = skip)")
    p.add_argument("--caption-len", type=int, default=11, help="tokens per caption (Flickr8k mean: 10.8 after normalisation)")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = ModelConfig()
    result: dict[str, float | int | str] = {"image_size": args.size, "caption_len": args.caption_len,
                                            "torch_threads": torch.get_num_threads()}
    log.info("counting FLOPs at %d px", args.size)
    result.update(count_flops(args.size, args.batch, args.caption_len))
    result["lstm_forward_gflop_per_caption_analytic"] = lstm_gflop_analytic(cfg, args.caption_len)
    log.info("measuring JPEG decode on one core")
    sources = source_images(args.images, 200, args.size)
    jpegs = [encode_jpeg(load_image(data, args.size), 95) for data in sources]  # as build-shards stores them
    result["jpeg_kb_mean"] = float(np.mean([len(j) for j in jpegs]) / 1024)
    result["shard_kb_per_sample"] = shard_bytes_per_sample(jpegs) / 1024
    result["decode_images_per_s_per_core"] = decode_rate(jpegs)
    result["source_kb_mean"] = float(np.mean([len(d) for d in sources]) / 1024)
    result["score_prepare_images_per_s_per_core"] = prepare_rate(sources, args.size)
    if args.steps:
        log.info("timing %d training steps of batch %d", args.steps, args.batch)
        rate = train_rate(args.size, args.batch, args.steps, args.caption_len)
        result["cpu_train_images_per_s"] = rate
        result["cpu_train_gflop_per_s"] = rate * float(result["train_balanced_gflop_per_image"])
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
