"""Metrics against hand-computed values on small inputs, and PNG plots written by plots.py."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from itsim.eval import metrics, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- ROC-AUC and PR-AUC ----------------------------------------------------------------------------

def test_roc_auc_perfect_reversed_and_constant_scores():
    labels = [0, 0, 1, 1]
    assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert metrics.roc_auc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert metrics.roc_auc([0.3, 0.3, 0.3, 0.3], labels) == 0.5


def test_roc_auc_counts_ties_as_one_half():
    # positives {0.5, 0.9} vs negatives {0.1, 0.5}: 1 + 0.5 + 1 + 1 = 3.5 of 4 pairs.
    assert metrics.roc_auc([0.1, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(0.875)


def test_roc_auc_matches_scikit_learn_documented_example():
    assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_roc_auc_equals_pairwise_count_on_random_scores_with_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=80).astype(float)
    labels = rng.integers(0, 2, size=80)
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    expected = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
    assert metrics.roc_auc(scores, labels) == pytest.approx(expected)


def test_roc_auc_is_nan_with_one_class_and_accepts_torch_tensors():
    assert np.isnan(metrics.roc_auc([0.2, 0.4], [1, 1]))
    assert metrics.roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0


def test_pr_auc_hand_cases():
    # scikit-learn's documented example: 0.8333.
    assert metrics.pr_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(5 / 6)
    assert metrics.pr_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == pytest.approx(1.0)
    # Reversed: recall 0.5 at precision 1/3, recall 1 at precision 2/4.
    assert metrics.pr_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == pytest.approx(0.5 / 3 + 0.5 * 0.5)
    # Constant scores: a single cut with precision = positive rate.
    assert metrics.pr_auc([0.3] * 4, [0, 0, 0, 1]) == pytest.approx(0.25)
    # Tie at 0.5 is one cut: P=1 at R=0.5, then P=2/3 at R=1.
    assert metrics.pr_auc([0.1, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_roc_curve_runs_from_origin_to_one_one():
    fpr, tpr, thr = metrics.roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert thr[0] == np.inf


# --- thresholded metrics ---------------------------------------------------------------------------

SCORES = [0.2, 0.6, 0.5, 0.4, 0.9]
LABELS = [0, 0, 1, 1, 1]  # at 0.5: predictions 0, 1, 1, 0, 1


def test_confusion_counts_score_equal_to_threshold_as_positive():
    assert metrics.confusion(SCORES, LABELS, 0.5) == (1, 1, 1, 2)
    assert metrics.confusion(SCORES, LABELS, 0.0) == (0, 2, 0, 3)
    assert metrics.confusion(SCORES, LABELS, 1.0) == (2, 0, 3, 0)


def test_classification_report_hand_values():
    report = metrics.classification_report(SCORES, LABELS, 0.5)
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["precision"] == pytest.approx(2 / 3)
    assert report["recall"] == pytest.approx(2 / 3)
    assert report["f1"] == pytest.approx(2 / 3)
    assert report["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert report["confusion_matrix"] == [[1, 1], [1, 2]]
    assert metrics.accuracy(SCORES, LABELS, 0.5) == pytest.approx(0.6)


def test_classification_report_defines_zero_divisions_as_zero():
    report = metrics.classification_report(SCORES, LABELS, 1.0)  # nothing predicted positive
    assert (report["precision"], report["recall"], report["f1"]) == (0.0, 0.0, 0.0)
    assert report["accuracy"] == pytest.approx(2 / 5)
    assert report["balanced_accuracy"] == pytest.approx(0.5)
    empty = metrics.classification_report([], [], 0.5)
    assert empty["accuracy"] == 0.0 and empty["f1"] == 0.0


def test_best_threshold_separable_scores_cut_between_classes():
    threshold, value = metrics.best_threshold([0.1, 0.3, 0.6, 0.4, 0.9], [0, 0, 1, 1, 1])
    assert value == 1.0
    assert threshold == pytest.approx(0.35)


def test_best_threshold_returns_a_cut_that_reproduces_its_accuracy():
    scores, labels = [0.1, 0.7, 0.4, 0.8], [0, 0, 1, 1]
    threshold, value = metrics.best_threshold(scores, labels)
    assert value == pytest.approx(0.75)
    assert threshold == pytest.approx(0.75)  # first best cut: between 0.8 and 0.7
    assert metrics.accuracy(scores, labels, threshold) == pytest.approx(value)


def test_best_threshold_accuracy_versus_balanced_accuracy_on_imbalanced_labels():
    scores, labels = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0, 1, 0, 0, 0, 0]
    threshold, value = metrics.best_threshold(scores, labels)
    assert value == pytest.approx(5 / 6) and threshold > 0.6  # all negative
    threshold, value = metrics.best_threshold(scores, labels, balanced=True)
    assert value == pytest.approx(0.6) and threshold == pytest.approx(0.15)
    assert metrics.balanced_accuracy(scores, labels, threshold) == pytest.approx(0.6)


# --- retrieval -------------------------------------------------------------------------------------

# 3 images x 6 captions; captions 0,1 belong to image 0, 2,3 to image 1, 4,5 to image 2.
MATRIX = np.array([
    [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],
    [0.5, 0.4, 0.3, 0.6, 0.7, 0.1],
    [0.2, 0.3, 0.1, 0.0, 0.4, 0.5],
])
CAPTION_TO_IMAGE = np.array([0, 0, 1, 1, 2, 2])


def test_retrieval_ranks_on_constructed_matrix():
    i2t, t2i = metrics.retrieval_ranks(MATRIX, CAPTION_TO_IMAGE)
    # image 1: best true caption 0.6, beaten by wrong caption 4 (0.7) -> rank 2.
    assert i2t.tolist() == [1, 2, 1]
    # caption 1 (0.1 on image 0) is beaten by images 1 and 2 -> rank 3.
    assert t2i.tolist() == [1, 3, 2, 1, 2, 1]


def test_retrieval_metrics_on_constructed_matrix():
    result = metrics.retrieval_metrics(MATRIX, CAPTION_TO_IMAGE)
    assert result["i2t_r1"] == pytest.approx(2 / 3)
    assert result["i2t_r5"] == result["i2t_r10"] == 1.0
    assert result["i2t_medr"] == 1.0
    assert result["i2t_meanr"] == pytest.approx(4 / 3)
    assert result["t2i_r1"] == pytest.approx(0.5)
    assert result["t2i_r5"] == 1.0
    assert result["t2i_medr"] == 1.5
    assert result["t2i_meanr"] == pytest.approx(10 / 6)


def test_retrieval_ties_are_pessimistic():
    i2t, t2i = metrics.retrieval_ranks(np.zeros((3, 6)), CAPTION_TO_IMAGE)
    assert i2t.tolist() == [5, 5, 5]  # every one of the 4 wrong captions ties with the true ones
    assert t2i.tolist() == [3] * 6
    tied = MATRIX.copy()
    tied[0, 2] = 0.9  # a wrong caption ties image 0's best true caption
    assert metrics.retrieval_ranks(tied, CAPTION_TO_IMAGE)[0].tolist() == [2, 2, 1]


def test_retrieval_ranks_match_a_plain_loop_and_do_not_depend_on_chunk_size():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(7, 20)).astype(np.float32)  # many ties
    c2i = rng.integers(0, 7, size=20)
    c2i[:7] = np.arange(7)  # every image has a caption
    loop_i2t = []
    for i in range(7):
        best = max(scores[i, c] for c in range(20) if c2i[c] == i)
        loop_i2t.append(1 + sum(scores[i, c] >= best for c in range(20) if c2i[c] != i))
    loop_t2i = [1 + sum(scores[i, c] >= scores[c2i[c], c] for i in range(7) if i != c2i[c]) for c in range(20)]
    for chunk in (1, 3, 1024):
        i2t, t2i = metrics.retrieval_ranks(scores, c2i, chunk=chunk)
        assert i2t.tolist() == loop_i2t
        assert t2i.tolist() == loop_t2i


def test_retrieval_leaves_out_images_without_captions():
    scores = np.vstack([MATRIX, np.full((1, 6), 9.0)])  # image 3 has no caption
    result = metrics.retrieval_metrics(scores, CAPTION_TO_IMAGE)
    assert result["i2t_meanr"] == pytest.approx(4 / 3)
    assert result["t2i_meanr"] == pytest.approx(16 / 6)  # image 3 outscores every caption's own image


def test_retrieval_1000_images_by_5000_captions_is_fast():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((1000, 5000)).astype(np.float32)
    start = time.perf_counter()
    result = metrics.retrieval_metrics(torch.from_numpy(scores), np.repeat(np.arange(1000), 5))
    assert time.perf_counter() - start < 1.0
    # Random scores: a caption's image ranks about 500th of 1000.
    assert 450 < result["t2i_meanr"] < 550


# --- plots -----------------------------------------------------------------------------------------

def _assert_png(path) -> None:
    assert path is not None and path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_roc_and_score_histogram_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 200)
    scores = rng.random(200) * 0.5 + labels * 0.3
    _assert_png(plots.plot_roc(scores, labels, tmp_path / "roc.png"))
    _assert_png(plots.plot_score_hist(scores, labels, tmp_path / "hist" / "score_hist.png", threshold=0.5))


def test_training_curves_plot_tolerates_missing_keys_and_broken_lines(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3, "train_acc": 0.5 + s / 400})
             for s in range(10, 110, 10)]
    lines.insert(3, json.dumps({"step": 50, "val_loss": 0.6, "val_accuracy": 0.7, "val_roc_auc": 0.75}))
    lines.insert(5, json.dumps({"step": 60, "images_per_s": 100.0}))  # no loss at all
    lines.append('{"step": 110, "loss": 0.')  # killed mid-write
    source = tmp_path / "metrics.jsonl"
    source.write_text("\n".join(lines) + "\n")
    _assert_png(plots.plot_training_curves(source, tmp_path / "training_curves.png"))
    assert len(plots.read_metrics_jsonl(source)) == 12


def test_training_curves_plot_skips_a_missing_file(tmp_path):
    assert plots.plot_training_curves(tmp_path / "nope.jsonl", tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()
