"""`itsim score`'s configuration: one dataclass for both modes (pairs and top-k)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from itsim import storage
from itsim.config import secret_field
from itsim.images import DEFAULT_MAX_PIXELS

# What a score run writes besides its Parquet files (an --overwrite run may replace exactly these).
OUR_OUTPUTS = ("_summary.json", "_config.yaml", "image_topk", "caption_topk", "topk_errors.parquet")


@dataclasses.dataclass
class ScoreConfig:
    model: str = dataclasses.field(default="", metadata={"help": "model directory or URL (RUN/model, from itsim train)"})
    input: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"help": "CSV/TSV/Parquet pair tables, shard folders or tars; paths or URLs "
                                      "(s3://b/pairs/*.parquet); globs allowed"})
    output: str = dataclasses.field(
        default="", metadata={"help": "output folder or URL (Parquet parts, _summary.json written last)"})
    images: str | None = dataclasses.field(
        default=None, metadata={"help": "folder or URL that image paths are relative to (paths may not escape it); "
                                        "none: paths as written, and URLs in the table are read from their store"})
    address: str | None = dataclasses.field(
        default=None, metadata={"help": "Ray cluster (auto or ray://host:port); none = local Ray in-process"})
    workers: int | None = dataclasses.field(
        default=None, metadata={"help": "model actors; none = one per GPU, or 1 without GPUs"})
    gpus_per_worker: float | None = dataclasses.field(
        default=None, metadata={"help": "GPUs per actor; none = 1 when the cluster has GPUs, else 0"})
    cpus_per_worker: float | None = dataclasses.field(
        default=None, metadata={"help": "CPUs per actor; none = sized so reads and preprocessing always fit"})
    batch_size: int = dataclasses.field(default=256, metadata={"help": "rows per model batch"})
    image_col: str = dataclasses.field(default="image", metadata={"help": "image path column of tables"})
    caption_col: str = dataclasses.field(default="caption", metadata={"help": "caption column of tables"})
    columns: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"help": "names for the columns of headerless CSV/TSV tables, e.g. image,caption,label "
                                      "(the first line is then data); empty = the first line is the header"})
    mode: Literal["pairs", "topk"] = dataclasses.field(
        default="pairs", metadata={"help": "score each row, or rank every caption for every image and back"})
    k: int = dataclasses.field(default=5, metadata={"help": "neighbours per image and per caption (topk)"})
    format: Literal["auto", "csv", "tsv", "parquet", "shards"] = dataclasses.field(
        default="auto", metadata={"help": "input format; auto = from file names"})
    split: str | None = dataclasses.field(default=None, metadata={"help": "shards: only this split"})
    max_pixels: int = dataclasses.field(default=DEFAULT_MAX_PIXELS, metadata={"help": "refuse larger images"})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "replace an earlier output in --output"})
    storage_options: dict | None = secret_field(
        None, help="JSON object of extra store settings, e.g. {\"endpoint_url\": \"http://host:9000\"} (added to "
                   "$ITSIM_STORAGE_OPTIONS; credentials come from the store's usual sources); never printed or saved")


def images_root(cfg: ScoreConfig) -> str | None:
    """`--images` as the jobs pass it on: a store URL as written, a folder (or `file://`) as an absolute path."""
    return storage.location(cfg.images) if cfg.images else None
