"""Synthetic captioned images: the embedded default data for the demo and the tests.

Each image is a procedurally drawn scene (coloured shapes on a textured background, `scene.py`)
and its captions are paraphrases generated from the same scene description (`synth_captions`), so a
caption is true of its image by construction. This module writes the files and holds `itsim synth`.

Output is the Flickr30k Kaggle layout (`OUT/results.csv` with `image_name| comment_number| comment`
rows, `OUT/images/*.jpg`), so the synthetic data goes through exactly the reader real data uses.
Every image draws from its own generator seeded by (seed, index): the output is byte-identical for a
seed whatever the worker count.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from itsim import config, storage
from itsim.data.synth.captions import COL_NAMES, PLURALS, ROW_NAMES, TEMPLATES, make_captions
from itsim.data.synth.scene import (BACKGROUNDS, COLOURS, DISTRACTOR_RGB, SHAPES, TEXTURES, Group, Item, Scene,
                                    make_scene, render)
from itsim.errors import UserError
from itsim.images import encode_jpeg
from itsim.io import atomic_write
from itsim.progress import every_tenth, progress as progress_bar

__all__ = ["CSV_HEADER", "MAX_CAPTIONS", "SHAPES", "PLURALS", "COLOURS", "BACKGROUNDS", "TEXTURES",
           "DISTRACTOR_RGB", "ROW_NAMES", "COL_NAMES", "TEMPLATES", "SynthConfig", "Item", "Group", "Scene",
           "make_scene", "render", "make_captions", "image_name", "scene_for", "make_sample", "run", "generate",
           "add_cli"]

log = logging.getLogger(__name__)

CSV_HEADER = "image_name| comment_number| comment"
MAX_CAPTIONS = 10


@dataclass
class SynthConfig:
    out: str = field(default="", metadata={"help": "output folder (results.csv, images/)"})
    images: int = field(default=1000, metadata={"help": "number of images"})
    seed: int = field(default=0, metadata={"help": "same seed, same bytes"})
    min_size: int = field(default=320, metadata={"help": "smallest image side in px"})
    max_size: int = field(default=640, metadata={"help": "largest image side in px"})
    captions_per_image: int = field(default=5, metadata={"help": f"captions per image (1-{MAX_CAPTIONS})"})
    quality: int = field(default=90, metadata={"help": "JPEG quality"})
    workers: int = field(default=1, metadata={"help": "processes; the output does not depend on it"})


def image_name(index: int) -> str:
    return f"synth_{index:06d}.jpg"


def _rngs(seed: int, index: int) -> list[np.random.Generator]:
    """Independent scene / pixel-noise / caption streams per image, so each can change alone."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(3)]


def scene_for(seed: int, index: int, min_size: int = 320, max_size: int = 640) -> Scene:
    """The scene behind image `index` of a run with `seed` (what its captions describe)."""
    return make_scene(_rngs(seed, index)[0], min_size, max_size)


def make_sample(cfg: SynthConfig, index: int) -> tuple[Scene, Image.Image, list[str]]:
    scene_rng, pixel_rng, caption_rng = _rngs(cfg.seed, index)
    scene = make_scene(scene_rng, cfg.min_size, cfg.max_size)
    return scene, render(scene, pixel_rng), make_captions(scene, caption_rng, cfg.captions_per_image)


def _write_range(cfg: SynthConfig, start: int, stop: int) -> list[list[str]]:
    image_dir = Path(cfg.out) / "images"
    captions = []
    for index in range(start, stop):
        _, img, caps = make_sample(cfg, index)
        (image_dir / image_name(index)).write_bytes(encode_jpeg(img, cfg.quality))
        captions.append(caps)
    return captions


def _validate(cfg: SynthConfig) -> None:
    config.check(cfg, ("out",), [
              (cfg.images >= 1, f"--images must be >= 1 (got {cfg.images})"),
              (cfg.seed >= 0, f"--seed must be >= 0 (got {cfg.seed})"),
              (64 <= cfg.min_size <= cfg.max_size <= 4096,
               f"need 64 <= --min-size <= --max-size <= 4096 (got {cfg.min_size}, {cfg.max_size})"),
              (1 <= cfg.captions_per_image <= MAX_CAPTIONS,
               f"--captions-per-image must be in 1..{MAX_CAPTIONS} (got {cfg.captions_per_image})"),
              (1 <= cfg.quality <= 100, f"--quality must be in 1..100 (got {cfg.quality})"),
              (cfg.workers >= 1, f"--workers must be >= 1 (got {cfg.workers})")])


def run(cfg: SynthConfig, progress: bool = True) -> Path:
    """Write the images, then results.csv (atomically, so a CSV never names a missing image)."""
    _validate(cfg)
    cfg = dataclasses.replace(cfg, out=storage.require_local(cfg.out, "--out"))  # a URL: one line, exit 2
    out = Path(cfg.out)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out / 'images'}: {exc}") from None
    (out / "results.csv").unlink(missing_ok=True)  # an interrupted rerun must not leave the old CSV behind
    chunk = 50
    ranges = [(s, min(s + chunk, cfg.images)) for s in range(0, cfg.images, chunk)]
    bar = progress_bar(cfg.images, "synth", "img", logger=log, every=every_tenth(cfg.images), disable=not progress)
    results: list[list[str]] = []
    if cfg.workers == 1:
        for start, stop in ranges:
            results.extend(_write_range(cfg, start, stop))
            bar.update(stop - start)
    else:
        # spawn: safe even when the caller has already imported torch or started threads.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
            futures = [pool.submit(_write_range, cfg, start, stop) for start, stop in ranges]
            for fut, (start, stop) in zip(futures, ranges):
                results.extend(fut.result())
                bar.update(stop - start)
    bar.close()
    lines = [CSV_HEADER] + [f"{image_name(i)}| {k}| {cap}" for i, caps in enumerate(results) for k, cap in enumerate(caps)]
    csv_path = out / "results.csv"
    atomic_write(csv_path, "\n".join(lines) + "\n")
    (out / "README.txt").write_text(
        f"Synthetic captioned images from `itsim synth` (seed {cfg.seed}): {cfg.images} JPEGs in images/ and "
        f"{cfg.captions_per_image} captions each in results.csv (Flickr30k Kaggle format).\n")
    config.save(cfg, out / "synth_config.yaml")
    stale = sorted(p.name for p in (out / "images").glob("synth_*.jpg")
                   if p.stem[6:].isdigit() and int(p.stem[6:]) >= cfg.images)
    if stale:
        log.warning("%s holds %d images from an earlier, larger run (not in results.csv), e.g. %s",
                    out / "images", len(stale), stale[0])
    return csv_path


def generate(out_dir: str | Path, n_images: int, seed: int, *, min_size: int = 320, max_size: int = 640,
             captions_per_image: int = 5, quality: int = 90, workers: int = 1, progress: bool = False) -> Path:
    """Python entry point: write `n_images` synthetic images and return the path of results.csv.

    `workers > 1` starts spawned processes, so a calling script needs the usual
    `if __name__ == "__main__":` guard (the `itsim` CLI and `python -m` entry points have it).
    """
    cfg = SynthConfig(str(out_dir), n_images, seed, min_size, max_size, captions_per_image, quality, workers)
    return run(cfg, progress=progress)


def _cli(args: argparse.Namespace) -> int:
    cfg = config.from_args(SynthConfig, args)
    _validate(cfg)
    log.info("%s", config.describe(cfg))
    start = time.perf_counter()
    csv_path = run(cfg)
    seconds = time.perf_counter() - start
    print(f"wrote {cfg.images} images and {cfg.images * cfg.captions_per_image} captions to {csv_path} "
          f"in {seconds:.1f} s ({cfg.images / seconds:.0f} images/s)")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = config.add_command(
        subparsers, "synth", SynthConfig, _cli, skip=("out",),
        help="write synthetic captioned images (Flickr30k results.csv layout)",
        description="Procedurally drawn shapes with paraphrased captions; byte-identical for a seed.")
    parser.add_argument("out", help="output folder: results.csv, images/, README.txt, synth_config.yaml")
