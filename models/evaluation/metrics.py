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
from typing import Literal, get_args

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

ThresholdRule = Literal["youden", "f1", "equal-error", "balanced-platt"]
ThresholdFn = Callable[[np.ndarray, np.ndarray], float]
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


def _youden(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, thr = binary_roc(torch.from_numpy(s), torch.from_numpy(y))
    return (tpr - fpr).numpy(), thr.numpy()


def _f1(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    precision, recall, thr = binary_precision_recall_curve(torch.from_numpy(s), torch.from_numpy(y))
    p, r = precision[:-1].numpy(), recall[:-1].numpy()  # the last point has no threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p + r > 0, 2 * p * r / (p + r), 0.0), thr.numpy()


def _equal_error(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, thr = binary_roc(torch.from_numpy(s), torch.from_numpy(y))
    return -np.abs((1.0 - tpr.numpy()) - fpr.numpy()), thr.numpy()  # maximal where FNR == FPR


def _argmax_threshold(curve: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> ThresholdFn:
    """A rule that maximises a criterion over the candidate thresholds of a curve; ties go to the higher threshold."""

    def rule(s: np.ndarray, y: np.ndarray) -> float:
        j, thresholds = curve(s, y)
        best = np.flatnonzero(j == j.max())
        return float(thresholds[best].max())

    return rule


def balanced_platt_threshold(s: np.ndarray, y: np.ndarray) -> float:
    """Where a class-balanced Platt fit of the validation scores says 50%.

    A 1-D logistic regression of the label on ``logit(score)`` (a temperature and a bias: Platt scaling)
    with class-balanced sample weights, so each class weighs half whatever its share of the validation
    set: the fit is the temperature-scaled posterior corrected to a 50% prior. The threshold is where it
    crosses 0.5. In expectation it does not move with the validation prevalence (unlike F1-max), and as a
    smooth fit of every score it is not decided by the few images where the classes overlap (unlike the
    argmax of Youden's J or the equal-error point, which jump between ties when validation AUC is near 1).
    A weak L2 (C=100 on the standardised logit) only keeps the fit finite on separable scores, where it
    then cuts near the middle of the gap. Scores must be probabilities in ``[0, 1]``.

    When the fitted slope is not positive (validation AUC at or below chance: the scores carry no
    signal to calibrate), it warns and returns the equal-error threshold instead of failing the run.
    """
    from sklearn.linear_model import LogisticRegression

    if s.min() < 0.0 or s.max() > 1.0:
        raise ValueError("the balanced-platt rule needs probabilities in [0, 1] as scores")
    eps = 1e-12
    z = np.log(np.clip(s, eps, 1 - eps)) - np.log(np.clip(1 - s, eps, 1 - eps))
    mu, sd = float(z.mean()), float(z.std()) or 1.0
    clf = LogisticRegression(class_weight="balanced", C=100.0).fit(((z - mu) / sd)[:, None], y)
    a, b = float(clf.coef_[0, 0]), float(clf.intercept_[0])
    if a <= 0:
        warnings.warn("balanced-platt: the validation scores do not increase with the label (AUC <= 0.5); "
                      "using the equal-error threshold", RuntimeWarning, stacklevel=2)
        return _argmax_threshold(_equal_error)(s, y)
    z_star = mu + sd * (-b / a)
    return float(1.0 / (1.0 + np.exp(-z_star)))


# Name -> rule(scores, 0/1 labels) -> threshold. The single source of the rule names: ``ThresholdRule``
# and every list of choices must match it (checked below at import time, and by a unit test).
THRESHOLD_RULES: dict[str, ThresholdFn] = {
    # Youden's J = sensitivity + specificity - 1 (prevalence-free in expectation, but the argmax of a
    # step function: with validation AUC near 1 it is decided by a handful of overlapping images).
    "youden": _argmax_threshold(_youden),
    # F1-max on the precision-recall curve: depends on prevalence, favours sensitivity when positives
    # are the majority, as in Kermany.
    "f1": _argmax_threshold(_f1),
    # Sensitivity == specificity (equal error rate): prevalence-free, same tie caveat as Youden.
    "equal-error": _argmax_threshold(_equal_error),
    # Temperature + bias fitted with class-balanced weights, cut at 50%: prevalence-free and smooth.
    "balanced-platt": balanced_platt_threshold,
}
THRESHOLD_RULE_NAMES: tuple[str, ...] = tuple(THRESHOLD_RULES)
if get_args(ThresholdRule) != THRESHOLD_RULE_NAMES:  # keep the static type in step with the registry
    raise RuntimeError(f"ThresholdRule {get_args(ThresholdRule)} differs from THRESHOLD_RULES {THRESHOLD_RULE_NAMES}")


def threshold_rule(name: str) -> ThresholdFn:
    """The registered rule ``name``; raises ``ValueError`` naming the choices for an unknown one."""
    try:
        return THRESHOLD_RULES[name]
    except KeyError:
        raise ValueError(f"unknown threshold rule {name!r}: choose one of {', '.join(THRESHOLD_RULE_NAMES)}") from None


def choose_threshold(scores: np.ndarray, labels: np.ndarray, rule: ThresholdRule = "youden") -> float:
    """The decision threshold on validation scores (an image is positive when ``score >= threshold``).

    ``rule`` names an entry of :data:`THRESHOLD_RULES` (an unknown name raises ``ValueError``):
    ``youden`` (the default), ``f1``, ``equal-error`` or ``balanced-platt`` (prevalence-robust, see
    :func:`balanced_platt_threshold`).
    """
    fn = threshold_rule(rule)
    s, y = _as_binary(scores, labels)
    return fn(s, y)


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


def group_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """:func:`classification_metrics` of a held-out group, which may hold one class only.

    With both classes: every metric. With negatives only: ``specificity`` (the share below the
    threshold); with positives only: ``sensitivity``. The other metrics are undefined there and omitted.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if s.shape != y.shape or s.size == 0:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if y.min() != y.max():
        return classification_metrics(s, y, threshold)
    if y[0] == 0:
        return {"specificity": float((s < threshold).mean())}
    return {"sensitivity": float((s >= threshold).mean())}


def group_metrics_with_ci(
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, Estimate]:
    """:func:`group_metrics` with stratified bootstrap CIs (one-class groups: CI of the mean decision)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if s.shape != y.shape or s.size == 0:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if y.min() != y.max():
        return classification_metrics_with_ci(s, y, threshold, n_resamples=n_resamples, confidence=confidence,
                                              seed=seed)
    name, correct = ("specificity", s < threshold) if y[0] == 0 else ("sensitivity", s >= threshold)
    est = bootstrap_mean(correct.astype(np.float64), n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {name: est}


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
