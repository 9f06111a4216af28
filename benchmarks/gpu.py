"""GPU training benchmark: the reference model at 299x299 in bf16, for a fixed number of steps per variant.

Per variant it reports images/s, pairs/s, the data-wait fraction, peak device memory and MFU:
model FLOPs per image (counted with `torch.utils.flop_counter` over one real training step on a CPU
copy of the model, where the LSTM runs as matmuls the counter sees; cuDNN's fused RNN it would not)
times images/s, over a measured bf16 matmul peak of the same device.

Variants (`--variants`, joined with `+`): `resident` (every image as uint8 on the device, random
batches gathered there; `--resident-images` tiles the decoded images up to a dataset's size,
Flickr30k at 299 px is 31,783 images, about 8.5 GB) or `loader` (the project's shard loader with
`--loader-workers` processes, pinned memory), `cl` (channels_last) and `compile` (`torch.compile` of
the image encoder and head, as `itsim train --compile`). The step is the trainer's: `images_to_float`,
`itsim.train.objective.step_loss` (the trainer's own step), AdamW, clipping; like the trainer it reads
nothing back from the GPU inside a step. `gpu_check.py` is the acceptance run (the trainer itself,
streaming and `--data-on-device`, resume, scoring); this script compares raw step variants.

`--device cpu --tiny` runs the whole script at a tiny size on a CPU (a test; numbers mean nothing).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import time
from pathlib import Path
from typing import Any, Iterator

import common

DEFAULT_VARIANTS = "resident,resident+cl,resident+compile,resident+cl+compile,loader+cl"
FLICKR30K_IMAGES = 31_783


def build_parser():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:1, cpu")
    p.add_argument("--variants", default=None, help=f"comma list (default: {DEFAULT_VARIANTS}; tiny: no compile)")
    p.add_argument("--image-size", type=int, default=None, help="default 299 (tiny: 32)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 256; tiny: 8)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 50; tiny: 4)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (default 10; tiny: 2)")
    p.add_argument("--windows", type=int, default=5, help="the timed steps are split into this many repeats")
    p.add_argument("--images", type=int, default=None, help="synthetic images to shard (default 2048; tiny: 24)")
    p.add_argument("--resident-images", type=int, default=None,
                   help=f"images held on the device (default {FLICKR30K_IMAGES}, Flickr30k; tiny: the decoded ones)")
    p.add_argument("--loader-workers", type=int, default=None, help="DataLoader workers (default: cores - 1, at most 12)")
    p.add_argument("--pairs", choices=("in-batch", "balanced"), default="in-batch")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="autocast dtype")
    return p


@dataclasses.dataclass
class Setup:
    device: Any
    dtype: Any
    size: int
    batch: int
    tiny: bool


def matmul_peak(setup: Setup) -> float:
    """Best FLOP/s of a large square matmul in the run's dtype on the run's device."""
    import torch

    n = 512 if setup.tiny else 8192
    a = torch.randn(n, n, device=setup.device, dtype=setup.dtype)
    b = torch.randn(n, n, device=setup.device, dtype=setup.dtype)
    best = math.inf
    for _ in range(3 if setup.tiny else 10):
        sync(setup.device)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(setup.device)
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * n**3 / best


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_model(vocab_size: int, setup: Setup, channels_last: bool, compile_: bool) -> Any:
    import torch

    from itsim.model import ItsimModel, ModelConfig

    torch.manual_seed(0)
    model = ItsimModel(ModelConfig(vocab_size=vocab_size, channels_last=channels_last,
                                   **(common.TINY_MODEL if setup.tiny else {}))).to(setup.device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_:  # what `itsim train --compile` does
        model.image_encoder.compile()
        model.fusion.compile()
    return model


def train_step(model: Any, optimizer: Any, batch: dict, cfg: Any, step: int, setup: Setup,
               channels_last: bool) -> tuple[int, int]:
    """One optimiser step as `itsim.train` takes it; returns (images, pairs)."""
    import torch

    from itsim.data.pairs import step_generator
    from itsim.model import images_to_float
    from itsim.train.objective import step_loss

    gen = step_generator(0, step, 0)
    autocast = torch.autocast(setup.device.type, dtype=setup.dtype) if setup.dtype != torch.float32 \
        else contextlib.nullcontext()
    with autocast:
        images = images_to_float(batch["images"].to(setup.device, non_blocking=True), channels_last)
        loss, _, n_pairs = step_loss(model, images, batch, cfg, gen)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return images.shape[0], int(n_pairs)


def flops_per_image(vocab_size: int, batch: dict, cfg: Any, setup: Setup) -> float:
    """FLOPs of one training step (forward + backward) per image, counted on a CPU copy in fp32."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cpu = Setup(torch.device("cpu"), torch.float32, setup.size, setup.batch, setup.tiny)
    model = new_model(vocab_size, cpu, channels_last=False, compile_=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    n = min(8, batch["images"].shape[0])
    small = {k: v[:n] if hasattr(v, "shape") else v[:n] for k, v in batch.items()}
    counter = FlopCounterMode(display=False)
    with counter:
        images, _ = train_step(model, optimizer, small, cfg, 0, cpu, channels_last=False)
    return counter.get_total_flops() / images


def resident_batches(shards: Path, n_resident: int | None, setup: Setup, seed: int = 0) -> Iterator[dict]:
    """Random batches gathered on the device from every train image held there as uint8."""
    import torch

    from itsim.data.loader import collate, read_split

    data = collate(read_split(shards, "train"))
    n_real = data["images"].shape[0]
    n = n_resident or n_real
    reps = -(-n // n_real)
    images = data["images"].to(setup.device)
    images = images.repeat(reps, 1, 1, 1)[:n] if reps > 1 else images[:n]  # tiled to the dataset's size
    common.log.info("resident dataset: %d images, %.2f GB on %s", n, images.numel() / 1e9, setup.device)
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, n, (setup.batch,), generator=gen)
        real = idx % n_real  # captions, lengths and key ids are small: they stay on the host
        yield {"images": images[idx.to(setup.device, non_blocking=True)], "ids": data["ids"][real],
               "lengths": data["lengths"][real], "n_captions": data["n_captions"][real],
               "key_ids": data["key_ids"][real]}


def loader_batches(shards: Path, workers: int, setup: Setup) -> Iterator[dict]:
    from itsim.data.loader import StreamSpec, batches_per_epoch, make_loader, read_manifest, split_shards

    n_train = read_manifest(shards)["splits"]["train"]["images"]
    spec = StreamSpec(shards=split_shards(shards, "train"), batch_size=setup.batch, seed=0,
                      batches_per_epoch=batches_per_epoch(n_train, setup.batch, 1, workers))
    return iter(make_loader(spec, workers=workers, pin_memory=setup.device.type == "cuda"))


def peak_memory_mib(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process-wide on CPU


def run_variant(variant: str, shards: Path, vocab_size: int, args: Any, setup: Setup, cfg: Any,
                flops: float, peak: float, rec: common.Recorder, resident_cache: dict) -> None:
    import torch

    parts = set(variant.split("+"))
    unknown = parts - {"resident", "loader", "cl", "compile"}
    if unknown or len(parts & {"resident", "loader"}) != 1:
        raise SystemExit(f"bad variant {variant!r}: one of resident|loader, plus optional cl, compile")
    channels_last, compile_ = "cl" in parts, "compile" in parts
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    if "resident" in parts:
        if "it" not in resident_cache:
            resident_cache["it"] = resident_batches(shards, args.resident_images, setup)
        batches = resident_cache["it"]
    else:
        batches = loader_batches(shards, args.loader_workers, setup)
    model = new_model(vocab_size, setup, channels_last, compile_)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    step = 0
    for _ in range(args.warmup_steps):  # compilation, cuDNN autotuning, worker start
        train_step(model, optimizer, next(batches), cfg, step, setup, channels_last)
        step += 1
    sync(setup.device)
    per_window = max(1, args.steps // args.windows)
    img_rates, pair_rates, waits = [], [], []
    for _ in range(args.windows):
        start = time.perf_counter()
        wait = 0.0
        images = pairs = 0
        for _ in range(per_window):
            t0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t0
            n_img, n_pairs = train_step(model, optimizer, batch, cfg, step, setup, channels_last)
            images, pairs, step = images + n_img, pairs + n_pairs, step + 1
        sync(setup.device)
        seconds = time.perf_counter() - start
        img_rates.append(images / seconds)
        pair_rates.append(pairs / seconds)
        waits.append(wait / seconds)
    params = {"variant": variant, "device": str(setup.device), "dtype": args.dtype, "image_size": setup.size,
              "batch": setup.batch, "steps_per_repeat": per_window, "pairs": cfg.pairs,
              "model": "tiny" if setup.tiny else "reference sizes"}
    r_img = rec.measure(variant, "images/s", "images/s", img_rates, **params)
    rec.measure(variant, "pairs/s", "pairs/s", pair_rates, **params)
    rec.measure(variant, "data wait", "fraction", waits, **params)
    rec.measure(variant, "MFU", "fraction", [flops * v / peak for v in img_rates], flops_per_image=flops,
                matmul_peak_flops=peak, **params)
    rec.info(variant, "peak memory", "MiB", peak_memory_mib(setup.device), **params,
             includes=("the resident dataset" if "resident" in parts else "no dataset") if setup.device.type == "cuda"
             else "process-wide peak RSS")
    common.log.info("%s: %.1f images/s", variant, r_img["value"])
    if "loader" in parts:
        del batches  # ends the DataLoader workers


def main(argv: list[str] | None = None) -> int:
    import torch

    from itsim.text import Vocab
    from itsim.train import TrainConfig

    args = build_parser().parse_args(argv)
    common.setup_logging()
    mode = common.mode_of(args)
    tiny = args.tiny
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cpu" and not tiny:
        common.log.warning("running the full-size GPU benchmark on a CPU: this will be very slow")
    args.image_size = args.image_size or (32 if tiny else 299)
    args.batch_size = args.batch_size or (8 if tiny else 256)
    args.steps = args.steps or (4 if tiny else 50)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (2 if tiny else 10)
    args.windows = min(args.windows, args.steps) if not tiny else min(args.windows, 2)
    args.images = args.images or (24 if tiny else 2048)
    args.resident_images = args.resident_images if args.resident_images is not None else (
        None if tiny else FLICKR30K_IMAGES)
    args.loader_workers = args.loader_workers if args.loader_workers is not None else (
        1 if tiny else max(1, min(12, common.usable_cores() - 1)))
    variants = (args.variants or ("resident,resident+cl,loader" if tiny else DEFAULT_VARIANTS)).split(",")
    setup = Setup(device, torch.bfloat16 if args.dtype == "bf16" else torch.float32, args.image_size,
                  args.batch_size, tiny)

    rec = common.Recorder("gpu", mode, args.out, **({"run_id": args.run_id} if args.run_id else {}))
    machine = rec.machine()
    if device.type == "cuda":
        rec.info("device", "name", "", 1.0, name=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    common.log.info("device %s, %s", device, machine["cpu"])
    data = common.synth_data(args.cache, args.images, *((96, 160) if tiny else (320, 640)))
    shards = common.shards_for(args.cache, data, args.image_size, shard_size=max(4, args.images // 32),
                               workers=max(1, common.usable_cores()))
    vocab_size = len(Vocab.load(shards / "vocab.json"))
    cfg = TrainConfig(pairs=args.pairs, negatives="random", negatives_k=7)

    peak = matmul_peak(setup)
    rec.info("device", f"{args.dtype} matmul peak", "FLOP/s", peak, device=str(device))
    sample = next(resident_batches(shards, None, Setup(torch.device("cpu"), setup.dtype, setup.size, 8, tiny)))
    flops = flops_per_image(vocab_size, sample, cfg, setup)
    rec.info("model", "training FLOPs per image", "FLOP", flops, image_size=args.image_size, pairs=args.pairs,
             counted_on="cpu, fp32, torch.utils.flop_counter")
    resident_cache: dict = {}
    for i, variant in enumerate(v.strip() for v in variants):
        if not any("resident" in v for v in variants[i:]) and resident_cache:
            resident_cache.clear()  # free the device copy: later variants' peak memory must not include it
            if device.type == "cuda":
                torch.cuda.empty_cache()
        common.log.info("variant %s", variant)
        run_variant(variant, shards, vocab_size, args, setup, cfg, flops, peak, rec, resident_cache)
    return common.finish(rec)


if __name__ == "__main__":
    raise SystemExit(main())
