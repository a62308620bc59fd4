"""Diversity: mean pairwise MS-SSIM between images of the same label (lower = more diverse).

A generator that collapses to a few modes (or memorises) gives high within-label MS-SSIM; compare with
the same figure on real images of that label.

MS-SSIM is torchmetrics' ``MultiScaleStructuralSimilarityIndexMeasure``. Its default 5 scales with an
11-tap Gaussian need images of about 160 px or more; torchmetrics checks
``size // (scales - 1)**2 > kernel - 1``. :func:`ms_ssim_settings` keeps the 11-tap, sigma 1.5 Gaussian
of Wang et al. (2003) and uses as many scales as fit (64 px: 3 scales at 64, 32, 16 px; 28 px: 2;
>= 176 px: all 5), with the first weights of Wang et al.'s ``(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)``
renormalised to sum to 1. Values are therefore comparable between images of the same size only.
``normalize="relu"`` (torchmetrics' default) clips negative contrast terms so unrelated images give
about 0 instead of NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from models.metrics.images import ImageBatch, check_images, check_labels, to_unit_float

WANG_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
KERNEL_SIZE = 11
SIGMA = 1.5


def ms_ssim_settings(size: int) -> dict[str, Any]:
    """Scales, weights (``betas``) and kernel that torchmetrics' MS-SSIM accepts for ``size x size`` images.

    Raises ``ValueError`` below 11 px, where not even one 11-tap scale fits.
    """
    scales = 0
    for n in range(len(WANG_BETAS), 0, -1):
        if size >= 2**n and size // max(1, n - 1) ** 2 > KERNEL_SIZE - 1:
            scales = n
            break
    if scales == 0:
        raise ValueError(f"images of {size} px are too small for MS-SSIM with an {KERNEL_SIZE}-tap kernel")
    raw = WANG_BETAS[:scales]
    betas = tuple(round(b / sum(raw), 6) for b in raw)
    return {"scales": scales, "betas": betas, "kernel_size": KERNEL_SIZE, "sigma": SIGMA}


def ms_ssim_pairs(images_a: ImageBatch, images_b: ImageBatch, batch_size: int = 128) -> torch.Tensor:
    """MS-SSIM of each pair ``(images_a[i], images_b[i])``, shape ``(N,)``; 1 for identical images."""
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure

    a = check_images(images_a, "images_a")
    b = check_images(images_b, "images_b")
    if a.shape != b.shape:
        raise ValueError(f"image pairs must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"MS-SSIM here expects square images, got {a.shape[-2]}x{a.shape[-1]}")
    s = ms_ssim_settings(int(a.shape[-1]))
    metric = MultiScaleStructuralSimilarityIndexMeasure(
        gaussian_kernel=True,
        sigma=s["sigma"],
        kernel_size=s["kernel_size"],
        betas=s["betas"],
        data_range=1.0,
        normalize="relu",
        reduction="none",
    )
    out = []
    with torch.inference_mode():
        for start in range(0, a.shape[0], batch_size):
            pa = to_unit_float(a[start : start + batch_size])
            pb = to_unit_float(b[start : start + batch_size])
            out.append(metric(pa, pb).reshape(-1).float())
    return torch.cat(out)


def sample_pairs(n: int, n_pairs: int, seed: int = 0) -> np.ndarray:
    """A seeded sample of ``n_pairs`` distinct unordered index pairs ``(i, j)``, ``i != j``, from ``range(n)``.

    All ``n (n - 1) / 2`` pairs when there are no more than ``n_pairs`` of them.
    """
    if n < 2:
        raise ValueError(f"need at least 2 images to form a pair, got {n}")
    total = n * (n - 1) // 2
    rng = np.random.default_rng(seed)
    if total <= max(2 * n_pairs, 200_000):  # enumerate all pairs and choose (small n)
        i, j = np.triu_indices(n, k=1)
        keep = np.arange(total) if total <= n_pairs else np.sort(rng.choice(total, size=n_pairs, replace=False))
        return np.stack([i[keep], j[keep]], axis=1).astype(np.int64)
    chosen: set[tuple[int, int]] = set()  # large n: rejection sampling, collisions are rare
    while len(chosen) < n_pairs:
        a, b = (int(v) for v in rng.integers(0, n, size=2))
        if a != b:
            chosen.add((min(a, b), max(a, b)))
    return np.array(sorted(chosen), dtype=np.int64)


def mean_pairwise_ms_ssim(images: ImageBatch, n_pairs: int = 500, seed: int = 0) -> dict[str, float | int]:
    """Mean (and std) MS-SSIM over a seeded sample of distinct image pairs of one set."""
    t = check_images(images)
    if n_pairs < 1:
        raise ValueError("n_pairs must be >= 1")
    pairs = sample_pairs(int(t.shape[0]), n_pairs, seed)
    idx_a, idx_b = torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
    values = ms_ssim_pairs(t[idx_a], t[idx_b])
    return {
        "ms_ssim_mean": round(float(values.mean()), 4),
        "ms_ssim_std": round(float(values.std()) if len(values) > 1 else 0.0, 4),
        "pairs": len(values),
    }


def diversity_by_label(
    images: ImageBatch,
    labels: np.ndarray | torch.Tensor | Sequence[int] | None,
    label_names: Sequence[str],
    n_pairs: int = 500,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Within-label mean pairwise MS-SSIM for each label (``labels=None``: one group ``"all"``).

    A label with fewer than two images gets ``{"skipped": reason}``.
    """
    t = check_images(images)
    if labels is None:
        return {"all": mean_pairwise_ms_ssim(t, n_pairs, seed)}
    lab = check_labels(np.asarray(labels), int(t.shape[0]))
    out: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(label_names):
        members = np.flatnonzero(lab == index)
        if len(members) < 2:
            out[name] = {"skipped": f"{len(members)} image(s) with this label; need 2"}
            continue
        out[name] = mean_pairwise_ms_ssim(t[torch.from_numpy(members)], n_pairs, seed + index)
    return out
