"""`itsim build-shards`: caption file + image folder -> WebDataset shards, vocab and manifest.

Plan (read captions, splits, vocab from train, deterministic order of images) -> write each shard
with `writer.write_shard` (in-process, a process pool, or Ray tasks) -> failures.jsonl and
manifest.json. Every input row ends up either in a shard or in failures.jsonl, and the manifest
says so (`rows`). A re-run skips complete shards, so an interrupted build resumes; the manifest is
written last, so its presence means the build finished. `--out`, `--captions`, `--images`, `--vocab`
and `--val-images` may be store URLs (`s3://bucket/prefix`); `remote` keeps a store's prefix consistent.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import re
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np

from itsim import config, storage
from itsim.data.captions import FORMATS, read_captions
from itsim.data.splits import assign_splits, check_fractions
from itsim.data.shards import remote
from itsim.data.shards.pool import run_shards, start_workers_early
from itsim.data.shards.manifest import SPLIT_ORDER, make_manifest, write_indexes
from itsim.data.shards.remote import INDEX_SUFFIX, basename
from itsim.data.shards.writer import ShardItem, ShardTask, make_keys, write_shard
from itsim.errors import UserError
from itsim.io import atomic_write, write_error
from itsim.images import DEFAULT_MAX_PIXELS, RESIZE_MODES
from itsim.text import Vocab, normalize

log = logging.getLogger(__name__)

# Fields that do not change the output: a re-run may change them freely.
RUNTIME_FIELDS = ("out", "workers", "engine", "ray_address", "overwrite", "max_failure_rate")
_OUR_FILE = re.compile(r"^(?P<shard>[A-Za-z0-9_]+-\d{6})(\.tar|_stats\.json)(\.[0-9a-f]+\.tmp)?$")
PATH_FIELDS = ("captions", "images", "out", "vocab", "val_images")

__all__ = ["ShardConfig", "FailureRateError", "build_shards", "write_shard", "add_cli"]


def _opt(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ShardConfig:
    captions: str = _opt("", "caption file (any supported format); a path or URL")
    images: str = _opt("", "folder (or store prefix) the image names are relative to")
    out: str = _opt("", "output folder or store prefix (s3://bucket/shards) for shards, vocab, manifest")
    format: str = _opt("auto", "caption file format or auto")
    image_col: str | None = _opt(None, "image column of a generic table")
    caption_col: str | None = _opt(None, "caption column of a generic table")
    image_size: int = _opt(299, "side of the square stored images")
    resize: Literal["stretch", "center_crop", "pad"] = _opt("stretch", "how images become square")
    max_len: int = _opt(100, "token ids per caption (truncate/pad)")
    shard_size: int = _opt(1000, "images per shard at most")
    workers: int = _opt(0, "parallel shard writers; 0 = all CPUs")
    engine: Literal["processes", "ray"] = _opt("processes", "run shard writers as local processes or Ray tasks")
    ray_address: str | None = _opt(None, "Ray cluster address; none = start a local Ray")
    splits: tuple[float, ...] = _opt((0.9, 0.05, 0.05), "train,val,test fractions for images without a source split")
    val_images: str | None = _opt(None, "file of val image names (one per line, or a TSV with the image first)")
    seed: int = _opt(0, "seed for hashed splits and shard order")
    vocab: str | None = _opt(None, "use this vocab.json instead of building one from train")
    min_count: int = _opt(1, "drop words seen fewer times in train")
    max_vocab: int = _opt(20000, "vocab size including <pad>, <unk>")
    jpeg_quality: int = _opt(95, "JPEG quality of stored images")
    max_pixels: int = _opt(DEFAULT_MAX_PIXELS, "refuse larger images (decompression bombs)")
    max_failure_rate: float = _opt(0.1, "exit 1 when a larger fraction of caption rows is lost")
    overwrite: bool = _opt(False, "replace an output built with another config")
    storage_options: dict[str, Any] | None = config.secret_field(
        None, "JSON object of extra store settings (endpoint_url, ...) for URLs; never printed or saved")


class FailureRateError(Exception):
    """The build finished but lost more rows than allowed; `manifest` describes it."""

    def __init__(self, message: str, manifest: dict):
        super().__init__(message)
        self.manifest = manifest


# ---- checks and inputs -------------------------------------------------------------------------

def _checked(cfg: ShardConfig) -> ShardConfig:
    """Validate values and make paths absolute, so the saved config means the same from anywhere."""
    config.check(cfg, ("captions", "images", "out"), [(cfg.image_size >= 1, "--image-size must be >= 1"), (cfg.max_len >= 1, "--max-len must be >= 1"),
              (cfg.shard_size >= 1, "--shard-size must be >= 1"), (cfg.workers >= 0, "--workers must be >= 0"),
              (1 <= cfg.jpeg_quality <= 100, "--jpeg-quality must be in 1..100"),
              (cfg.max_pixels >= 1, "--max-pixels must be >= 1"), (cfg.min_count >= 1, "--min-count must be >= 1"),
              (cfg.max_vocab >= 2, "--max-vocab must be >= 2"),
              (0 <= cfg.max_failure_rate <= 1, "--max-failure-rate must be in 0..1"),
              (cfg.resize in RESIZE_MODES, f"--resize must be one of {RESIZE_MODES}"),
              (cfg.format in ("auto", *FORMATS), f"--format must be auto or one of {', '.join(FORMATS)}"),
              (cfg.engine in ("processes", "ray"), "--engine must be processes or ray")])
    try:
        splits = check_fractions(cfg.splits)
    except ValueError as exc:
        raise UserError(f"--splits: {exc}") from None
    paths = {}
    for name in PATH_FIELDS:
        if value := getattr(cfg, name):  # a local path made absolute; a URL checked, `s3:/x` refused
            loc = storage.resolve(value, cfg.storage_options)
            paths[name] = value.rstrip("/") if loc.fs is not None else os.path.abspath(os.path.expanduser(loc.path))
    cfg = dataclasses.replace(cfg, splits=splits, **paths)
    opts = cfg.storage_options
    if not remote.exists(cfg.captions, opts):
        raise UserError(f"caption file not found: {cfg.captions}")
    if not remote.exists(cfg.images, opts, folder=True):
        raise UserError(f"image folder not found: {cfg.images}")
    for name in ("vocab", "val_images"):
        if getattr(cfg, name) and not remote.exists(getattr(cfg, name), opts):
            raise UserError(f"--{name.replace('_', '-')} file not found: {getattr(cfg, name)}")
    if storage.is_url(cfg.out):  # no bucket, no access: say so before reading and planning every input
        storage.exists(storage.join(cfg.out, "manifest.json"), opts)
    elif Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out} exists and is not a folder")
    return cfg


def _read_val_images(path: str, options: dict | None = None) -> list[str]:
    """One image name per line; for a TSV (e.g. labelled pairs) the first column; header `image` skipped."""
    names = []
    for line in storage.read_bytes(path, options).decode("utf-8", errors="replace").splitlines():
        name = line.split("\t")[0].strip()
        if name and name.lower() not in ("image", "image_name", "filename"):
            names.append(name)
    if not names:
        raise UserError(f"--val-images {path}: no image names in the file")
    return names


def _reader_failures(report: Any) -> list[dict]:
    """Rows the caption reader skipped; it reports reasons, counts and line numbers, not names."""
    records = []
    for reason, count in sorted(report.skipped.items()):
        lines = report.skipped_lines.get(reason, [])
        more = " and more" if count > len(lines) else ""
        records.append({"image": None, "reason": reason, "detail": f"skipped by the caption reader (lines {lines}{more})",
                        "caption_rows": count, "shard": None, "lines": lines})
    return records


def _split_empty_captions(df: Any) -> tuple[Any, list[dict]]:
    """Drop captions with no words left after `normalize` (they would train on a lone <unk>)."""
    empty = df["caption"].map(lambda c: normalize(c) == "")
    failures = []
    if empty.any():
        totals = df.groupby("image", sort=True).size()
        for image, n_empty in df[empty].groupby("image", sort=True).size().items():
            n = int(totals[image])
            detail = (f"all {n} captions empty after normalisation" if n_empty == n else
                      f"{n_empty} of {n} captions empty after normalisation; image kept with the others")
            failures.append({"image": image, "reason": "empty_caption", "detail": detail,
                             "caption_rows": int(n_empty), "shard": None})
    return df[~empty], failures


def _vocab(cfg: ShardConfig, df: Any, local_vocab: str | None) -> Vocab:
    if local_vocab:
        try:
            return Vocab.load(local_vocab)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"--vocab {cfg.vocab}: cannot load ({exc})") from None
    train = df.loc[df["split"] == "train", "caption"].tolist()
    if not train:
        raise UserError("no training captions to build a vocab from (check --splits or pass --vocab)")
    return Vocab.build(train, min_count=cfg.min_count, max_size=cfg.max_vocab)


# ---- plan --------------------------------------------------------------------------------------

def plan_shards(cfg: ShardConfig, df: Any, vocab: Vocab) -> list[ShardTask]:
    """Deterministic shards: by split, images in a seeded shuffle (so shards mix), chunked."""
    df = df.sort_values(["image", "caption_idx"], kind="stable")  # stable: file order breaks ties
    keys = make_keys(df["image"].unique().tolist())
    groups: dict[str, list[ShardItem]] = {}
    rows = zip(df["image"].tolist(), df["caption_idx"].tolist(), df["caption"].tolist(), df["split"].tolist())
    for image, group in itertools.groupby(rows, key=lambda row: row[0]):
        group = list(group)
        item = ShardItem(image=image, key=keys[image], captions=tuple(r[2] for r in group),
                         caption_idx=tuple(int(r[1]) for r in group))
        groups.setdefault(str(group[0][3]), []).append(item)
    splits = [s for s in SPLIT_ORDER if s in groups] + sorted(s for s in groups if s not in SPLIT_ORDER)
    tasks = []
    for split in splits:
        items = groups[split]
        order = np.random.default_rng([cfg.seed, zlib.crc32(split.encode())]).permutation(len(items))
        items = [items[i] for i in order]
        safe_split = re.sub(r"[^A-Za-z0-9_]", "_", split)
        for n, start in enumerate(range(0, len(items), cfg.shard_size)):
            tasks.append(ShardTask(
                name=f"{safe_split}-{n:06d}", split=split, out_dir=cfg.out, images_root=cfg.images,
                source=basename(cfg.captions), items=tuple(items[start:start + cfg.shard_size]),
                vocab_words=tuple(vocab.words), image_size=cfg.image_size, resize=cfg.resize,
                max_len=cfg.max_len, jpeg_quality=cfg.jpeg_quality, max_pixels=cfg.max_pixels,
                storage_options=cfg.storage_options))
    return tasks


def _comparable(cfg_dict: dict) -> dict:
    return {k: v for k, v in cfg_dict.items() if k not in RUNTIME_FIELDS}


def _check_old_manifest(cfg: ShardConfig, vocab: Vocab, text: str, where: str) -> None:
    """Refuse to add to an output that an earlier build with another config or vocab made."""
    try:
        old = json.loads(text)
        old_cfg, old_vocab = old["config"], old["vocab"]["hash"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{where} is unreadable; use --overwrite to rebuild {cfg.out}") from None
    new_cfg = _comparable(config.to_dict(cfg))
    changed = sorted(k for k in set(new_cfg) | set(_comparable(old_cfg)) if new_cfg.get(k) != old_cfg.get(k))
    if changed or old_vocab != vocab.hash:
        what = f"config differs in {', '.join(changed)}" if changed else "the vocab differs"
        raise UserError(f"{cfg.out} holds shards built differently ({what}); use --overwrite or another --out")


def _prepare_out(cfg: ShardConfig, vocab: Vocab, tasks: list[ShardTask]) -> None:
    """Refuse to mix builds; clear ours on --overwrite; drop temp files and shards not in the plan."""
    out = Path(cfg.out)
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not cfg.overwrite:
        try:
            text = manifest_path.read_text()
        except OSError:
            raise UserError(f"{manifest_path} is unreadable; use --overwrite to rebuild {out}") from None
        _check_old_manifest(cfg, vocab, text, str(manifest_path))
    planned = {t.name for t in tasks}
    for path in sorted(out.iterdir()):
        match = _OUR_FILE.match(path.name)
        if match and (cfg.overwrite or path.name.endswith(".tmp") or match["shard"] not in planned):
            log.info("removing %s", path.name)
            path.unlink()
    if cfg.overwrite:
        for name in ("manifest.json", "failures.jsonl"):
            (out / name).unlink(missing_ok=True)
        for index in out.glob(f"*{INDEX_SUFFIX}"):
            index.unlink()


# ---- finish ------------------------------------------------------------------------------------

def _write_error(out: Path, exc: OSError) -> str:
    """One line for a failed write; complete shards stay, so the same command resumes the build."""
    return (f"cannot write to {out}: {write_error(exc, out)}; complete shards are kept: free space and run the "
            "same command again")


def build_shards(cfg: ShardConfig) -> dict:
    """Build (or resume) the shards described by `cfg`; returns the manifest.

    Raises UserError for unusable input (a StorageError for a store that fails) and FailureRateError
    (after writing every output) when more than `max_failure_rate` of the caption rows were lost.
    """
    if cfg.engine == "processes" and cfg.workers != 1:
        start_workers_early()  # the fork server imports its modules while this process imports pandas and plans
    cfg = _checked(cfg)
    log.info(config.describe(cfg))
    with tempfile.TemporaryDirectory(prefix="itsim-build-shards-") as staging:
        manifest = _build(cfg, Path(staging))
    if manifest["failure_rate"] > cfg.max_failure_rate:
        rows = manifest["rows"]
        raise FailureRateError(
            f"{rows['in_failures']} of {rows['input']} caption rows failed ({manifest['failure_rate']:.1%} > "
            f"--max-failure-rate {cfg.max_failure_rate:.1%}); see {storage.join(cfg.out, 'failures.jsonl')}",
            manifest)
    return manifest


def _build(cfg: ShardConfig, staging: Path) -> dict:
    """The build; inputs at URLs are downloaded to `staging`, and for an --out URL the small files are
    written in `staging/out` and uploaded at the end (shards are uploaded by their workers)."""
    opts, is_remote = cfg.storage_options, storage.is_url(cfg.out)
    out = staging / "out" if is_remote else Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out {out}: {exc.strerror or exc}") from None

    df, report = read_captions(remote.fetch(cfg.captions, staging, opts), cfg.format, cfg.image_col,
                               cfg.caption_col)
    if report.rows_in == 0:
        raise UserError(f"{cfg.captions}: no caption rows")
    failures = _reader_failures(report)
    n_images = df["image"].nunique()
    df, empty = _split_empty_captions(df)
    failures += empty
    images_lost = n_images - df["image"].nunique()  # every caption empty
    val_images = _read_val_images(cfg.val_images, opts) if cfg.val_images else None
    df = assign_splits(df, cfg.splits, cfg.seed, val_images)
    split_report = dict(df.attrs.get("split_report", {}))
    vocab = _vocab(cfg, df, remote.fetch(cfg.vocab, staging, opts))
    tasks = plan_shards(cfg, df, vocab)
    done = None
    if is_remote:
        done = remote.prepare(cfg.out, opts, tasks, cfg.overwrite,
                              lambda text, where: _check_old_manifest(cfg, vocab, text, where), _OUR_FILE)
    else:
        _prepare_out(cfg, vocab, tasks)
    try:
        vocab.save(out / "vocab.json")
        config.save(cfg, out / "build_config.yaml")  # `--config OUT/build_config.yaml` repeats this build

        stats, images_now, seconds = run_shards(tasks, cfg.workers, cfg.engine, cfg.ray_address, done)
        for s in stats:
            failures += s["failures"]
        atomic_write(out / "failures.jsonl", "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures))
        indexes = write_indexes(out, tasks, stats)
        manifest = make_manifest(cfg, report, vocab, tasks, stats, failures, images_lost, split_report, images_now,
                                 seconds, indexes)
        rows = manifest["rows"]
        if rows["accounted"] != rows["input"]:  # a bug in the accounting, not bad input
            log.error("row accounting mismatch: %d input rows, %d in shards + %d in failures",
                      rows["input"], rows["in_shards"], rows["in_failures"])
        for reason, counts in manifest["failures"]["by_reason"].items():
            log.warning("failures: %s: %d records, %d caption rows", reason, counts["records"], counts["caption_rows"])
        atomic_write(out / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False))
        if is_remote:
            remote.publish(out, cfg.out, opts, indexes)
    except storage.StorageError as exc:  # the store failed: what it holds is complete, the rest is missing
        raise storage.StorageError(f"{exc}; shards already stored are kept: run the same command again to "
                                   "resume", exc.reason, exc.transient) from None
    except OSError as exc:  # the output side: a full disk, a read-only or vanished --out
        raise UserError(_write_error(out, exc)) from None
    return manifest


# ---- CLI ---------------------------------------------------------------------------------------

def summary_line(manifest: dict) -> str:
    splits = manifest["splits"].values()
    rate = manifest["images_per_second"]
    return (f"{sum(s['images'] for s in splits)} images, {sum(s['captions'] for s in splits)} captions, "
            f"{sum(s['n_shards'] for s in splits)} shards, {manifest['failures']['records']} failures "
            f"({manifest['failures']['caption_rows']} caption rows), "
            f"{'%.1f images/s' % rate if rate else 'nothing to write'} -> {manifest['config']['out']}")


run = build_shards  # every stage's entry point is `run(cfg)`


def _main(args: argparse.Namespace) -> int:
    cfg = config.from_args(ShardConfig, args)
    try:
        manifest = build_shards(cfg)
    except FailureRateError as exc:
        print(f"itsim build-shards: {summary_line(exc.manifest)}")
        print(f"itsim build-shards: error: {exc}", file=sys.stderr)
        return 1
    print(f"itsim build-shards: {summary_line(manifest)}")
    return 0


def add_cli(subparsers: Any) -> None:
    config.add_command(subparsers, "build-shards", ShardConfig, _main,
                       help="caption file + images -> WebDataset shards", description=__doc__.splitlines()[0])
