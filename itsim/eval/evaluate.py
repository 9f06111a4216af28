"""`itsim eval`: pair metrics, retrieval and labelled pair files for a trained model.

Every image and caption of the split is encoded once; everything else runs only the fusion head:
- fixed balanced pairs (seeded, independent of the model, the same protocol as training's val
  metrics) -> ROC-AUC, PR-AUC, accuracy at 0.5 and at a threshold chosen on the val split;
- every image x every caption -> retrieval Recall@K and ranks;
- an optional labelled pair file (`image<TAB>caption<TAB>match|no-match`) -> classification metrics
  at the val threshold and at 0.5, with unloadable rows counted by reason.
Results go to `EVAL_DIR/metrics.json` (flat keys) with ROC, score-histogram and training-curve PNGs, and
`EVAL_DIR/report.html` shows them beside example retrievals and the worst mistakes (see `report.py`).

`--model`, `--shards`, `--out`, `--pairs` and `--images` may be store URLs (`s3://bucket/run/model`): the
model is read through `itsim.storage` (`load_model`), shards are streamed by the loader (`data/source.py`),
a pair file is downloaded, images are read one by one,
and a URL `--out` is written into a local staging folder, then uploaded with metrics.json last, so a
reader that finds metrics.json finds the report and plots beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image

from itsim import config, storage
from itsim.data.loader import iter_split, load_vocab, read_manifest, split_shards
from itsim.data.pairs import fixed_balanced_pairs
from itsim.errors import UserError
from itsim.eval import metrics, plots
from itsim.images import resize, to_array
from itsim.eval.pairfile import evaluate_pair_file, score_pairs, sigmoid
from itsim.eval.report import PairScores, make_thumbnail, write_report
from itsim.eval.staging import fetch, output_folder, parent
from itsim.model import encode_captions, encode_images, load_model, resolve_device, score_all_pairs
from itsim.progress import track
from itsim.text import Vocab

log = logging.getLogger(__name__)



@dataclasses.dataclass
class EvalConfig:
    model: str = dataclasses.field(default="", metadata={"help": "model directory or URL (RUN/model)"})
    shards: str = dataclasses.field(default="", metadata={"help": "shard folder or URL with manifest.json"})
    split: str = dataclasses.field(default="test", metadata={"help": "split to evaluate (val or test)"})
    val_split: str = dataclasses.field(default="val", metadata={"help": "split the best threshold is chosen on"})
    pairs: str | None = dataclasses.field(
        default=None, metadata={"help": "labelled pair file image<TAB>caption<TAB>match|no-match (path or URL)"})
    images: str | None = dataclasses.field(default=None, metadata={"help": "image folder or URL for --pairs"})
    out: str | None = dataclasses.field(
        default=None, metadata={"help": "output folder or URL; default: <model dir parent>/eval"})
    batch_size: int = dataclasses.field(default=256, metadata={"help": "images or captions per encoder call"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the fixed balanced pairs"})
    retrieval_images: int = dataclasses.field(
        default=1000, metadata={"help": "retrieval over the first N images of the split, in shard order (0 = all)"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    rank_by: str = dataclasses.field(default="head", metadata={
        "help": "retrieval ranks by the head's logits (head) or by the contrastive similarities (itc; models "
                "trained with --contrastive-dim)"})
    rerank: int = dataclasses.field(default=0, metadata={
        "help": "with --rank-by itc: re-rank each query's top K candidates by the head (0 = off)"})
    plots: bool = dataclasses.field(default=True, metadata={"help": "write PNG plots"})
    report: bool = dataclasses.field(
        default=True, metadata={"help": "write report.html (metrics, plots, example retrievals, worst mistakes)"})
    storage_options: dict | None = config.secret_field(
        None, help="JSON object of extra store settings, e.g. {\"endpoint_url\": \"http://host:9000\"} (added to "
                   "$ITSIM_STORAGE_OPTIONS; credentials come from the store's usual sources); never printed or saved")


@dataclasses.dataclass
class EncodedSplit:
    """One split reduced to vectors: images in shard order, captions grouped by image in that order."""

    split: str
    keys: list[str]
    image_vecs: torch.Tensor  # [n_images, D_img], on the evaluation device
    caption_vecs: torch.Tensor  # [n_captions, D_txt]
    caption_to_image: np.ndarray  # [n_captions] int64
    skipped: dict[str, int]
    encode_image_seconds: float
    encode_text_seconds: float
    captions: list[str] = dataclasses.field(default_factory=list)  # text of each caption vector
    thumbnails: list[bytes] = dataclasses.field(default_factory=list)  # JPEGs of the first images, for the report


# --- reading shards ---------------------------------------------------------------------------

def shard_paths(shards_dir: str | Path, split: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """The split's tar files or URLs (see `loader.split_shards`), with a clear error when the split is empty."""
    paths = split_shards(shards_dir, split, options)
    if not paths:
        splits = read_manifest(shards_dir, options).get("splits") or {}
        available = sorted(k for k, v in splits.items() if (v or {}).get("shards"))
        raise UserError(f"{shards_dir}: split {split!r} has no shards; "
                        f"splits with shards: {', '.join(available) or 'none'}")
    return paths


def _fit_image(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    return to_array(resize(Image.fromarray(image), size, mode))


# Thumbnails kept for the report: a few kB each, so even a large retrieval set costs little memory.
MAX_THUMBNAILS = 5000


def _caption_texts(sample: dict[str, Any], vocab: Vocab, ids: np.ndarray, lengths: np.ndarray) -> list[str]:
    """The sample's caption strings (for the report); decoded ids if the metadata lost count of them."""
    texts = sample["meta"].get("captions")
    if isinstance(texts, list) and len(texts) == ids.shape[0] and all(isinstance(t, str) for t in texts):
        return texts
    return [vocab.decode(row[:n]) for row, n in zip(ids, lengths)]


def _caption_arrays(sample: dict[str, Any], vocab: Vocab, shard_vocab_ok: bool,
                    max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The sample's token ids for this model: stored ids when the vocab matches, else re-encoded text."""
    if shard_vocab_ok:
        ids, lengths = sample["ids"], sample["lengths"]
        out = np.zeros((ids.shape[0], max_len), dtype=np.int64)
        width = min(max_len, ids.shape[1])
        out[:, :width] = ids[:, :width]
        return out, np.clip(lengths, 1, max_len).astype(np.int64)
    ids, lengths = vocab.encode(list(sample["meta"].get("captions", [])), max_len)
    return ids.astype(np.int64), lengths.astype(np.int64)


@torch.inference_mode()
def encode_split(model: Any, vocab: Vocab, pre: Any, shards_dir: str | Path, split: str, batch_size: int,
                 device: torch.device, thumbnails: int = 0, options: Mapping[str, Any] | None = None) -> EncodedSplit:
    """Stream a split, encoding images in batches, then its captions; keep JPEG thumbnails of the
    first `thumbnails` images as they pass (the report shows them; nothing is read twice).

    Images keep shard order (the manifest's order, which the shard build makes deterministic), the
    order training's validation reads them in, so the fixed pairs of `itsim eval --split val`
    are the ones behind training's `val_accuracy`.
    """
    shard_paths(shards_dir, split, options)  # a clear error for an empty or unknown split
    shard_vocab_ok = _shard_vocab_hash(shards_dir, options) == vocab.hash
    if not shard_vocab_ok:
        log.warning("shard vocab differs from the model's: re-encoding captions with the model's vocab")
    skipped: dict[str, int] = {}
    keys: list[str] = []
    captions: list[tuple[np.ndarray, np.ndarray]] = []
    texts: list[str] = []
    thumbs: list[bytes] = []
    vec_chunks: list[torch.Tensor] = []
    pending: list[np.ndarray] = []
    image_seconds = 0.0

    def flush() -> None:
        nonlocal image_seconds
        start = time.perf_counter()
        vec_chunks.append(encode_images(model, np.stack(pending), device, batch_size))
        image_seconds += time.perf_counter() - start
        pending.clear()

    for sample in track(iter_split(shards_dir, split, skipped, options=options), f"encode {split} images", "img", logger=log,
                        leave=False):
        ids, lengths = _caption_arrays(sample, vocab, shard_vocab_ok, pre.max_len)
        if ids.shape[0] == 0:
            skipped["no_captions"] = skipped.get("no_captions", 0) + 1
            continue
        keys.append(sample["key"])
        captions.append((ids, lengths))
        texts.extend(_caption_texts(sample, vocab, ids, lengths))
        if len(thumbs) < thumbnails:
            thumbs.append(make_thumbnail(sample["image"]))
        pending.append(_fit_image(sample["image"], pre.image_size, pre.resize))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    if len(keys) < 2:
        raise UserError(f"split {split!r} has {len(keys)} readable images; at least 2 are needed (skipped: {skipped})")
    start = time.perf_counter()
    caption_vecs = encode_captions(model, np.concatenate([c[0] for c in captions]),
                                   np.concatenate([c[1] for c in captions]), device, batch_size)
    text_seconds = time.perf_counter() - start
    caption_to_image = np.repeat(np.arange(len(keys)), [c[0].shape[0] for c in captions])
    if skipped:
        log.warning("split %s: skipped samples %s", split, skipped)
    return EncodedSplit(split, keys, torch.cat(vec_chunks), caption_vecs, caption_to_image, skipped,
                        image_seconds, text_seconds, texts, thumbs)


def _shard_vocab_hash(shards_dir: str | Path, options: Mapping[str, Any] | None) -> str | None:
    """The hash of the shards' vocab.json (a folder or a store URL); None when there is none."""
    try:
        return load_vocab(shards_dir, options).hash
    except (FileNotFoundError, storage.NotFound):
        return None


# --- scoring with the head only ---------------------------------------------------------------

def fixed_pair_scores(model: Any, enc: EncodedSplit, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) of the split's fixed balanced pairs (see data.pairs.fixed_balanced_pairs)."""
    image_idx, caption_idx, labels = fixed_balanced_pairs(enc.caption_to_image, seed)
    return sigmoid(score_pairs(model, enc.image_vecs, enc.caption_vecs, image_idx, caption_idx)), labels


# --- the job ----------------------------------------------------------------------------------

def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _threshold(cfg: EvalConfig, model: Any, vocab: Vocab, pre: Any, device: torch.device,
               probs: np.ndarray, labels: np.ndarray) -> tuple[float, str]:
    """Best-accuracy threshold on the val split's fixed pairs, and where it came from."""
    if cfg.split == cfg.val_split:
        return metrics.best_threshold(probs, labels)[0], f"{cfg.val_split} (the evaluated split itself: optimistic)"
    try:
        shard_paths(cfg.shards, cfg.val_split, cfg.storage_options)
    except UserError as exc:
        log.warning("no threshold from %s (%s); using 0.5", cfg.val_split, exc)
        return 0.5, f"default 0.5 (no usable {cfg.val_split} split)"
    val = encode_split(model, vocab, pre, cfg.shards, cfg.val_split, cfg.batch_size, device,
                       options=cfg.storage_options)
    return metrics.best_threshold(*fixed_pair_scores(model, val, cfg.seed))[0], cfg.val_split


@torch.inference_mode()
def _itc_retrieval(model: Any, image_vecs: torch.Tensor, caption_vecs: torch.Tensor, caption_to_image: np.ndarray,
                   rerank: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Retrieval ranked by the contrastive similarities; with `rerank` K, each image's top K captions
    (and each caption's top K images) are re-ordered by the head's logits and stay ahead of the rest."""
    sim = model.similarity(image_vecs, caption_vecs).float()
    if rerank <= 0:
        return metrics.retrieval_metrics(sim.cpu(), caption_to_image), sim.cpu()
    matrices = []
    for dim in (1, 0):  # 1: image -> text, 0: text -> image
        k = min(rerank, sim.shape[dim])
        top = sim.topk(k, dim=dim).indices
        if dim == 1:
            img, cap = torch.arange(sim.shape[0], device=sim.device).repeat_interleave(k), top.reshape(-1)
        else:
            img, cap = top.t().reshape(-1), torch.arange(sim.shape[1], device=sim.device).repeat_interleave(k)
        head = torch.as_tensor(score_pairs(model, image_vecs, caption_vecs, img.cpu().numpy(), cap.cpu().numpy()),
                               dtype=torch.float32, device=sim.device)
        # every candidate outside the top K moves below the lowest head logit, keeping its order (a small
        # shift: the ranks are counted in float32, where 1e4 + a logit would lose the logit's digits)
        ranked = sim - (sim.max() - head.min() + 1)
        ranked[img, cap] = head
        matrices.append(ranked.cpu())
    i2t = metrics.retrieval_metrics(matrices[0], caption_to_image)
    t2i = metrics.retrieval_metrics(matrices[1], caption_to_image)
    return {**{k: v for k, v in i2t.items() if k.startswith("i2t")},
            **{k: v for k, v in t2i.items() if k.startswith("t2i")}}, matrices[0]


def _retrieval(model: Any, enc: EncodedSplit, max_images: int, rank_by: str = "head",
               rerank: int = 0) -> tuple[dict[str, Any], torch.Tensor]:
    """Retrieval over the first `max_images` images and their captions (a prefix: captions are grouped);
    the metrics and the logit matrix [n_img, n_cap] on the CPU."""
    n_img = len(enc.keys) if max_images <= 0 else min(max_images, len(enc.keys))
    n_cap = int(np.sum(enc.caption_to_image < n_img))
    start = time.perf_counter()
    if rank_by == "itc":
        result, matrix = _itc_retrieval(model, enc.image_vecs[:n_img], enc.caption_vecs[:n_cap],
                                        enc.caption_to_image[:n_cap], rerank)
        return {**result, "retrieval_images": n_img, "retrieval_captions": n_cap, "retrieval_rank_by": "itc",
                "retrieval_rerank": rerank, "retrieval_seconds": round(time.perf_counter() - start, 4)}, matrix
    matrix = score_all_pairs(model, enc.image_vecs[:n_img], enc.caption_vecs[:n_cap])
    if matrix.is_cuda:
        torch.cuda.synchronize()
    head_seconds = time.perf_counter() - start
    result: dict[str, Any] = metrics.retrieval_metrics(matrix.cpu(), enc.caption_to_image[:n_cap])
    return {**result, "retrieval_images": n_img, "retrieval_captions": n_cap,
            "retrieval_seconds": round(time.perf_counter() - start, 4),
            "retrieval_head_seconds": round(head_seconds, 4)}, matrix.cpu()


def _write_report(out: Path, result: dict[str, Any], enc: EncodedSplit, matrix: torch.Tensor, probs: np.ndarray,
                  labels: np.ndarray, seed: int, plot_files: list[Path]) -> Path:
    """report.html from what the evaluation already holds: no image or caption is encoded again."""
    image_idx, caption_idx, _ = fixed_balanced_pairs(enc.caption_to_image, seed)  # the pairs behind `probs`
    return write_report(out / "report.html", result, torch.sigmoid(matrix.float()).numpy(), enc.caption_to_image,
                        enc.captions, enc.thumbnails, image_names=enc.keys, plots=plot_files,
                        pairs=PairScores(image_idx, caption_idx, labels, probs),
                        title=f"itsim eval: {enc.split} split")


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation described by `cfg`, write EVAL_DIR/metrics.json and plots; return the metrics."""
    config.check(cfg, ("model", "shards"), [(bool(cfg.pairs) == bool(cfg.images), "--pairs and --images go together"),
                                            (cfg.rank_by in ("head", "itc"), "--rank-by is head or itc")])
    model_dir = storage.location(cfg.model)
    out = storage.location(cfg.out) if cfg.out else storage.join(parent(model_dir), "eval")
    log.info(config.describe(cfg))
    with output_folder(out, cfg.storage_options) as folder, \
            tempfile.TemporaryDirectory(prefix="itsim-eval-inputs-") as inputs:
        result = _evaluate_into(cfg, folder, model_dir, inputs)
    return {**result, "out": storage.scrub(out)}


def _evaluate_into(cfg: EvalConfig, out: Path, model_dir: str, inputs: str) -> dict[str, Any]:
    """The evaluation, its outputs written into the local folder `out`; stored inputs copied to `inputs`."""
    opts = cfg.storage_options
    pairs = fetch(storage.location(cfg.pairs), inputs, opts) if cfg.pairs else None  # a missing file: before any work
    config.save(cfg, out / "eval_config.yaml")
    device = resolve_device(cfg.device)
    model, vocab, pre = load_model(model_dir, device, opts)
    model.eval()
    if cfg.rank_by == "itc" and getattr(model.cfg, "contrastive_dim", 0) <= 0:
        raise UserError("--rank-by itc needs a model trained with --contrastive-dim")

    keep = min(cfg.retrieval_images if cfg.retrieval_images > 0 else MAX_THUMBNAILS, MAX_THUMBNAILS)
    enc = encode_split(model, vocab, pre, cfg.shards, cfg.split, cfg.batch_size, device,
                       thumbnails=keep if cfg.report else 0, options=opts)
    retrieval, matrix = _retrieval(model, enc, cfg.retrieval_images, cfg.rank_by, cfg.rerank)
    probs, labels = fixed_pair_scores(model, enc, cfg.seed)
    threshold, source = _threshold(cfg, model, vocab, pre, device, probs, labels)
    at_half = metrics.classification_report(probs, labels, 0.5)
    result: dict[str, Any] = {
        "model": storage.scrub(model_dir), "shards": storage.scrub(storage.location(cfg.shards)), "split": cfg.split,
        "seed": cfg.seed, "n_images": len(enc.keys), "n_captions": int(enc.caption_to_image.size),
        "n_pairs": int(labels.size), "positive_pairs": int(labels.sum()),
        "skipped_samples": int(sum(enc.skipped.values())), "skipped_reasons": enc.skipped,
        "balanced_accuracy": at_half["balanced_accuracy"], "accuracy_at_0_5": at_half["accuracy"],
        "f1_at_0_5": at_half["f1"], "best_threshold": threshold, "threshold_source": source,
        "accuracy_at_best": metrics.accuracy(probs, labels, threshold),
        "balanced_accuracy_at_best": metrics.balanced_accuracy(probs, labels, threshold),
        "roc_auc": metrics.roc_auc(probs, labels), "pr_auc": metrics.pr_auc(probs, labels),
        **retrieval,
        "encode_image_seconds": round(enc.encode_image_seconds, 3),
        "encode_text_seconds": round(enc.encode_text_seconds, 3),
    }
    if pairs:
        pair_result, _, _ = evaluate_pair_file(model, vocab, pre, pairs, storage.location(cfg.images), threshold,
                                               cfg.batch_size, device, opts)
        result.update(pair_result)
    plot_files: list[Path] = []
    if cfg.plots:
        curves = fetch(storage.join(parent(model_dir), "metrics.jsonl"), inputs, opts, optional=True)
        written = [plots.plot_roc(probs, labels, out / "roc.png"),
                   plots.plot_score_hist(probs, labels, out / "score_hist.png", threshold),
                   plots.plot_training_curves(curves, out / "training_curves.png")]
        plot_files = [p for p in written if p is not None]
        result["plots"] = [p.name for p in plot_files]
    result = _json_safe(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    log.info("wrote %s", out / "metrics.json")
    if cfg.report:
        log.info("wrote %s", _write_report(out, result, enc, matrix, probs, labels, cfg.seed, plot_files))
    return result


SUMMARY_KEYS = ("n_images", "n_captions", "balanced_accuracy", "accuracy_at_best", "best_threshold", "roc_auc",
                "pr_auc", "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr",
                "retrieval_seconds", "pairs_accuracy", "pairs_balanced_accuracy", "pairs_f1", "pairs_roc_auc",
                "pairs_scored", "pairs_skipped")


def summary_table(result: dict[str, Any]) -> str:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in result.items() if k in SUMMARY_KEYS]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


run = evaluate  # every stage's entry point is `run(cfg)`


def _main(args: argparse.Namespace) -> int:
    result = evaluate(config.from_args(EvalConfig, args))
    print(f"itsim eval: split {result['split']} ({result['threshold_source']} threshold) -> {result['out']}")
    print(summary_table(result))
    return 0


def add_cli(subparsers: Any) -> None:
    config.add_command(subparsers, "eval", EvalConfig, _main,
                       help="pair metrics, retrieval and labelled pair files for a model",
                       description=__doc__.splitlines()[0])
