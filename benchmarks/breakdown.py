"""Where the time goes, for the targets the benchmarks miss: each stage split into its parts.

- shards: per image, the image work alone (`load_image` + `encode_jpeg`), `write_shard` (adds the
  tar members, token arrays, fsync, checksum) and the whole `build_shards` call.
- loader: per pair, decoding a source JPEG (what the reference generator does) against decoding a
  stored 299 px shard JPEG, and the shard reading around it.
- train: fwd + bwd of each model part for a batch of 32 on one thread (CNN at both sizes and with
  channels_last, packed LSTM, LSTM over 100 padded positions, the head over 256 pairs).
- score: per row, `prepare_rows` (decode, resize, tokenise) against the model, on one thread.

Run it alone (`python benchmarks/breakdown.py [--quick]`); it reuses the benchmarks' cached inputs.
"""
from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import common


def best_ms(fn: Callable[[], Any], n_items: int, repeats: int) -> list[float]:
    """Milliseconds per item of each timed repeat, after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - start) / n_items)
    return out


def shards(rec: common.Recorder, data: Path, repeats: int) -> None:
    from itsim.data.captions import read_captions
    from itsim.data.shards.writer import _tar_header, _tarinfo, write_shard
    from itsim.data.shards.build import ShardConfig, _checked, build_shards, plan_shards
    from itsim.data.splits import assign_splits
    from itsim.images import encode_jpeg, load_image, safe_path
    from itsim.text import Vocab

    out = Path(tempfile.mkdtemp(prefix="breakdown-", dir=data.parent))
    try:
        cfg = _checked(ShardConfig(captions=str(data / "results.csv"), images=str(data / "images"), out=str(out),
                                   image_size=299, shard_size=75))
        df, _ = read_captions(cfg.captions)
        df = assign_splits(df, cfg.splits, cfg.seed)
        tasks = plan_shards(cfg, df, Vocab.build(df.loc[df["split"] == "train", "caption"].tolist()))
        items = [(t.images_root, i.image) for t in tasks for i in t.items]
        n = len(items)

        def images_only() -> None:
            for root, name in items:
                encode_jpeg(load_image(safe_path(root, name), 299), 95)

        def writer() -> None:
            for task in tasks:
                write_shard(task)

        def whole() -> None:
            shutil.rmtree(out / "b", ignore_errors=True)
            build_shards(ShardConfig(captions=cfg.captions, images=cfg.images, out=str(out / "b"), image_size=299,
                                     shard_size=75, workers=1))

        # The four member headers of each sample (ids.npy, jpg, json, lengths.npy): write_shard's template
        # against tarfile's own TarInfo.tobuf (the same bytes, tests/data/test_shards.py).
        members = [(f"{key}.{ext}", size) for key in (f"img{i:06d}" for i in range(n))
                   for ext, size in (("ids.npy", 1208), ("jpg", 30000), ("json", 400), ("lengths.npy", 148))]

        def template_headers() -> None:
            for name, size in members:
                _tar_header(name, size)

        def tarfile_headers() -> None:
            for name, size in members:
                _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")

        params = {"images": n, "image_size": 299}
        rec.measure("shards: tar member headers, write_shard's template", "us per image (4 headers)", "us",
                    [1e3 * v for v in best_ms(template_headers, n, repeats)], **params)
        rec.measure("shards: tar member headers, tarfile.TarInfo.tobuf", "us per image (4 headers)", "us",
                    [1e3 * v for v in best_ms(tarfile_headers, n, repeats)], **params)
        rec.measure("shards: load_image + encode_jpeg", "ms per image", "ms", best_ms(images_only, n, repeats),
                    **params)
        rec.measure("shards: write_shard", "ms per image", "ms", best_ms(writer, n, repeats), **params)
        rec.measure("shards: build_shards, 1 worker", "ms per image", "ms", best_ms(whole, n, repeats), **params)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def loader(rec: common.Recorder, data: Path, shard_dir: Path, repeats: int) -> None:
    import numpy as np
    from PIL import Image
    from webdataset.tariterators import tarfile_samples

    from itsim.data.loader import decode_sample, split_shards
    from itsim.data.source import select as _select

    sources = [p.read_bytes() for p in sorted((data / "images").glob("*.jpg"))]
    urls = split_shards(shard_dir, "train")
    samples = list(tarfile_samples(({"url": u} for u in urls), select_files=_select))

    def source_decode() -> None:
        for b in sources:
            np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((299, 299), Image.NEAREST))

    def tar_read() -> None:
        list(tarfile_samples(({"url": u} for u in urls), select_files=_select))

    def shard_decode() -> None:
        for s in samples:
            decode_sample(s)

    params = {"source_kb": round(float(np.mean([len(b) for b in sources])) / 1e3, 1),
              "shard_jpeg_kb": round(float(np.mean([len(s["jpg"]) for s in samples])) / 1e3, 1)}
    rec.measure("loader: source JPEG decode + nearest resize (generator)", "ms per pair", "ms",
                best_ms(source_decode, len(sources), repeats), **params)
    rec.measure("loader: shard tar read", "ms per pair", "ms", best_ms(tar_read, len(samples), repeats), **params)
    rec.measure("loader: shard sample decode (299 px JPEG + arrays)", "ms per pair", "ms",
                best_ms(shard_decode, len(samples), repeats), **params)


def train(rec: common.Recorder, sizes: tuple[int, ...], repeats: int) -> None:
    import torch

    from bench_train import padded_text
    from itsim.model import ItsimModel, ModelConfig

    b = 32
    model = ItsimModel(ModelConfig(vocab_size=2000)).train()
    model_cl = ItsimModel(ModelConfig(vocab_size=2000, channels_last=True)).train().to(memory_format=torch.channels_last)
    ids = torch.randint(2, 2000, (b, 100), generator=torch.Generator().manual_seed(0))
    lengths = torch.full((b,), 11)  # about the synthetic and Flickr caption lengths
    img_vec, txt_vec = torch.randn(b * 8, 512, requires_grad=True), torch.randn(b * 8, 256, requires_grad=True)
    parts: dict[str, Callable[[], Any]] = {
        "LSTM packed (11 tokens)": lambda: model.encode_text(ids, lengths).sum().backward(),
        "LSTM padded to 100": lambda: padded_text(model, ids).sum().backward(),
        "head over 256 pairs": lambda: model.head(img_vec, txt_vec).sum().backward(),
    }
    for size in sizes:
        images = torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8)
        parts[f"CNN {size} px"] = lambda images=images: model.encode_image(images).sum().backward()
        parts[f"CNN {size} px channels_last"] = lambda images=images: model_cl.encode_image(images).sum().backward()
    for name, fn in parts.items():
        rec.measure(f"train step part: {name}", "s per batch of 32 (fwd+bwd)", "s",
                    [v / 1e3 for v in best_ms(fn, 1, repeats)], threads=1, batch=b)


def score(rec: common.Recorder, data: Path, repeats: int) -> None:
    import pandas as pd

    import bench_score
    from itsim.score import Scorer

    work = Path(tempfile.mkdtemp(prefix="breakdown-", dir=data.parent))
    try:
        model = bench_score.make_model(data, work / "model", 128, tiny=False)
        df = pd.read_csv(bench_score.pairs_csv(data, 512, work / "p.csv"))
        scorer = Scorer.from_dir(model, device="cpu", images_root=data / "images", batch_size=256)
        chunks = [df.iloc[i:i + 256] for i in range(0, len(df), 256)]
        preps = [scorer.prepare(c["image"].tolist(), c["caption"].tolist()) for c in chunks]

        def prepare() -> None:
            for c in chunks:
                scorer.prepare(c["image"].tolist(), c["caption"].tolist())

        def run_model() -> None:
            for p in preps:
                scorer.score_prepared(p)

        rec.measure("score: prepare_rows (decode, resize, tokenise)", "ms per row", "ms",
                    best_ms(prepare, len(df), repeats), image_size=128, threads=1)
        rec.measure("score: model", "ms per row", "ms", best_ms(run_model, len(df), repeats), image_size=128,
                    threads=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    common.setup_logging()
    torch.set_num_threads(1)  # shares of one core; a second shared core only adds noise
    mode = common.mode_of(args)
    repeats = args.repeats or {"tiny": 1, "quick": 2, "full": 3}[mode]
    rec = common.Recorder("breakdown", mode, args.out, **({"run_id": args.run_id} if args.run_id else {}))
    rec.machine()
    n = {"tiny": 24, "quick": 160, "full": 400}[mode]
    data = common.synth_data(args.cache, n, *((96, 160) if mode == "tiny" else (320, 640)))
    shards(rec, data, repeats)
    loader(rec, data, common.shards_for(args.cache, data, 299, shard_size=max(4, n // 16)), repeats)
    train(rec, (32,) if mode == "tiny" else (128, 299), repeats if mode != "full" else 2)
    score(rec, common.synth_data(args.cache, 200 if mode != "tiny" else 20,
                                 *((96, 160) if mode == "tiny" else (320, 640))), repeats)
    return common.finish(rec)


if __name__ == "__main__":
    raise SystemExit(main())
