"""Domain FID and PRDC on feature sets with known answers, and their input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.metrics.fid import frechet_distance
from models.metrics.prdc import precision_recall_density_coverage

torch.set_num_threads(min(2, torch.get_num_threads()))


def _gaussian(n: int = 400, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d))


def test_fid_of_identical_sets_is_zero() -> None:
    x = _gaussian()
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(torch.from_numpy(x).float(), torch.from_numpy(x).float()) == pytest.approx(0.0, abs=1e-4)


def test_fid_grows_monotonically_with_mean_shift() -> None:
    x, y = _gaussian(seed=0), _gaussian(seed=1)
    base = frechet_distance(y, x)
    fids = [frechet_distance(y + shift, x) for shift in (0.25, 0.5, 1.0, 2.0)]
    assert base < fids[0] < fids[1] < fids[2] < fids[3]
    # For equal covariances FID = ||mu1 - mu2||^2 + sampling noise: shift 1 in 16 dims adds about 16.
    assert fids[2] - base == pytest.approx(16.0, rel=0.1)


def test_fid_rejects_bad_input() -> None:
    x = _gaussian()
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(x[:1], x)
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(x[:, 0], x)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(x[:, :8], x)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full_like(x, np.nan), x)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.empty((0, 16)), x)


def test_prdc_of_identical_sets() -> None:
    x = _gaussian(300, 8)
    m = precision_recall_density_coverage(x, x, k=5)
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(1.0)
    assert m["coverage"] == pytest.approx(1.0)
    assert 0.8 < m["density"] < 1.3


def test_prdc_of_same_distribution_and_of_far_apart_sets() -> None:
    x, y = _gaussian(500, 8, 0), _gaussian(500, 8, 1)
    same = precision_recall_density_coverage(x, y, k=5)
    assert same["precision"] > 0.7 and same["recall"] > 0.7 and same["coverage"] > 0.8
    assert 0.6 < same["density"] < 1.4
    far = precision_recall_density_coverage(x, y + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_rejects_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    x = _gaussian(50, 8)
    with pytest.raises(ValueError, match="at least 6"):
        precision_recall_density_coverage(x[:5], x, k=5)
    with pytest.raises(ValueError, match="k must be"):
        precision_recall_density_coverage(x, x, k=0)
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall_density_coverage(x, x[:, :4])
    precision_recall_density_coverage(x, x)
    assert capsys.readouterr().out == ""  # the prdc package's print is silenced
