"""Calibration of a binary classifier's probabilities: ECE, Brier score and temperature scaling.

ECE is torchmetrics' ``binary_calibration_error`` (the functional form of ``BinaryCalibrationError``,
equal-width bins, L1); the Brier score is torchmetrics' ``mean_squared_error`` of the probability
against the 0/1 label (that is its definition; torchmetrics has no metric under that name).
Temperature scaling (Guo et al. 2017) is fitted here by hand: neither torchmetrics nor scikit-learn
offers it (scikit-learn's ``CalibratedClassifierCV`` does Platt or isotonic on a wrapped estimator, not a
one-parameter temperature on given logits). It divides the logits by one scalar ``T`` fitted by
minimising the validation negative log-likelihood, so the ranking (AUC) and every decision at a
matching threshold stay the same; only the confidence changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.classification import binary_calibration_error

DEFAULT_BINS = 15


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Float64 logistic function (saturates only beyond |logit| ~ 37, unlike float32's ~17); SciPy's
    ``expit`` does not overflow (and warn) on large negative logits as ``1 / (1 + exp(-z))`` does."""
    from scipy.special import expit

    return np.asarray(expit(np.asarray(logits, dtype=np.float64)))


def calibration_metrics(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> dict[str, float]:
    """Expected calibration error (``n_bins`` equal-width bins, L1) and Brier score of probabilities.

    One class only is allowed (e.g. a held-out group of normals): both metrics stay defined.
    """
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64).reshape(-1))
    y = torch.as_tensor(np.asarray(labels).reshape(-1).astype(np.int64))
    if p.shape != y.shape or p.numel() == 0:
        raise ValueError(f"need as many probabilities as labels (and at least one), got {p.numel()} and {y.numel()}")
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError("probabilities must lie in [0, 1]")
    ece = binary_calibration_error(p, y, n_bins=n_bins, norm="l1")
    brier = mean_squared_error(p, y.to(p.dtype))
    return {"ece": float(ece), "brier": float(brier)}


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``sigmoid(logits / T)`` (L-BFGS on ``log T``)."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64).reshape(-1))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64).reshape(-1))
    if z.shape != y.shape or z.numel() == 0:
        raise ValueError("need as many logits as labels, and at least one")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("logits must be finite")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not np.isfinite(t) or t <= 0:  # pragma: no cover - L-BFGS on a convex 1-D problem stays finite
        raise RuntimeError(f"temperature scaling diverged (T={t})")
    return t


def calibration_report(
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    others: Mapping[str, tuple[np.ndarray, np.ndarray]],
    n_bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """ECE and Brier before and after temperature scaling fitted on the validation logits.

    ``others`` maps a split name (``"test"``, ``"shifted"``) to its (logits, labels); the temperature is
    fitted on validation only, so the validation "after" figures are optimistic and the others are not.
    """
    t = fit_temperature(val_logits, val_labels)
    out: dict[str, Any] = {"temperature": t, "fitted_on": "validation", "n_bins": n_bins,
                           "method": "temperature scaling: sigmoid(logit / T), T by validation NLL"}
    for name, (z, y) in {"validation": (val_logits, val_labels), **others}.items():
        out[name] = {"before": calibration_metrics(sigmoid(z), y, n_bins),
                     "after": calibration_metrics(sigmoid(np.asarray(z) / t), y, n_bins)}
    return out
