"""Training loader from an object store: decoded images/s streaming the same shards from a local S3
server vs from local disk, same loader, same 2 DataLoader workers, measured in the same run.

Both sides are `make_loader` over the train split as `itsim train` builds it (`split_shards`, then
each worker opening its shards itself: a local file, or `storage_stream.open_input` through s3fs with
retries), batches of 32, repeats interleaved with one loader alive at a time. The server is moto's
(`python -m moto.server`) on 127.0.0.1 in its own process: its request handling shares the machine's
cores with the workers, and there is no network latency or bandwidth limit, so the ratio measures
itsim's store path (HTTP requests, block reads, copies) rather than a real store. Goal: >= 0.8.

Shards hold a quarter of the images (40 at --quick, 100 in full; itsim's default is 1000): a store costs
a few requests per shard, so tiny shards (bench_loader's 10 images) measure mostly that per-shard cost
(`--shard-size 10` shows it).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import common

SIZES = {"tiny": (24, 32, 4, 1), "quick": (160, 299, 12, 2), "full": (400, 299, 24, 3)}  # images, px, batches, repeats
BATCH = 32
WORKERS = 2
BUCKET = "itsim-bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


def start_server() -> tuple[subprocess.Popen, dict[str, Any]]:
    """A moto S3 server in its own process on a free port, with one bucket; (process, storage options).

    Its own process, as a real store would be: in this one its request handling would hold the GIL
    against the loop that receives the workers' batches."""
    import boto3

    os.environ.update(CREDENTIALS)  # dummy credentials, inherited by the loader's workers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            break
        except Exception:  # noqa: BLE001 - not listening yet
            if server.poll() is not None:
                raise RuntimeError("the moto server did not start") from None
            time.sleep(0.1)
    return server, {"endpoint_url": endpoint}


def images(source: str, options: dict[str, Any] | None, n_train: int) -> Iterator[int]:
    """Decoded images per batch of the training loader over `source` (a folder or a store URL)."""
    from itsim.data.loader import StreamSpec, batches_per_epoch, make_loader, split_shards

    spec = StreamSpec(shards=split_shards(source, "train", options), batch_size=BATCH, seed=0, shuffle_buffer=256,
                      batches_per_epoch=batches_per_epoch(n_train, BATCH, 1), options=options)
    for batch in make_loader(spec, workers=WORKERS):
        yield batch["images"].shape[0]


def rate(stream: Iterator[int], n_batches: int) -> float:
    start = time.perf_counter()
    n = sum(islice(stream, n_batches))
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    from itsim import storage
    from itsim.data.loader import read_manifest

    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--shard-size", type=int, default=0,
                   help="images per shard (default: a quarter of the images; itsim's default is 1000)")
    args = p.parse_args(argv)
    common.setup_logging()
    mode = common.mode_of(args)
    n_images, size, n_batches, repeats = SIZES[mode]
    repeats = args.repeats or repeats
    rec = common.Recorder("storage", mode, args.out, **({"run_id": args.run_id} if args.run_id else {}))
    rec.machine()
    data = common.synth_data(args.cache, n_images, *((96, 160) if mode == "tiny" else (320, 640)))
    shards = common.shards_for(args.cache, data, size, shard_size=args.shard_size or max(4, n_images // 4))
    server, options = start_server()
    try:
        url = f"s3://{BUCKET}/shards"
        storage.upload_tree(str(shards), url, options, last=("manifest.json",))
        n_train = read_manifest(shards)["splits"]["train"]["images"]
        sources = {"loader from local disk, workers=2": (str(shards), None),
                   "loader from S3 (local moto server), workers=2": (url, options)}
        rates: dict[str, list[float]] = {name: [] for name in sources}
        for _ in range(repeats):  # one loader alive at a time: no idle loader prefetching beside the timed one
            for name, (source, opts) in sources.items():
                stream = images(source, opts, n_train)
                list(islice(stream, 2 * WORKERS))  # workers started, first shards opened
                rates[name].append(rate(stream, n_batches))
                stream.close()  # type: ignore[attr-defined]  # ends the DataLoader workers
    finally:
        server.terminate()
        server.wait()
    params = {"images": n_images, "image_size": size, "batch": BATCH, "workers": WORKERS,
              "batches_per_repeat": n_batches, "train_shards": len(list(Path(shards).glob("train-*.tar"))),
              "shard_size": args.shard_size or max(4, n_images // 4)}
    measured = {name: rec.measure(name, "decoded images/s", "images/s", values, **params)
                for name, values in rates.items()}
    rec.ratio("decoded images/s, loader from S3 vs from local disk, 2 workers",
              measured["loader from S3 (local moto server), workers=2"], measured["loader from local disk, workers=2"],
              target=0.8, note="same shards, same loader and workers; the server runs on the same cores, "
                               "without network latency")
    return common.finish(rec)


if __name__ == "__main__":
    raise SystemExit(main())
