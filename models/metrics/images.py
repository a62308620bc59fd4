"""Input checking shared by every metric: grey image batches as ``[0, 1]`` float tensors.

Metrics take what the generator and the folder readers produce, uint8 ``(N, H, W)`` arrays, and also
float tensors in ``[0, 1]`` (``(N, H, W)`` or ``(N, 1, H, W)``). Checking here once gives every metric
the same clear ``ValueError`` for empty, mis-shaped or out-of-range input.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import torch
import torch.nn.functional as F

ImageBatch: TypeAlias = np.ndarray | torch.Tensor
"""uint8 ``(N, H, W)`` / ``(N, 1, H, W)`` in ``[0, 255]``, or float of the same shapes in ``[0, 1]``."""

_FLOAT_TOLERANCE = 1e-3


def check_images(images: ImageBatch, name: str = "images") -> torch.Tensor:
    """Validate a grey image batch and return it as a tensor of shape ``(N, 1, H, W)`` (dtype kept).

    Raises ``ValueError`` for an empty batch, a shape other than ``(N, H, W)`` / ``(N, 1, H, W)``, a
    dtype other than uint8 or floating point, or float values outside ``[0, 1]`` (a ``[-1, 1]``
    diffusion output passed by mistake would silently skew every metric).
    """
    if not isinstance(images, np.ndarray | torch.Tensor):
        raise ValueError(f"{name}: expected a numpy array or torch tensor, got {type(images).__name__}")
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.ndim == 3:
        t = t.unsqueeze(1)
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"{name}: expected grey images (N, H, W) or (N, 1, H, W), got shape {tuple(images.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: empty batch (0 images)")
    if t.shape[2] < 2 or t.shape[3] < 2:
        raise ValueError(f"{name}: images of {t.shape[2]}x{t.shape[3]} pixels are too small")
    if t.dtype == torch.uint8:
        return t
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected uint8 or floating-point images, got {t.dtype}")
    lo, hi = float(t.min()), float(t.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    if lo < -_FLOAT_TOLERANCE or hi > 1.0 + _FLOAT_TOLERANCE:
        raise ValueError(f"{name}: float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return t


def to_unit_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` or float ``[0, 1]`` (N, 1, H, W) -> float32 in ``[0, 1]``."""
    if batch.dtype == torch.uint8:
        return batch.float().div_(255.0)
    return batch.float().clamp_(0.0, 1.0)


def resize_square(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Float (N, 1, H, W) -> (N, 1, size, size): zero-pad to square, then antialiased bilinear resize.

    Padding (not cropping or squashing) matches ``models.data.folders.resize_grey``'s default ``pad``
    mode, so arrays from the folder reader and from a generator are treated alike.
    """
    h, w = batch.shape[-2:]
    if h != w:
        s = max(h, w)
        top, left = (s - h) // 2, (s - w) // 2
        batch = F.pad(batch, (left, s - w - left, top, s - h - top))
    if batch.shape[-1] != size:
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return batch


def check_labels(labels: np.ndarray | torch.Tensor | list[int], n: int, name: str = "labels") -> np.ndarray:
    """Validate integer labels for ``n`` images and return them as an int64 numpy vector."""
    arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if arr.ndim != 1:
        arr = arr.reshape(-1) if arr.size == n else arr
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name}: expected {n} labels (one per image), got shape {tuple(arr.shape)}")
    if n and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{name}: expected integer class indices, got dtype {arr.dtype}")
    return arr.astype(np.int64)
