"""`itsim score --mode topk`: every image's top-k captions and every caption's top-k images.

Encode once, then run only the head over all pairs (`score_all_pairs`): the caption vectors are
computed once by an actor pool and shared through the object store; the images go through the
usual read -> preprocess stages and reach a pool of actors in blocks. Each actor scores its block
against every caption and returns the block's top-k captions per image plus its best k images per
caption; the driver merges those partial lists (k per caption per block), so no actor and not the
driver ever holds the full score matrix. Ties rank the lower id first, so results are reproducible.

This is quadratic in the set sizes by nature: meant for evaluation sets (thousands of images), not
for millions. The results (small: k per image and per caption) are written by the driver, each file
whole (`output.write_table`), to a folder or a store URL.
"""
from __future__ import annotations

import io
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data.extensions import ArrowTensorArray

from itsim.errors import UserError
from itsim.model import Preprocess
from itsim.score.columns import JPG, PIXELS, READ_ERROR, ROW_ID, tensor_column
from itsim import storage
from itsim.score.config import ScoreConfig, images_root
from itsim.score.output import write_table
from itsim.score.read import ScoreInputs
from itsim.score.resources import Resources, actor_options, scorer_from_files
from itsim.score.scorer import caption_error, prepare_captions, prepare_images
from itsim.text import Vocab

log = logging.getLogger(__name__)

IID = "__iid"


def prepare_image_block(table: pa.Table, *, pre: Preprocess, images_root: str | None, base_dir: str,
                        max_pixels: int, source_col: str, options: Mapping[str, Any] | None = None) -> pa.Table:
    """CPU stage for topk: only images (the captions are encoded separately, once)."""
    errors = table.column(READ_ERROR).to_pylist() if READ_ERROR in table.column_names else None
    pixels, errors = prepare_images(table.column(source_col).to_pylist(), pre, images_root, max_pixels, errors,
                                    base_dir, options)
    out = table.select([IID, "image"])
    out = out.append_column(PIXELS, ArrowTensorArray.from_numpy(pixels))
    return out.append_column("error", pa.array(errors, pa.string()))


def best_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `scores` [n, m] (candidates `ids` [m] or [n, m]): the k best ids and scores, ties
    broken by the lower id."""
    ids = np.broadcast_to(ids, scores.shape)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


class TextActor:
    """Caption -> text vector, once per caption."""

    def __init__(self, model_ref: list[Any], threads: int, use_gpu: bool, batch_size: int):
        self.scorer = scorer_from_files(model_ref, threads, use_gpu, batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, lengths, _ = prepare_captions(list(batch["caption"]), self.scorer.pre, self.scorer.vocab)
        return {"cid": batch["cid"], "vec": self.scorer.encode_texts(ids, lengths).cpu().numpy()}


class TopKActor:
    """Scores a block of images against every caption; returns one row with the block's partial results."""

    def __init__(self, model_ref: list[Any], threads: int, use_gpu: bool, batch_size: int,
                 text_ref: list[Any], k: int):
        self.scorer = scorer_from_files(model_ref, threads, use_gpu, batch_size)
        self.text = torch.from_numpy(ray.get(text_ref[0])).to(self.scorer.device)
        self.k = k

    def __call__(self, table: pa.Table) -> pa.Table:
        errors = table.column("error").to_pylist()
        ok = np.array([e is None for e in errors], dtype=bool)
        iid = table.column(IID).to_numpy()
        names = np.array(table.column("image").to_pylist(), dtype=object)
        parts: dict[str, np.ndarray] = {
            "iid": iid[ok], "names": names[ok].astype(str),
            "failed_iid": iid[~ok], "failed_names": names[~ok].astype(str),
            "failed_reasons": np.array([e for e in errors if e is not None], dtype=str)}
        n_txt = len(self.text)
        if ok.any():
            probs = self.scorer.matrix_from_vectors(self.scorer.encode_images(tensor_column(table, PIXELS)[ok]),
                                                    self.text)
            parts["img_cap"], parts["img_score"] = best_k(probs, np.arange(n_txt), self.k)
            parts["cap_img"], parts["cap_score"] = best_k(probs.T, iid[ok], self.k)
        else:
            parts["img_cap"] = parts["cap_img"] = np.zeros((0, 0), np.int64)
            parts["img_score"] = parts["cap_score"] = np.zeros((0, 0), np.float32)
        buf = io.BytesIO()
        np.savez(buf, **parts)
        return pa.table({"payload": pa.array([buf.getvalue()], pa.binary())})


def _caption_set(cfg: ScoreConfig, res: Resources, files: list[Any], fmt: str,
                 columns: dict | None) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Sorted unique usable captions, and a record per unusable one. A caption is used even when its
    shard sample's image is broken; a row without a caption counts under its read error (a sample
    whose json is unreadable). Streams the caption column through the driver."""
    source = ScoreInputs(files, fmt, cfg.batch_size, columns, options=cfg.storage_options)
    col = "caption" if fmt == "shards" else cfg.caption_col
    ds = ray.data.read_datasource(source, override_num_blocks=max(1, len(source.read_plan())), num_cpus=res.read_cpus)
    good: set[str] = set()
    bad: set[tuple[str, str, str]] = set()
    for batch in ds.select_columns([col, READ_ERROR]).iter_batches(batch_size=None, batch_format="pyarrow"):
        for caption, read_error in zip(batch.column(col).to_pylist(), batch.column(READ_ERROR).to_pylist()):
            reason = caption_error(caption) if caption is not None else (read_error or caption_error(caption))
            if reason is None:
                good.add(caption)
            else:
                bad.add(("caption", repr(caption), reason))
    return sorted(good), sorted(bad)


def _image_dataset(cfg: ScoreConfig, res: Resources, files: list[Any], fmt: str, columns: dict | None,
                   pre: Preprocess) -> Any:
    if fmt == "shards":  # one row per shard sample; its row_id is its id
        source = ScoreInputs(files, fmt, cfg.batch_size, per_image=True, options=cfg.storage_options)
        ds = ray.data.read_datasource(source, override_num_blocks=max(1, len(source.read_plan())),
                                      num_cpus=res.read_cpus)
        ds = ds.rename_columns({ROW_ID: IID}).repartition(target_num_rows_per_block=cfg.batch_size)
        source_col = JPG
    else:  # unique names, sorted: the id is the place in that order
        source = ScoreInputs(files, fmt, cfg.batch_size, columns, options=cfg.storage_options)
        ds = ray.data.read_datasource(source, override_num_blocks=max(1, len(source.read_plan())),
                                      num_cpus=res.read_cpus)
        names = sorted(ds.select_columns([cfg.image_col]).unique(cfg.image_col), key=lambda v: (v is None, str(v)))
        items = [{IID: i, "image": name} for i, name in enumerate(names)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / cfg.batch_size)))
        source_col = "image"
    kwargs = {"pre": pre, "images_root": images_root(cfg), "base_dir": str(Path.cwd()), "max_pixels": cfg.max_pixels,
              "source_col": source_col, "options": storage.portable_options(cfg.storage_options)}
    return ds.map_batches(prepare_image_block, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=cfg.batch_size,
                          num_cpus=res.prep_cpus)


def run_topk(cfg: ScoreConfig, res: Resources, files: list[Any], fmt: str, columns: dict | None,
             pre: Preprocess, vocab: Vocab, model_ref: list[Any], out: str | Path) -> dict[str, Any]:
    k = cfg.k
    actor_kwargs = {"model_ref": model_ref, "threads": res.threads, "use_gpu": res.gpus_per_worker > 0,
                    "batch_size": cfg.batch_size}
    captions, failed = _caption_set(cfg, res, files, fmt, columns)
    errors = Counter(f"caption/{reason}" for _, _, reason in failed)
    if not captions:
        raise UserError("no usable captions in the input")
    cap_ds = ray.data.from_items([{"cid": i, "caption": c} for i, c in enumerate(captions)],
                                 override_num_blocks=max(1, math.ceil(len(captions) / cfg.batch_size)))
    vecs = None
    for batch in cap_ds.map_batches(TextActor, fn_constructor_kwargs=actor_kwargs, batch_size=cfg.batch_size,
                                    **actor_options(res)).iter_batches(batch_size=None, batch_format="numpy"):
        if vecs is None:
            vecs = np.zeros((len(captions), batch["vec"].shape[1]), dtype=np.float32)
        vecs[batch["cid"]] = batch["vec"]
    text_ref = ray.put(vecs)

    n_txt = len(captions)
    cap_img = np.full((n_txt, 0), np.iinfo(np.int64).max, dtype=np.int64)
    cap_score = np.zeros((n_txt, 0), dtype=np.float32)
    names: dict[int, str] = {}
    image_rows: list[tuple[str, int, int, float]] = []
    images_ds = _image_dataset(cfg, res, files, fmt, columns, pre).map_batches(
        TopKActor, fn_constructor_kwargs={**actor_kwargs, "text_ref": [text_ref], "k": k}, batch_format="pyarrow",
        batch_size=cfg.batch_size, **actor_options(res))
    for batch in images_ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for payload in batch.column("payload").to_pylist():
            p = np.load(io.BytesIO(payload))
            for reason, name in zip(p["failed_reasons"], p["failed_names"]):
                errors[f"image/{reason}"] += 1
                failed.append(("image", str(name), str(reason)))
            if not len(p["iid"]):
                continue
            names.update(zip(p["iid"].tolist(), p["names"].tolist()))
            for name, caps, scores in zip(p["names"].tolist(), p["img_cap"], p["img_score"]):
                image_rows += [(name, r + 1, int(c), float(s)) for r, (c, s) in enumerate(zip(caps, scores))]
            cap_img, cap_score = best_k(np.concatenate([cap_score, p["cap_score"]], 1),
                                        np.concatenate([cap_img, p["cap_img"]], 1), k)

    image_rows.sort(key=lambda r: (r[0], r[1]))
    opts = cfg.storage_options
    write_table(out, "image_topk/part-00000.parquet", pa.table({
        "image": pa.array([r[0] for r in image_rows], pa.string()),
        "rank": pa.array([r[1] for r in image_rows], pa.int32()),
        "caption": pa.array([captions[r[2]] for r in image_rows], pa.string()),
        "score": pa.array([r[3] for r in image_rows], pa.float32())}), opts)
    rank = np.broadcast_to(np.arange(1, cap_img.shape[1] + 1), cap_img.shape)
    cap_idx = np.broadcast_to(np.arange(n_txt)[:, None], cap_img.shape)
    write_table(out, "caption_topk/part-00000.parquet", pa.table({
        "caption": pa.array([captions[i] for i in cap_idx.ravel()], pa.string()),
        "rank": pa.array(rank.ravel(), pa.int32()),
        "image": pa.array([names[int(i)] for i in cap_img.ravel()], pa.string()),
        "score": pa.array(cap_score.ravel(), pa.float32())}), opts)
    if failed:
        write_table(out, "topk_errors.parquet", pa.table({"kind": [f[0] for f in failed],
                                                         "item": [f[1] for f in failed],
                                                         "reason": [f[2] for f in failed]}), opts)
    return {"k": k, "images": len(names), "captions": n_txt, "pairs": len(names) * n_txt,
            "rows": len(names), "scored": len(names), "errors": dict(sorted(errors.items()))}
