"""Precision, recall, density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics
for Generative Models", ICML) of synthetic vs real feature sets, with k nearest neighbours (default 5).

* precision: share of synthetic samples inside some real sample's k-NN ball (fidelity);
* recall: share of real samples inside some synthetic sample's k-NN ball (diversity);
* density: mean number of real k-NN balls containing a synthetic sample, divided by k (about 1 when
  the two sets come from the same distribution; robust to real outliers);
* coverage: share of real samples whose k-NN ball contains at least one synthetic sample.

The computation is the authors' own package ``prdc`` (PyPI, MIT licence, NAVER Clova AI; works with
numpy 2), not a rewrite. Two things are wrapped: it prints the set sizes to stdout (silenced, so a CLI
writing JSON to stdout stays clean) and asks scikit-learn for 8 worker threads (BLAS inside each is
limited to one thread so 2-core workers are not oversubscribed). It builds dense distance matrices:
memory is about ``8 * (n_real + n_fake)**2`` bytes, fine for the 1,000-10,000 samples used here.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

from models.metrics.fid import check_features

DEFAULT_K = 5


def precision_recall_density_coverage(
    real_features: np.ndarray | torch.Tensor,
    synthetic_features: np.ndarray | torch.Tensor,
    k: int = DEFAULT_K,
) -> dict[str, float]:
    """PRDC of synthetic vs real ``(N, D)`` features: ``{"precision", "recall", "density", "coverage"}``.

    Identical sets give (1, 1, ~1, 1); far-apart sets give zeros. Each set needs more than ``k`` rows.
    """
    from prdc import compute_prdc
    from threadpoolctl import threadpool_limits

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real = check_features(real_features, "real_features", min_rows=k + 1).numpy()
    fake = check_features(synthetic_features, "synthetic_features", min_rows=k + 1).numpy()
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]} vs synthetic {fake.shape[1]}")
    with contextlib.redirect_stdout(io.StringIO()), threadpool_limits(limits=1, user_api="blas"):
        out = compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    return {name: float(out[name]) for name in ("precision", "recall", "density", "coverage")}
