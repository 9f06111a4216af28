"""Evaluation metrics as pure, vectorised functions of scores and labels.

Kept free of models and files so every number in `metrics.json` can be checked by hand on a tiny
input (tests/eval/test_metrics.py does exactly that). Inputs may be numpy arrays, torch tensors or lists.

Conventions, chosen once and used everywhere:
- A pair is predicted positive when `score >= threshold`.
- Undefined ratios (precision with no predicted positives, recall with no positives, ...) are 0.
- ROC-AUC with a single class present and PR-AUC without positives are NaN: there is nothing to rank
  (scikit-learn returns 0 for the latter); PR-AUC with only positives is 1.
- Retrieval ranks are 1-based and count ties pessimistically (a tie with a wrong item ranks the
  true item below it), so a model that gives every pair the same score cannot look perfect.
- Recall@K values are fractions in [0, 1], not percentages.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _np(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """Torch tensor, list or array -> 1-D-or-more numpy array (no copy when already numpy)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _np(scores).ravel()
    y = _np(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.shape[0]}) and labels ({y.shape[0]}) differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return s, y.astype(bool)


def average_ranks(values: Any) -> np.ndarray:
    """1-based ranks, ascending, tied values sharing the mean of their ranks."""
    v = _np(values).ravel()
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last member of each tie group
    mean_rank = ends - (counts - 1) / 2.0
    return mean_rank[inverse.ravel()]


def roc_auc(scores: Any, labels: Any) -> float:
    """Probability that a random positive outscores a random negative, ties counting one half.

    Computed from ranks (Mann-Whitney U), so it is exact and O(n log n).
    """
    s, y = _scores_labels(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = average_ranks(s)[y].sum()
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _descending_thresholds(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct scores high->low, true positives, false positives) when predicting `score >= t`."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last_of_group]
    fps = (last_of_group + 1) - tps
    return s_sorted[last_of_group], tps, fps


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), starting at (0, 0) with threshold +inf."""
    s, y = _scores_labels(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if s.size == 0:
        return np.zeros(1), np.zeros(1), np.array([np.inf])
    thresholds, tps, fps = _descending_thresholds(s, y)
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.zeros(tps.size + 1)
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.zeros(fps.size + 1)
    return fpr, tpr, np.r_[np.inf, thresholds]


def pr_auc(scores: Any, labels: Any) -> float:
    """Average precision as scikit-learn defines it: sum over thresholds of (R_n - R_{n-1}) * P_n.

    This is the step-wise area (no interpolation), the same as `average_precision_score`.
    """
    s, y = _scores_labels(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return float("nan") if n_pos == 0 else 1.0
    _, tps, fps = _descending_thresholds(s, y)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def confusion(scores: Any, labels: Any, threshold: float) -> tuple[int, int, int, int]:
    """(tn, fp, fn, tp) when predicting positive for `score >= threshold`."""
    s, y = _scores_labels(scores, labels)
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    return tn, fp, fn, tp


def _div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def accuracy(scores: Any, labels: Any, threshold: float = 0.5) -> float:
    tn, fp, fn, tp = confusion(scores, labels, threshold)
    return _div(tp + tn, tn + fp + fn + tp)


def _balanced(tn: int, fp: int, fn: int, tp: int) -> float:
    """Mean recall over the classes present (scikit-learn's rule when a class is absent)."""
    recalls = [tp / (tp + fn)] if tp + fn else []
    recalls += [tn / (tn + fp)] if tn + fp else []
    return float(np.mean(recalls)) if recalls else 0.0


def balanced_accuracy(scores: Any, labels: Any, threshold: float = 0.5) -> float:
    return _balanced(*confusion(scores, labels, threshold))


def classification_report(scores: Any, labels: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Accuracy, balanced accuracy, precision, recall, F1 and the confusion counts at `threshold`."""
    tn, fp, fn, tp = confusion(scores, labels, threshold)
    precision = _div(tp, tp + fp)
    recall = _div(tp, tp + fn)
    return {
        "threshold": float(threshold),
        "accuracy": _div(tp + tn, tn + fp + fn + tp),
        "balanced_accuracy": _balanced(tn, fp, fn, tp),
        "precision": precision,
        "recall": recall,
        "f1": _div(2 * precision * recall, precision + recall),
        "tn": tn, "fp": fp, "fn": fn, "tp": tp,
        "confusion_matrix": [[tn, fp], [fn, tp]],  # rows: true 0/1, columns: predicted 0/1
    }


def best_threshold(scores: Any, labels: Any, balanced: bool = False) -> tuple[float, float]:
    """Threshold that maximises accuracy (or balanced accuracy), and that best value.

    Every distinct score is tried as a cut, plus "everything negative". The returned threshold is
    the midpoint between the chosen score and the next lower distinct score, so it generalises to
    new scores instead of sitting exactly on one val example. Ties go to the highest threshold.
    """
    s, y = _scores_labels(scores, labels)
    if s.size == 0:
        return 0.5, 0.0
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    cuts, tps, fps = _descending_thresholds(s, y)
    # Candidate 0 predicts everything negative; candidate k >= 1 predicts `score >= cuts[k-1]`.
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    tns = n_neg - fps
    if balanced:
        tpr = tps / n_pos if n_pos else np.zeros_like(tps, dtype=float)
        tnr = tns / n_neg if n_neg else np.zeros_like(tns, dtype=float)
        value = (tpr + tnr) / (2.0 if n_pos and n_neg else 1.0)
    else:
        value = (tps + tns) / s.size
    k = int(np.argmax(value))
    if k == 0:
        threshold = float(np.nextafter(cuts[0], np.inf))
    elif k < cuts.size:
        threshold = float((cuts[k - 1] + cuts[k]) / 2.0)
        if not cuts[k] < threshold <= cuts[k - 1]:  # midpoint rounded onto a neighbour
            threshold = float(cuts[k - 1])
    else:
        threshold = float(cuts[-1])
    return threshold, float(value[k])


def retrieval_ranks(score_matrix: Any, caption_to_image: Any, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks: per image (best true caption among all captions), per caption (its image).

    Ties are pessimistic: an image's rank is 1 + the number of wrong captions scoring at least as
    high as its best true caption; a caption's rank is 1 + the number of wrong images scoring at
    least as high as its own image. Images without any caption get rank 0 (callers drop them).
    Processed in row chunks so a large matrix never needs several full-size temporaries.
    """
    scores = _np(score_matrix, np.float32)
    c2i = _np(caption_to_image, np.int64).ravel()
    n_images, n_captions = scores.shape
    if c2i.size != n_captions:
        raise ValueError(f"caption_to_image has {c2i.size} entries for {n_captions} captions")
    if n_captions and (c2i.min() < 0 or c2i.max() >= n_images):
        raise ValueError("caption_to_image holds an image index outside the score matrix")
    cols = np.arange(n_captions)
    own = scores[c2i, cols]  # each caption's score with its own image
    t2i_ranks = np.ones(n_captions, dtype=np.int64)
    i2t_ranks = np.zeros(n_images, dtype=np.int64)
    for start in range(0, n_images, chunk):
        block = scores[start:start + chunk]
        rows = np.arange(start, start + block.shape[0])
        true = c2i[None, :] == rows[:, None]
        # text -> image: wrong images in this chunk that score >= the caption's own image.
        t2i_ranks += ((block >= own[None, :]) & ~true).sum(axis=0)
        # image -> text: best true caption per image, then wrong captions at or above it.
        best_true = np.where(true, block, -np.inf).max(axis=1)
        has_caption = true.any(axis=1)
        wrong_above = ((block >= best_true[:, None]) & ~true).sum(axis=1)
        i2t_ranks[start:start + block.shape[0]] = np.where(has_caption, 1 + wrong_above, 0)
    return i2t_ranks, t2i_ranks


def _recall_stats(prefix: str, ranks: np.ndarray) -> dict[str, float]:
    if ranks.size == 0:
        nan = float("nan")
        return {f"{prefix}_r1": nan, f"{prefix}_r5": nan, f"{prefix}_r10": nan,
                f"{prefix}_medr": nan, f"{prefix}_meanr": nan}
    return {
        f"{prefix}_r1": float(np.mean(ranks <= 1)),
        f"{prefix}_r5": float(np.mean(ranks <= 5)),
        f"{prefix}_r10": float(np.mean(ranks <= 10)),
        f"{prefix}_medr": float(np.median(ranks)),
        f"{prefix}_meanr": float(np.mean(ranks)),
    }


def retrieval_metrics(score_matrix: Any, caption_to_image: Any) -> dict[str, float]:
    """Recall@1/5/10, median and mean rank for image->text (i2t) and text->image (t2i).

    `score_matrix[i, c]` is the score of image i with caption c; `caption_to_image[c]` is caption
    c's true image. See `retrieval_ranks` for how ranks and ties are counted.
    """
    i2t, t2i = retrieval_ranks(score_matrix, caption_to_image)
    uncaptioned = int(np.sum(i2t == 0))
    if uncaptioned:
        log.warning("%d images have no caption; left out of image->text retrieval", uncaptioned)
    return {**_recall_stats("i2t", i2t[i2t > 0]), **_recall_stats("t2i", t2i)}
