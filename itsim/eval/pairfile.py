"""Labelled pair files in `itsim eval`, and the head-only scoring of chosen pairs that every eval metric uses.

A pair file (`image<TAB>caption<TAB>match|no-match`) names images under `--images`, a folder or a
store URL (`s3://bucket/images`): a folder's names resolve with `safe_path`, a URL's with
`images.image_url` (neither lets a name leave the root), and a stored image is read through
`itsim.storage`; an image that cannot be used costs its rows, counted by reason.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from itsim import storage
from itsim.data.captions import read_pairs
from itsim.eval import metrics
from itsim.images import ImageError, image_url, load_image, read_url, safe_path, to_array
from itsim.model import encode_captions, encode_images
from itsim.progress import track
from itsim.text import Vocab

log = logging.getLogger(__name__)


@torch.inference_mode()
def score_pairs(model: Any, image_vecs: torch.Tensor, caption_vecs: torch.Tensor, image_idx: np.ndarray,
                caption_idx: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """Logits of chosen (image, caption) pairs, as float64 numpy."""
    out = []
    for lo in range(0, len(image_idx), batch_size):
        img = image_vecs[torch.tensor(image_idx[lo:lo + batch_size], device=image_vecs.device)]
        cap = caption_vecs[torch.tensor(caption_idx[lo:lo + batch_size], device=caption_vecs.device)]
        out.append(model.head(img, cap).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -500, 500)))


def _load(images_dir: str | Path, name: str, pre: Any, options: Mapping[str, Any] | None) -> np.ndarray:
    """One pair-file image as the model's uint8 input, from a folder or a store URL."""
    root = str(images_dir)
    if storage.is_remote(root):
        source: Any = read_url(image_url(root, name), options)
    else:
        source = safe_path(storage.resolve(root).path, name)
    return to_array(load_image(source, pre.image_size, pre.resize))


@torch.inference_mode()
def evaluate_pair_file(model: Any, vocab: Vocab, pre: Any, pairs_path: str | Path, images_dir: str | Path,
                       threshold: float, batch_size: int, device: torch.device,
                       options: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Metrics of a labelled pair file (a local file) at `threshold` and at 0.5; unusable rows counted
    by reason. `images_dir` may be a store URL (`options`: storage options)."""
    df, report = read_pairs(pairs_path)
    reasons = {f"parse_{k}": v for k, v in report.skipped.items()}
    rows_per_image = df["image"].value_counts()
    loaded: list[str] = []
    vecs: list[torch.Tensor] = []
    pending: list[np.ndarray] = []
    names = sorted(rows_per_image.index)
    for i, name in enumerate(track(names, "encode pair images", "img", logger=log, leave=False)):
        try:
            pending.append(_load(images_dir, name, pre, options))
            loaded.append(name)
        except ImageError as exc:
            reasons[f"image_{exc.reason}"] = reasons.get(f"image_{exc.reason}", 0) + int(rows_per_image[name])
        if pending and (len(pending) >= batch_size or i == len(names) - 1):
            vecs.append(encode_images(model, np.stack(pending), device, batch_size))
            pending.clear()
    usable = df[df["image"].isin(set(loaded))]
    ids, lengths = vocab.encode(usable["caption"].tolist(), pre.max_len)
    labels = usable["label"].to_numpy()
    if len(usable):
        position = {n: i for i, n in enumerate(loaded)}
        image_idx = usable["image"].map(position).to_numpy()
        text = encode_captions(model, ids, lengths, device, batch_size)
        probs = sigmoid(score_pairs(model, torch.cat(vecs), text, image_idx, np.arange(len(usable))))
    else:
        probs = np.zeros(0)
    result: dict[str, Any] = {"pairs_rows": report.rows_in, "pairs_scored": int(len(usable)),
                              "pairs_skipped": int(sum(reasons.values())), "pairs_skipped_reasons": reasons,
                              "pairs_threshold": float(threshold), "pairs_roc_auc": metrics.roc_auc(probs, labels),
                              "pairs_pr_auc": metrics.pr_auc(probs, labels)}
    for suffix, t in (("", threshold), ("_at_0_5", 0.5)):
        rep = metrics.classification_report(probs, labels, t)
        for key in ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "tn", "fp", "fn", "tp",
                    "confusion_matrix"):
            result[f"pairs_{key}{suffix}"] = rep[key]
    if reasons:
        log.warning("%s: %d of %d rows not scored %s", pairs_path, result["pairs_skipped"], report.rows_in, reasons)
    return result, probs, labels
