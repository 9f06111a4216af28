"""itsim.eval.metrics against scikit-learn (a dev dependency) on random and heavily tied scores.

metrics.py computes ROC-AUC from ranks (Mann-Whitney U) and average precision from its own
threshold sweep, without scikit-learn at run time; these tests hold both to scikit-learn's numbers.
The two differ only in the order floating-point sums are taken, hence 1e-12 rather than equality.
"""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from itsim.eval import metrics

SEEDS = range(8)
TOL = 1e-12


def _cases(seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Continuous scores, a few distinct values (ties everywhere), one value, and rare positives."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    labels = (rng.random(n) < rng.uniform(0.2, 0.8)).astype(int)
    labels[:2] = [0, 1]  # both classes present
    rare = np.zeros(n, dtype=int)
    rare[rng.choice(n, size=3, replace=False)] = 1
    noisy = labels + rng.normal(0, 1.0, n)
    return [
        ("continuous", rng.random(n), labels),
        ("informative", 1 / (1 + np.exp(-noisy)), labels),
        ("tied_5_values", rng.integers(0, 5, n) / 4.0, labels),
        ("tied_2_values", rng.integers(0, 2, n).astype(float), labels),
        ("all_equal", np.full(n, 0.5), labels),
        ("rare_positives_tied", np.round(rng.random(n), 1), rare),
        ("float32_scores", rng.random(n).astype(np.float32).astype(np.float64), labels),
    ]


@pytest.mark.parametrize("seed", SEEDS)
def test_roc_auc_and_average_precision_equal_scikit_learn(seed):
    for name, scores, labels in _cases(seed):
        assert abs(metrics.roc_auc(scores, labels) - roc_auc_score(labels, scores)) < TOL, (seed, name)
        assert abs(metrics.pr_auc(scores, labels) - average_precision_score(labels, scores)) < TOL, (seed, name)


@pytest.mark.parametrize("seed", SEEDS)
def test_roc_curve_equals_scikit_learn_with_every_threshold_kept(seed):
    # scikit-learn drops collinear points by default; with them kept, the curves are the same points.
    for name, scores, labels in _cases(seed):
        fpr, tpr, thresholds = metrics.roc_curve(scores, labels)
        sk_fpr, sk_tpr, sk_thresholds = roc_curve(labels, scores, drop_intermediate=False)
        assert fpr.shape == sk_fpr.shape, (seed, name)
        np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=TOL, err_msg=f"{seed} {name}")
        np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=TOL, err_msg=f"{seed} {name}")
        np.testing.assert_array_equal(thresholds, sk_thresholds, err_msg=f"{seed} {name}")


def test_one_class_conventions():
    """Without both classes: ROC-AUC is NaN in both; average precision is 1 with only positives in both,
    and without positives NaN here (nothing to rank) where scikit-learn warns and returns 0."""
    scores = np.array([0.2, 0.4, 0.9])
    for labels in ([1, 1, 1], [0, 0, 0]):
        assert np.isnan(metrics.roc_auc(scores, labels))
        with pytest.warns(UserWarning):
            assert np.isnan(roc_auc_score(labels, scores))
    assert metrics.pr_auc(scores, [1, 1, 1]) == average_precision_score([1, 1, 1], scores) == 1.0
    assert np.isnan(metrics.pr_auc(scores, [0, 0, 0]))
    with pytest.warns(UserWarning):
        assert average_precision_score([0, 0, 0], scores) == 0.0
