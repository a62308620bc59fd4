"""Domain FID: Fréchet distance between Gaussian fits of reference-classifier features, synthetic vs real.

We use torchmetrics' ``FrechetInceptionDistance`` machinery (float64 mean/covariance accumulation and
the eigenvalue form of ``Tr(sqrt(S1 S2))``) rather than hand-writing ``scipy.linalg.sqrtm``: since
torchmetrics 1.x ``feature=`` accepts any ``nn.Module`` with a ``num_features`` attribute, so the
Inception network is simply replaced by the chest-X-ray reference classifier's penultimate layer.

Like every FID, the value is biased by sample size (and needs more samples than feature dimensions
for full-rank covariances): compare only values computed with the same ``n`` on both sides, as
:func:`models.metrics.report.generator_report` does with its real-vs-real yardstick.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from models.metrics.images import ImageBatch, check_images
from models.metrics.reference import ReferenceClassifier, load_reference_classifier


@contextlib.contextmanager
def _single_threaded_linalg() -> Iterator[None]:
    """Run torch's LAPACK calls on one thread, restoring the thread count afterwards.

    torchmetrics computes ``eigvals(S1 @ S2)`` of a D x D (here 512 x 512) matrix. On a shared 2-core
    CPU, the OpenMP-threaded LAPACK of this torch build took 7-28 s per call with 2 threads and 0.23 s
    with 1 (measured on the development machine under load): the eigen-decomposition is too small to
    gain from threads and the threads' spin-waiting collapses when the cores are busy.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _PrecomputedFeatures(nn.Module):
    """Identity 'feature extractor' so torchmetrics' FID can take features computed once elsewhere."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def check_features(features: np.ndarray | torch.Tensor, name: str, min_rows: int = 2) -> torch.Tensor:
    """Validate an ``(N, D)`` feature matrix (``N >= min_rows``, finite) and return it as float64 on CPU."""
    t = torch.as_tensor(np.asarray(features) if isinstance(features, np.ndarray) else features)
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (N, D) feature matrix, got shape {tuple(t.shape)}")
    if t.shape[0] < min_rows:
        raise ValueError(f"{name}: need at least {min_rows} feature vectors, got {t.shape[0]}")
    if t.shape[1] == 0:
        raise ValueError(f"{name}: feature dimension is 0")
    t = t.detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return t


def frechet_distance(synthetic_features: np.ndarray | torch.Tensor, real_features: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two ``(N, D)`` feature sets (0 for identical sets).

    Tiny negative values from floating-point round-off are clipped to 0.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    fake = check_features(synthetic_features, "synthetic_features")
    real = check_features(real_features, "real_features")
    if fake.shape[1] != real.shape[1]:
        raise ValueError(f"feature dimensions differ: synthetic {fake.shape[1]} vs real {real.shape[1]}")
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(int(real.shape[1])))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with _single_threaded_linalg():
        return max(0.0, float(metric.compute()))


def domain_fid(
    synthetic_images: ImageBatch,
    real_images: ImageBatch,
    classifier: ReferenceClassifier | None = None,
    batch_size: int = 256,
) -> float:
    """Domain FID of two image sets in the reference classifier's feature space (default: the shipped one).

    Images are uint8 ``(N, H, W)`` arrays or ``[0, 1]`` float tensors, resized to the classifier's
    resolution; at least two images per side.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    fake = check_images(synthetic_images, "synthetic_images")
    real = check_images(real_images, "real_images")
    for t, name in ((fake, "synthetic_images"), (real, "real_images")):
        if t.shape[0] < 2:
            raise ValueError(f"{name}: FID needs at least 2 images, got {t.shape[0]}")
    clf = classifier if classifier is not None else load_reference_classifier()
    metric = FrechetInceptionDistance(feature=clf.feature_module())
    for t, is_real in ((real, True), (fake, False)):
        for start in range(0, t.shape[0], batch_size):
            metric.update(t[start : start + batch_size], real=is_real)
    with _single_threaded_linalg():
        return max(0.0, float(metric.compute()))
