"""Shard build throughput: `build_shards` with 1 and 2 workers against a bare PIL loop.

The bare loop is the floor for this work on one core: open, convert to RGB, resize to the shard size
and re-encode as JPEG, nothing else (no tar, no captions, no vocab, no failure bookkeeping). A
second bare loop also asks the JPEG decoder to downscale while decoding (`Image.draft`), as
`itsim.images.load_image` does: the strictest floor, reported for information. itsim is timed
around the whole `build_shards` call (reading captions, splits, vocab, process pool, manifest). The
bare loop also runs split over 2 forked processes, to show how far the machine itself scales.
"""
from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

from PIL import Image

import common

SIZES = {"tiny": (24, 32, 1), "quick": (160, 299, 2), "full": (1200, 299, 3)}  # images, image size, repeats


def bare_loop(paths: list[Path], size: int, quality: int = 95, draft: bool = False) -> int:
    """What every shard builder must do per image, and nothing more."""
    for path in paths:
        with Image.open(path) as img:
            if draft:
                img.draft("RGB", (size, size))
            out = img.convert("RGB").resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=quality)
    return len(paths)


def bare_loop_processes(paths: list[Path], size: int, processes: int) -> int:
    """The bare loop split over `processes` forked processes: what this machine's cores scale to."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return sum(pool.starmap(bare_loop, [(paths[i::processes], size) for i in range(processes)]))


def itsim_build(data: Path, out: Path, size: int, workers: int, shard_size: int) -> int:
    from itsim.data.shards import ShardConfig, build_shards

    manifest = build_shards(ShardConfig(captions=str(data / "results.csv"), images=str(data / "images"),
                                        out=str(out), image_size=size, shard_size=shard_size, workers=workers,
                                        jpeg_quality=95))
    return sum(s["images"] for s in manifest["splits"].values())


def main(argv: list[str] | None = None) -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    common.setup_logging()
    mode = common.mode_of(args)
    n_images, size, repeats = SIZES[mode]
    repeats = args.repeats or repeats
    rec = common.Recorder("shards", mode, args.out, **({"run_id": args.run_id} if args.run_id else {}))
    rec.machine()
    data = common.synth_data(args.cache, n_images, *((96, 160) if mode == "tiny" else (320, 640)))
    paths = sorted((data / "images").glob("*.jpg"))
    shard_size = max(4, n_images // 16)  # enough shards that 2 workers stay busy to the end
    work = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=args.cache))
    cases = {
        "bare PIL loop": lambda: bare_loop(paths, size),
        "bare PIL loop + draft": lambda: bare_loop(paths, size, draft=True),
        "bare PIL loop, 2 processes": lambda: bare_loop_processes(paths, size, 2),
        "itsim build-shards 1 worker": lambda: itsim_build(data, work / "w1", size, 1, shard_size),
        "itsim build-shards 2 workers": lambda: itsim_build(data, work / "w2", size, 2, shard_size),
    }
    rates: dict[str, list[float]] = {name: [] for name in cases}
    try:
        bare_loop(paths, size)  # warm-up: file cache, PIL codecs
        for _ in range(repeats):  # interleaved, so load changes hit every case alike
            for name, fn in cases.items():
                for sub in ("w1", "w2"):
                    shutil.rmtree(work / sub, ignore_errors=True)
                seconds, n = common.timed(fn)
                rates[name].append(n / seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    params = {"images": n_images, "image_size": size, "shard_size": shard_size, "source": "synthetic 320-640 px"}
    r = {name: rec.measure(name, "images/s", "images/s", vals, **params) for name, vals in rates.items()}
    bare, one, two = r["bare PIL loop"], r["itsim build-shards 1 worker"], r["itsim build-shards 2 workers"]
    rec.ratio("1 worker vs bare loop (per worker)", one, bare, target=0.9)
    rec.ratio("2 workers vs bare loop on 2 processes (per worker)", two, r["bare PIL loop, 2 processes"],
              target=0.9, note="the same parallelism on both sides")
    rec.ratio("2 workers vs bare loop on 1 process (per worker)", two, bare, scale=2.0,
              note="also counts how far the machine itself scales to 2 processes")
    rec.ratio("2 workers vs 1 worker", two, one, target=1.8)
    rec.ratio("1 worker vs bare loop + draft (per worker)", one, r["bare PIL loop + draft"],
              note="strictest floor: the bare loop with the same JPEG draft decoding itsim uses")
    rec.ratio("bare loop: 2 processes vs 1", r["bare PIL loop, 2 processes"], bare,
              note="how far this machine's two cores scale the floor itself")
    return common.finish(rec)


if __name__ == "__main__":
    raise SystemExit(main())
