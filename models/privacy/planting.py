"""Planted copies and near-copies of training images: the proof that the memorisation gate works.

The test and the benchmark hide these among genuine synthetic images and count how many the gate
catches. Each perturbation imitates a way a diffusion model can reproduce a training image without
reproducing its bytes: a few pixels of shift, sensor-like noise, a contrast / brightness or gamma
change, a mirror image, and all of shift + noise + contrast at once. Parameters are drawn per image
from a seeded generator, so a run is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Perturbation = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate by (dy, dx) pixels; the uncovered border repeats the edge row / column."""
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return image.copy()
    h, w = image.shape
    p = np.pad(image, pad, mode="edge")
    return p[pad - dy : pad - dy + h, pad - dx : pad - dx + w].copy()


def random_shift(image: np.ndarray, rng: np.random.Generator, lo: int | None = None, hi: int | None = None
                 ) -> np.ndarray:
    """Shift by ``lo``..``hi`` pixels along the larger axis (and up to that along the other).

    The default is 2-4 px per 64 px of image side (7-14 px at 224 px): the same share of the anatomy at
    every resolution, as the gate's shift search scales too.
    """
    side = max(image.shape)
    lo = lo if lo is not None else max(1, round(2 * side / 64))
    hi = hi if hi is not None else max(lo, round(4 * side / 64))
    big = int(rng.integers(lo, hi + 1)) * int(rng.choice([-1, 1]))
    small = int(rng.integers(-abs(big), abs(big) + 1))
    dy, dx = (big, small) if rng.random() < 0.5 else (small, big)
    return shift(image, dy, dx)


def gaussian_noise(image: np.ndarray, rng: np.random.Generator, lo: float = 5.0, hi: float = 15.0) -> np.ndarray:
    """Add Gaussian noise with a standard deviation of ``lo``..``hi`` grey levels."""
    sigma = rng.uniform(lo, hi)
    return _u8(image.astype(np.float64) + rng.normal(0.0, sigma, image.shape))


def contrast_change(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scale contrast by 0.7-0.85 or 1.15-1.3 about mid-grey and shift brightness by up to 15 levels."""
    a = rng.uniform(0.7, 0.85) if rng.random() < 0.5 else rng.uniform(1.15, 1.3)
    b = rng.uniform(-15.0, 15.0)
    return _u8(128.0 + a * (image.astype(np.float64) - 128.0) + b)


def gamma_change(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply a gamma of 0.7-0.85 or 1.2-1.5 (a different window / display curve)."""
    g = rng.uniform(0.7, 0.85) if rng.random() < 0.5 else rng.uniform(1.2, 1.5)
    return _u8(255.0 * (image.astype(np.float64) / 255.0) ** g)


def horizontal_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror left-right (a heart on the wrong side is still a copy of the patient)."""
    return image[:, ::-1].copy()


def combined(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shift, then contrast change, then noise: the hardest near-copy planted."""
    return gaussian_noise(contrast_change(random_shift(image, rng), rng), rng)


PERTURBATIONS: dict[str, Perturbation] = {
    "exact copy": lambda image, rng: image.copy(),
    "shift 2-4 px": random_shift,
    "gaussian noise": gaussian_noise,
    "contrast/brightness": contrast_change,
    "gamma": gamma_change,
    "horizontal flip": horizontal_flip,
    "shift+contrast+noise": combined,
}


def plant_copies(
    train_images: np.ndarray, per_kind: int, seed: int = 0, kinds: list[str] | None = None
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Perturbed copies of randomly chosen training images, ``per_kind`` of each perturbation.

    Returns ``(images (M, H, W) uint8, kind of each, source training index of each)``. Raises
    ``ValueError`` for an unknown kind or more copies per kind than training images.
    """
    names = list(PERTURBATIONS) if kinds is None else kinds
    unknown = [k for k in names if k not in PERTURBATIONS]
    if unknown:
        raise ValueError(f"unknown perturbation(s) {unknown}; known: {list(PERTURBATIONS)}")
    if per_kind < 1 or per_kind > len(train_images):
        raise ValueError(f"per_kind must be in [1, {len(train_images)}], got {per_kind}")
    rng = np.random.default_rng(seed)
    out, out_kinds, sources = [], [], []
    for name in names:
        src = rng.choice(len(train_images), per_kind, replace=False)
        for i in src:
            out.append(PERTURBATIONS[name](np.asarray(train_images[i], dtype=np.uint8), rng))
            out_kinds.append(name)
            sources.append(int(i))
    return np.stack(out).astype(np.uint8), out_kinds, np.asarray(sources, dtype=np.int64)
