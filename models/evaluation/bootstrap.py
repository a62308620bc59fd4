"""Seeded, vectorised percentile-bootstrap confidence intervals.

A statistic is computed once on the data (the point estimate) and on ``n_resamples`` resamples drawn
with replacement, all at once as a ``(n_resamples, n)`` index matrix, so a 1,000-resample interval
costs one vectorised call instead of 1,000 (torchmetrics' ``BootStrapper`` deep-copies and updates a
metric per resample). The interval is the percentile interval of the resampled statistic.

``strata`` resamples within each stratum separately (e.g. positives and negatives), which keeps the
class balance of the test set fixed and guarantees every resample has both classes, so the AUC is
defined for each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap confidence interval."""

    value: float
    low: float
    high: float
    confidence: float = DEFAULT_CONFIDENCE
    n_resamples: int = DEFAULT_RESAMPLES

    def to_dict(self) -> dict[str, float]:
        """JSON-ready dict (``value``, ``low``, ``high``, ``confidence``, ``n_resamples``)."""
        return asdict(self)


def bootstrap_indices(
    n: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, strata: np.ndarray | None = None
) -> np.ndarray:
    """``(n_resamples, n)`` int64 indices into ``range(n)``, drawn with replacement (seeded).

    With ``strata`` (one key per item), each stratum is resampled within itself, at its own size.
    """
    if n <= 0:
        raise ValueError("cannot bootstrap an empty sample")
    if n_resamples <= 0:
        raise ValueError("n_resamples must be positive")
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.integers(0, n, size=(n_resamples, n), dtype=np.int64)
    strata = np.asarray(strata)
    if strata.shape != (n,):
        raise ValueError(f"strata must have shape ({n},), got {strata.shape}")
    out = np.empty((n_resamples, n), dtype=np.int64)
    for key in np.unique(strata):
        members = np.flatnonzero(strata == key)
        picks = rng.integers(0, len(members), size=(n_resamples, len(members)))
        out[:, members] = members[picks]
    return out


def percentile_interval(samples: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates (NaN replicates are ignored)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    strata: np.ndarray | None = None,
) -> Estimate:
    """Point estimate and percentile CI of a vectorised statistic.

    ``statistic`` maps an index matrix ``(B, n)`` to ``B`` values; the point estimate is
    ``statistic(arange(n)[None])[0]``, the replicates ``statistic(bootstrap_indices(...))``.
    """
    point = float(np.asarray(statistic(np.arange(n)[None, :])).reshape(-1)[0])
    reps = np.asarray(statistic(bootstrap_indices(n, n_resamples, seed, strata)), dtype=np.float64).reshape(-1)
    if reps.shape != (n_resamples,):
        raise ValueError(f"the statistic returned shape {reps.shape}, expected ({n_resamples},)")
    lo, hi = percentile_interval(reps, confidence)
    return Estimate(point, lo, hi, confidence, n_resamples)


def bootstrap_mean(
    values: np.ndarray,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Estimate:
    """Mean of per-item values (e.g. per-image Dice) with its bootstrap CI; NaN items are skipped."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    keep = v[np.isfinite(v)]
    if keep.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), confidence, n_resamples)
    return bootstrap_ci(
        lambda idx: keep[idx].mean(axis=1), len(keep), n_resamples=n_resamples, confidence=confidence, seed=seed
    )
