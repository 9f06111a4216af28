"""Loader throughput: decoded images/s (the target) and training-ready pairs/s (information) from
shards, against a reference-style per-pair generator.

itsim: `make_loader` over the train shards (decoded uint8 image batches plus token ids), each batch
turned into pairs as `itsim train` forms them: balanced, one pair per caption (every image-caption
pair, what the reference's epoch covers, from one decode per image; also with one caption per
image), and in-batch: each caption with its image plus k = 7 other images' captions per image. Run in
the main process (workers=0: one core, as the generator) and with 2 DataLoader workers (how
`itsim train` runs).

Baseline: the reference design's generator, per pair: load the original JPEG, resize it to the
model size, tokenise the caption (normalise, look up ids, pad to 100), balanced true/false pairs,
batches of 32. It decodes one image per pair, so its images/s equals its pairs/s. It resizes with
nearest-neighbour (the default of Keras' `load_img`, the fastest PIL filter), which favours it.

The target counts decoded images per second on one core: the same work per image on both sides
(a decoded, model-sized uint8 image with its tokenised captions), so how many pairs each image then
serves does not inflate it. Pairs/s and their ratios are in the table as information.
"""
from __future__ import annotations

import time
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

import common

SIZES = {"tiny": (24, 32, 4, 1), "quick": (160, 299, 12, 2), "full": (400, 299, 24, 3)}  # images, px, batches, repeats
BATCH = 32


def reference_generator(data: Path, size: int, vocab, batch: int = BATCH, seed: int = 0,
                        max_len: int = 100) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The reference's per-pair generator: every pair loads and resizes its original JPEG."""
    import pandas as pd
    from PIL import Image

    df = pd.read_csv(data / "results.csv", sep=r"\|\s*", engine="python")
    images, captions = df.iloc[:, 0].tolist(), df.iloc[:, 2].astype(str).tolist()
    rng = np.random.default_rng(seed)
    while True:
        for start in range(0, len(images) - batch + 1, batch):
            pix, texts, labels = [], [], []
            for i in range(start, start + batch):
                label = int(rng.random() < 0.5)
                j = i if label else int(rng.integers(len(images)))
                label = int(label or images[j] == images[i])
                with Image.open(data / "images" / images[i]) as img:
                    pix.append(np.asarray(img.convert("RGB").resize((size, size), Image.NEAREST)))
                texts.append(captions[j])
                labels.append(label)
            ids, _ = vocab.encode(texts, max_len)
            yield np.stack(pix), ids, np.array(labels, dtype=np.float32)


def itsim_pairs(shards: Path, workers: int, pairs: str = "balanced", k: int = 7, per_image: int = 0,
                seed: int = 0) -> Iterator[tuple[int, int]]:
    """(decoded images, training-ready pairs) per batch, from the project's loader and pair builders, as `itsim train`
    forms them: `step_captions` (every caption of each image, or `per_image` random ones), then
    `balanced_pairs` (one pair per caption) or `in_batch_pairs` (each caption with its image, plus k
    other images' captions per image)."""
    from itsim.data.loader import StreamSpec, batches_per_epoch, make_loader, read_manifest, split_shards
    from itsim.data.pairs import balanced_pairs, in_batch_pairs, step_captions, step_generator

    n_train = read_manifest(shards)["splits"]["train"]["images"]
    spec = StreamSpec(shards=split_shards(shards, "train"), batch_size=BATCH, seed=seed, shuffle_buffer=256,
                      batches_per_epoch=batches_per_epoch(n_train, BATCH, 1, workers))
    for step, batch in enumerate(make_loader(spec, workers=workers)):
        gen = step_generator(seed, step, 0)
        caps = step_captions(batch, per_image, gen)
        images = batch["images"].shape[0]
        if pairs == "balanced":
            yield images, len(balanced_pairs(caps, batch["key_ids"], gen))
        else:
            yield images, len(in_batch_pairs(caps, batch["key_ids"], k, "random", gen))


def rate(stream: Iterator[tuple[int, int]], n_batches: int) -> tuple[float, float]:
    """(images/s, pairs/s) over the next `n_batches` of a running stream."""
    start = time.perf_counter()
    counts = list(islice(stream, n_batches))
    seconds = time.perf_counter() - start
    return sum(c[0] for c in counts) / seconds, sum(c[1] for c in counts) / seconds


def main(argv: list[str] | None = None) -> int:
    from itsim.text import Vocab

    import torch

    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    common.setup_logging()
    # One compute thread: "1 core" must mean it, and the pair builders' tiny tensor ops only lose
    # to OpenMP wake-ups on a second, shared core (8 ms instead of 0.15 ms per batch measured here).
    torch.set_num_threads(1)
    mode = common.mode_of(args)
    n_images, size, n_batches, repeats = SIZES[mode]
    repeats = args.repeats or repeats
    rec = common.Recorder("loader", mode, args.out, **({"run_id": args.run_id} if args.run_id else {}))
    rec.machine()
    data = common.synth_data(args.cache, n_images, *((96, 160) if mode == "tiny" else (320, 640)))
    shards = common.shards_for(args.cache, data, size, shard_size=max(4, n_images // 16))
    vocab = Vocab.load(shards / "vocab.json")
    streams = {
        "reference generator (1 core)": ((len(g[0]), len(g[0])) for g in reference_generator(data, size, vocab)),
        "itsim loader, workers=0 (1 core)": itsim_pairs(shards, 0),
        "itsim loader, workers=2": itsim_pairs(shards, 2),
        "itsim loader, 1 caption per image, workers=0 (1 core)": itsim_pairs(shards, 0, per_image=1),
        "itsim loader in-batch k=7, workers=0 (1 core)": itsim_pairs(shards, 0, "in-batch"),
        "itsim loader in-batch k=7, workers=2": itsim_pairs(shards, 2, "in-batch"),
    }
    # Warm-up: start the workers and drain their prefetch queues (2 workers x 4 batches).
    for stream in streams.values():
        list(islice(stream, 10 if mode != "tiny" else 2))
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in streams}
    for _ in range(repeats):
        for name, stream in streams.items():
            rates[name].append(rate(stream, n_batches))
    for stream in streams.values():
        stream.close()  # type: ignore[attr-defined]  # ends the DataLoader workers
    del streams
    params = {"images": n_images, "image_size": size, "batch": BATCH, "batches_per_repeat": n_batches,
              "source": "synthetic 320-640 px JPEG"}
    img = {name: rec.measure(name, "decoded images/s", "images/s", [v[0] for v in vals], **params)
           for name, vals in rates.items()}
    pr = {name: rec.measure(name, "pairs/s", "pairs/s", [v[1] for v in vals], **params)
          for name, vals in rates.items()}
    ref = "reference generator (1 core)"
    rec.ratio("decoded images/s, itsim loader vs reference generator, 1 core vs 1 core",
              img["itsim loader, workers=0 (1 core)"], img[ref], target=1.0,
              note="one model-sized uint8 image with its tokenised captions per decode on both sides; the "
                   "generator decodes and resizes the source JPEG, itsim the stored shard JPEG")
    rec.ratio("decoded images/s, itsim loader 2 workers vs reference generator 1 core",
              img["itsim loader, workers=2"], img[ref], note="2 cores against 1: how each feeds its trainer")
    rec.ratio("pairs/s, balanced, 1 core vs 1 core", pr["itsim loader, workers=0 (1 core)"], pr[ref],
              note="information: every image-caption pair, balanced; the generator decodes a JPEG per pair, "
                   "itsim one per image (5 pairs)")
    rec.ratio("pairs/s, balanced, 1 caption per image, 1 core vs 1 core",
              pr["itsim loader, 1 caption per image, workers=0 (1 core)"], pr[ref],
              note="information: --captions-per-image 1, one decoded JPEG per pair on both sides")
    rec.ratio("pairs/s, in-batch, 1 core vs 1 core", pr["itsim loader in-batch k=7, workers=0 (1 core)"], pr[ref],
              note="information: captions + k pairs per decoded image (the in-batch trainer)")
    rec.ratio("pairs/s, in-batch, 2 workers vs 1 core", pr["itsim loader in-batch k=7, workers=2"], pr[ref],
              note="information")
    return common.finish(rec)


if __name__ == "__main__":
    raise SystemExit(main())
