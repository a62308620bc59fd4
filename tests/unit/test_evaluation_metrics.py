"""Bootstrap CIs and downstream metrics on constructed inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from models.evaluation import (
    auc_rows,
    bootstrap_ci,
    bootstrap_indices,
    bootstrap_mean,
    choose_threshold,
    classification_metrics,
    classification_metrics_with_ci,
    percentile_interval,
    segmentation_metrics,
)


def test_bootstrap_indices_are_seeded_and_respect_strata() -> None:
    a = bootstrap_indices(50, 200, seed=3)
    assert a.shape == (200, 50) and a.min() >= 0 and a.max() < 50
    assert np.array_equal(a, bootstrap_indices(50, 200, seed=3))
    assert not np.array_equal(a, bootstrap_indices(50, 200, seed=4))
    strata = np.array([0] * 10 + [1] * 40)
    s = bootstrap_indices(50, 100, seed=0, strata=strata)
    assert (strata[s] == strata[None, :]).all()  # every resample keeps 10 of class 0 and 40 of class 1


def test_constant_values_give_a_zero_width_interval() -> None:
    est = bootstrap_mean(np.full(30, 0.8))
    assert est.value == pytest.approx(0.8) and est.low == pytest.approx(0.8) and est.high == pytest.approx(0.8)


def test_mean_ci_matches_the_normal_approximation_and_contains_the_estimate() -> None:
    values = (np.random.default_rng(0).random(400) < 0.3).astype(float)
    p = values.mean()
    est = bootstrap_mean(values, n_resamples=2000, seed=1)
    half = 1.96 * np.sqrt(p * (1 - p) / len(values))
    assert est.value == pytest.approx(p)
    assert est.low < est.value < est.high
    assert est.low == pytest.approx(p - half, abs=0.01) and est.high == pytest.approx(p + half, abs=0.01)
    assert est.confidence == 0.95 and est.n_resamples == 2000
    assert set(est.to_dict()) == {"value", "low", "high", "confidence", "n_resamples"}
    # NaN items (e.g. an undefined HD95) are skipped, not propagated
    assert bootstrap_mean(np.array([1.0, np.nan, 3.0])).value == pytest.approx(2.0)


def test_percentile_interval_and_statistic_shape() -> None:
    lo, hi = percentile_interval(np.arange(101, dtype=float), 0.9)
    assert lo == pytest.approx(5.0) and hi == pytest.approx(95.0)
    with pytest.raises(ValueError, match="shape"):
        bootstrap_ci(lambda idx: np.zeros(3), 10, n_resamples=20)


def test_vectorised_auc_equals_torchmetrics() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 60)
        s = np.round(rng.random(60) + 0.5 * y, 1)  # rounding makes ties, counted as one half
        ref = float(binary_auroc(torch.from_numpy(s), torch.from_numpy(y)))
        assert auc_rows(s, y)[0] == pytest.approx(ref, abs=1e-6)


def test_perfect_and_inverted_classifiers() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9])
    m = classification_metrics(s, y, threshold=0.5)
    assert m == {"auc": 1.0, "f1": 1.0, "accuracy": 1.0, "sensitivity": 1.0, "specificity": 1.0}
    worst = classification_metrics(1 - s, y, threshold=0.5)
    assert worst["auc"] == 0.0 and worst["accuracy"] == 0.0
    ci = classification_metrics_with_ci(s, y, 0.5, n_resamples=200)
    assert all(e.value == e.low == e.high == 1.0 for e in ci.values())


def test_threshold_metrics_on_a_constructed_confusion_matrix() -> None:
    # 10 positives, 10 negatives; at threshold 0.5: TP=8, FN=2, TN=7, FP=3
    y = np.array([1] * 10 + [0] * 10)
    s = np.array([0.9] * 8 + [0.1] * 2 + [0.2] * 7 + [0.8] * 3)
    m = classification_metrics(s, y, threshold=0.5)
    assert m["sensitivity"] == pytest.approx(0.8) and m["specificity"] == pytest.approx(0.7)
    assert m["accuracy"] == pytest.approx(0.75) and m["f1"] == pytest.approx(2 * 8 / (2 * 8 + 3 + 2))
    ci = classification_metrics_with_ci(s, y, 0.5, n_resamples=500, seed=0)
    for name, est in ci.items():
        assert est.low <= est.value <= est.high, name
    assert ci["sensitivity"].high - ci["sensitivity"].low > 0.1  # n=10 per class: a wide interval


def test_threshold_rules_pick_the_separating_cut() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.35, 0.4, 0.7, 0.9])
    assert choose_threshold(s, y, "youden") == pytest.approx(0.4)
    assert choose_threshold(s, y, "f1") == pytest.approx(0.4)
    # A positive-heavy set with overlap: F1-max lowers the cut to catch every positive, Youden does not.
    y2 = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    s2 = np.array([0.1, 0.2, 0.3, 0.55, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    assert choose_threshold(s2, y2, "f1") <= 0.5 < choose_threshold(s2, y2, "youden")
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold(s, np.ones(6), "youden")
    with pytest.raises(ValueError, match="rule"):
        choose_threshold(s, y, "accuracy")  # type: ignore[arg-type]


def test_segmentation_metrics_on_constructed_masks() -> None:
    a = torch.zeros(3, 1, 32, 32)
    a[:, :, 8:16, 8:16] = 1
    b = a.clone()
    b[1] = 0
    b[1, :, 20:28, 20:28] = 1  # disjoint square
    b[2] = 0
    b[2, :, 8:16, 12:20] = 1  # same square shifted 4 px right: overlap 8x4 of 8x8
    same = segmentation_metrics(a, a)
    assert np.allclose(same["dice"], 1.0) and np.allclose(same["iou"], 1.0) and np.allclose(same["hd95"], 0.0)
    m = segmentation_metrics(b, a)
    assert m["dice"][0] == pytest.approx(1.0)
    assert m["dice"][1] == pytest.approx(0.0) and m["iou"][1] == pytest.approx(0.0)
    assert m["dice"][2] == pytest.approx(0.5) and m["iou"][2] == pytest.approx(1 / 3)
    assert m["hd95"][2] == pytest.approx(4.0)
    empty = segmentation_metrics(torch.zeros(1, 1, 8, 8), a[:1, :, :8, :8] * 0 + a[:1, :, 8:16, 8:16])
    assert empty["dice"][0] == 0.0 and np.isnan(empty["hd95"][0])  # HD95 undefined for an empty prediction
    with pytest.raises(ValueError, match="B, 1, H, W"):
        segmentation_metrics(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))
