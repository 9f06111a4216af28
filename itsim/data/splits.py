"""Train/val/test by image, never by caption, so no photo is seen in training and scored in test.

Rules, in order:
1. `val_images` given (the Flickr8k recipe: "dev images as val"): exactly those images are val;
   every other image goes to train or test by hash, in the ratio fractions[0] : fractions[2]
   (the val fraction is unused, and source splits are ignored so that val is exactly the list).
2. Otherwise an image keeps its source split (Karpathy JSON, a table's `split` column; `restval`
   is train). If the source gives one image several splits, the first row's split wins and the
   image is counted as a conflict.
3. Images without a source split go by a seeded SHA-256 of the image name, mapped onto
   [0, 1) and cut at the cumulative fractions: stable across runs, machines and Python hash seeds.

The returned frame carries `attrs["split_report"]` with the counts of images per rule.
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import Collection, Sequence

import pandas as pd

from itsim.data.captions import normalize_split

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3:
        raise ValueError(f"split fractions must be three numbers (train, val, test), got {list(fractions)}")
    if any(not math.isfinite(f) or f < 0 for f in values):
        raise ValueError(f"split fractions must be finite and non-negative, got {list(fractions)}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {list(fractions)} (sum {sum(values):.6g})")
    return values  # type: ignore[return-value]


def hash_unit(image: str, seed: int = 0) -> float:
    """A number in [0, 1) that depends only on (seed, image name)."""
    digest = hashlib.sha256(f"{seed}:{image}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_split(image: str, fractions: Sequence[float], seed: int = 0) -> str:
    train, val, _ = fractions
    u = hash_unit(image, seed)
    if u < train:
        return "train"
    return "val" if u < train + val else "test"


def _source_splits(df: pd.DataFrame) -> tuple[dict[str, str], int]:
    """First source split per image, and how many images had conflicting ones."""
    first: dict[str, str] = {}
    conflicts: set[str] = set()
    if "split" not in df.columns:
        return first, 0
    for image, raw in zip(df["image"].tolist(), df["split"].tolist()):
        split = normalize_split(raw)
        if split is None:
            continue
        known = first.setdefault(image, split)
        if known != split:
            conflicts.add(image)
    return first, len(conflicts)


def assign_splits(df: pd.DataFrame, fractions: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0,
                  val_images: Collection[str] | None = None) -> pd.DataFrame:
    """A copy of `df` (needs an `image` column) whose `split` column is train/val/test per image."""
    fractions = check_fractions(fractions)
    if "image" not in df.columns:
        raise ValueError(f"assign_splits needs an 'image' column; the columns are {list(df.columns)}")
    images = pd.unique(df["image"]).tolist()
    report = {"images": len(images), "source": 0, "hashed": 0, "val_list": 0, "conflicts": 0,
              "val_images_not_found": 0}
    chosen: dict[str, str] = {}
    if val_images is not None:
        wanted = set(val_images)
        train, _, test = fractions
        if train + test <= 0:
            raise ValueError("with val_images, the train and test fractions cannot both be 0")
        rest = (train / (train + test), 0.0, test / (train + test))
        for image in images:
            chosen[image] = "val" if image in wanted else hash_split(image, rest, seed)
        report["val_list"] = sum(1 for image in images if image in wanted)
        report["hashed"] = len(images) - report["val_list"]
        report["val_images_not_found"] = len(wanted) - report["val_list"]
    else:
        source, report["conflicts"] = _source_splits(df)
        for image in images:
            chosen[image] = source.get(image) or hash_split(image, fractions, seed)
        report["source"] = sum(1 for image in images if image in source)
        report["hashed"] = len(images) - report["source"]
    if report["conflicts"]:
        log.warning("%d images have conflicting source splits; kept the first row's split", report["conflicts"])
    if report["val_images_not_found"]:
        log.warning("%d of the given val images are not in the caption table", report["val_images_not_found"])
    out = df.copy()
    out["split"] = pd.Series([chosen[image] for image in df["image"].tolist()], index=df.index, dtype="object")
    counts = {s: sum(1 for v in chosen.values() if v == s) for s in SPLITS}
    report.update({f"{s}_images": n for s, n in counts.items()})
    out.attrs["split_report"] = report
    log.info("splits by image: %s (%d from source, %d by hash, %d from the val list)", counts,
             report["source"], report["hashed"], report["val_list"])
    return out
