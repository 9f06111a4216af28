"""What a finished build says about itself: manifest.json, and one wids shard index per split.

Pure functions of the plan and the shards' stats (plus the time of writing), so the builder writes
them the same way into a local --out or into a staging folder it uploads to a store.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from itsim import __version__, config
from itsim.data.shards.remote import INDEX_SUFFIX, basename
from itsim.data.shards.writer import ShardTask
from itsim.io import atomic_write
from itsim.text import Vocab

SPLIT_ORDER = ("train", "val", "test")


def brace_pattern(names: list[str]) -> str | None:
    """`train-{000000..000012}.tar` for a split's shards (numbered from 0 without gaps, as planned): the
    URL form webdataset, open_clip and img2dataset tools take; one shard is its own name."""
    if len(names) <= 1:
        return names[0] if names else None
    prefix = names[0][: -len("000000.tar")]
    return f"{prefix}{{{0:06d}..{len(names) - 1:06d}}}.tar"


def wids_index(tasks: list[ShardTask], stats: list[dict]) -> dict:
    """One split's shard index in the format webdataset's `widsindex create` writes (wids_index.py:
    `__kind__` "wids-shard-index-v1", `wids_version` 1, `shardlist` of url/md5sum/nsamples/filesize), so
    `wids.ShardListDataset("OUT/train.wids.json")` gives indexed access. URLs are relative: wids resolves
    them against the index file's folder, so the folder can move."""
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1,
            "shardlist": [{"url": f"{t.name}.tar", "md5sum": s["md5"], "nsamples": s["images_ok"],
                           "filesize": s["bytes"]} for t, s in zip(tasks, stats)]}


def write_indexes(out: Path, tasks: list[ShardTask], stats: list[dict]) -> dict[str, str]:
    """`OUT/{split}.wids.json` for each split with shards (old ones of splits now empty are removed);
    returns split -> file name."""
    by_split: dict[str, tuple[list, list]] = {}
    for task, s in zip(tasks, stats):
        group = by_split.setdefault(task.split, ([], []))
        group[0].append(task)
        group[1].append(s)
    names = {}
    for split, (split_tasks, split_stats) in by_split.items():
        names[split] = f"{split_tasks[0].name.rsplit('-', 1)[0]}{INDEX_SUFFIX}"
        atomic_write(out / names[split], json.dumps(wids_index(split_tasks, split_stats), indent=1))
    for stale in set(p.name for p in out.glob(f"*{INDEX_SUFFIX}")) - set(names.values()):
        (out / stale).unlink()
    return names


def make_manifest(cfg: Any, report: Any, vocab: Vocab, tasks: list[ShardTask], stats: list[dict],
                  failures: list[dict], images_lost: int, split_report: dict, images_now: int,
                  seconds: float, indexes: dict[str, str]) -> dict:
    splits: dict[str, dict] = {}
    empty = {"images": 0, "captions": 0, "n_shards": 0, "shards": [], "samples_per_shard": [], "pattern": None,
             "index": None}
    for task, s in zip(tasks, stats):
        # `shards` lists file names (itsim.data.loader reads it); `n_shards` is its length; `images` is
        # the split's sample count (one sample per image), `samples_per_shard` the same per shard.
        entry = splits.setdefault(task.split, json.loads(json.dumps(empty)))
        entry["images"] += s["images_ok"]
        entry["captions"] += s["captions"]
        entry["n_shards"] += 1
        entry["shards"].append(f"{task.name}.tar")
        entry["samples_per_shard"].append(s["images_ok"])
    for split, entry in splits.items():
        entry["pattern"], entry["index"] = brace_pattern(entry["shards"]), indexes.get(split)
    for split in SPLIT_ORDER:
        splits.setdefault(split, json.loads(json.dumps(empty)))
    by_reason: dict[str, dict[str, int]] = {}
    for f in failures:
        entry = by_reason.setdefault(f["reason"], {"records": 0, "caption_rows": 0})
        entry["records"] += 1
        entry["caption_rows"] += f["caption_rows"]
    rows_failed = sum(f["caption_rows"] for f in failures)
    rows_in_shards = sum(s["captions"] for s in stats)
    return {
        "itsim_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"captions": cfg.captions, "file": basename(cfg.captions), "format": report.format,
                   "images": cfg.images},
        "config": config.to_dict(cfg),
        "splits": {k: splits[k] for k in [*SPLIT_ORDER, *sorted(set(splits) - set(SPLIT_ORDER))]},
        "split_report": split_report,
        "vocab": {"file": "vocab.json", "hash": vocab.hash, "size": len(vocab), "source": cfg.vocab or "train split"},
        "reader": report.to_dict(),
        "failures": {"file": "failures.jsonl", "records": len(failures), "caption_rows": rows_failed,
                     "images": images_lost + sum(s["images_planned"] - s["images_ok"] for s in stats),
                     "by_reason": dict(sorted(by_reason.items()))},
        "rows": {"input": report.rows_in, "in_shards": rows_in_shards, "in_failures": rows_failed,
                 "accounted": rows_in_shards + rows_failed},
        "failure_rate": rows_failed / max(report.rows_in, 1),
        "images_written_now": images_now, "seconds": round(seconds, 2),
        "images_per_second": round(images_now / seconds, 1) if seconds > 0 and images_now else None,
    }
