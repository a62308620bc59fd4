"""Downstream metrics with bootstrap CIs: classification (torchmetrics) and segmentation (MONAI).

Point estimates come straight from torchmetrics / MONAI. The bootstrap replicates of the threshold
metrics use torchmetrics' ``multidim_average="samplewise"`` on a ``(B, n)`` resample matrix (one call
for all resamples). torchmetrics has no batched AUROC, so the AUC replicates use the Mann-Whitney
rank formula vectorised over rows (:func:`auc_rows`), which equals the ROC AUC exactly (ties count
one half); a unit test checks it against ``binary_auroc``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from scipy.stats import rankdata
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_f1_score,
    binary_precision_recall_curve,
    binary_recall,
    binary_roc,
    binary_specificity,
)

from models.evaluation.bootstrap import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    Estimate,
    bootstrap_ci,
    bootstrap_mean,
)

ThresholdRule = Literal["youden", "f1"]
CLASSIFICATION_METRICS = ("auc", "f1", "accuracy", "sensitivity", "specificity")
SEGMENTATION_METRICS = ("dice", "iou", "hd95")


def _as_binary(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (negative) or 1 (positive)")
    if y.min() == y.max():
        raise ValueError("need both classes (0 and 1) to compute AUC and the threshold metrics")
    return s, y


def choose_threshold(scores: np.ndarray, labels: np.ndarray, rule: ThresholdRule = "youden") -> float:
    """The decision threshold on validation scores (an image is positive when ``score >= threshold``).

    ``youden`` maximises Youden's J = sensitivity + specificity - 1 on the ROC curve (the default:
    it does not depend on the class prevalence, which differs between hospitals); ``f1`` maximises
    F1 on the precision-recall curve (depends on prevalence, favours sensitivity when positives are
    the majority as in Kermany). Ties go to the higher threshold.
    """
    s, y = _as_binary(scores, labels)
    st, yt = torch.from_numpy(s), torch.from_numpy(y)
    if rule == "youden":
        fpr, tpr, thr = binary_roc(st, yt)
        j = (tpr - fpr).numpy()
        thresholds = thr.numpy()
    elif rule == "f1":
        precision, recall, thr = binary_precision_recall_curve(st, yt)
        p, r = precision[:-1].numpy(), recall[:-1].numpy()  # the last point has no threshold
        with np.errstate(invalid="ignore", divide="ignore"):
            j = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
        thresholds = thr.numpy()
    else:
        raise ValueError(f"unknown threshold rule {rule!r}: use 'youden' or 'f1'")
    best = np.flatnonzero(j == j.max())
    return float(thresholds[best].max())


def auc_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of ``(B, n)`` scores / 0-1 labels (Mann-Whitney U with average ranks)."""
    scores = np.atleast_2d(scores)
    labels = np.atleast_2d(labels).astype(bool)
    ranks = rankdata(scores, axis=1, method="average")
    n_pos = labels.sum(axis=1)
    n_neg = labels.shape[1] - n_pos
    u = (ranks * labels).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def _threshold_metric_rows(name: str, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    average: Literal["global", "samplewise"] = "samplewise" if preds.ndim == 2 else "global"
    fn = {"f1": binary_f1_score, "accuracy": binary_accuracy, "sensitivity": binary_recall,
          "specificity": binary_specificity}[name]
    out = fn(preds, target, multidim_average=average)
    return out.reshape(-1) if preds.ndim == 2 else out  # torchmetrics squeezes a single row


def classification_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, F1, accuracy, sensitivity, specificity (torchmetrics) at ``score >= threshold``."""
    s, y = _as_binary(scores, labels)
    st, yt = torch.from_numpy(s), torch.from_numpy(y)
    preds = (st >= threshold).long()
    out = {"auc": float(binary_auroc(st, yt))}
    for name in CLASSIFICATION_METRICS[1:]:
        out[name] = float(_threshold_metric_rows(name, preds, yt))
    return out


def classification_metrics_with_ci(
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, Estimate]:
    """:func:`classification_metrics` with stratified percentile-bootstrap CIs (seeded, vectorised)."""
    s, y = _as_binary(scores, labels)
    point = classification_metrics(s, y, threshold)
    preds_all = torch.from_numpy((s >= threshold).astype(np.int64))
    y_all = torch.from_numpy(y)

    def stat(name: str) -> Callable[[np.ndarray], np.ndarray]:
        if name == "auc":
            return lambda idx: auc_rows(s[idx], y[idx])
        return lambda idx: _threshold_metric_rows(
            name, preds_all[torch.from_numpy(idx)], y_all[torch.from_numpy(idx)]
        ).numpy()

    out: dict[str, Estimate] = {}
    for name in CLASSIFICATION_METRICS:
        est = bootstrap_ci(stat(name), len(s), n_resamples=n_resamples, confidence=confidence, seed=seed, strata=y)
        # The point estimate is torchmetrics' own value (identical up to float rounding).
        out[name] = Estimate(point[name], est.low, est.high, confidence, n_resamples)
    return out


def segmentation_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image Dice, IoU and HD95 (pixels) of binary masks ``(B, 1, H, W)`` with MONAI.

    Empty-vs-empty gives Dice = IoU = 1; HD95 is NaN when either mask is empty (undefined).
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 1:
        raise ValueError(
            f"pred and target must both be (B, 1, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    p = (pred > 0.5).float() if pred.is_floating_point() else (pred > 0).float()
    t = (target > 0.5).float() if target.is_floating_point() else (target > 0).float()
    dice = compute_dice(p, t, include_background=True, ignore_empty=False)
    iou = compute_iou(p, t, include_background=True, ignore_empty=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks and deprecated arguments
        hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95)
    hd95 = hd.reshape(-1).double().numpy()
    hd95[~np.isfinite(hd95)] = np.nan
    return {
        "dice": dice.reshape(-1).double().numpy(),
        "iou": iou.reshape(-1).double().numpy(),
        "hd95": hd95,
    }


def summarise_per_image(
    values: dict[str, np.ndarray],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Mean of each per-image metric with its bootstrap CI (NaN images, e.g. undefined HD95, skipped)."""
    return {
        name: bootstrap_mean(v, n_resamples=n_resamples, confidence=confidence, seed=seed)
        for name, v in values.items()
    }
