"""Radial power spectrum of grey images: how much fine detail (ribs, vessel edges) an image set keeps.

Upscaled 64 px images have no power above 32 cycles per image by construction; a 224-256 px generator
should match real images' share of power above that. ``numpy.fft`` / ``torch.fft`` give the spectrum;
none of our libraries ships the radial high-frequency share itself, hence these few lines.
"""

from __future__ import annotations

import numpy as np
import torch


def radial_frequency(size: int) -> torch.Tensor:
    """(size, size // 2 + 1) radius of each rfft2 bin in cycles per image."""
    fy = torch.fft.fftfreq(size) * size
    fx = torch.fft.rfftfreq(size) * size
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def high_frequency_share(images_u8: np.ndarray, cutoff: float = 40.0, batch_size: int = 64) -> float:
    """Share of the (mean-removed) spectral power above ``cutoff`` cycles per image, over a set.

    Images are (N, H, W) uint8, square. Each image's mean is removed (the DC term says nothing about
    detail); powers are summed over the set, so the share is a power-weighted average.
    """
    x_all = np.asarray(images_u8)
    if x_all.ndim != 3 or x_all.shape[1] != x_all.shape[2] or len(x_all) == 0:
        raise ValueError(f"need (N, H, W) square images, got {x_all.shape}")
    radius = radial_frequency(x_all.shape[1])
    mask = radius > cutoff
    high = total = 0.0
    for s in range(0, len(x_all), batch_size):
        x = torch.from_numpy(x_all[s : s + batch_size].astype(np.float32) / 255.0)
        x = x - x.mean(dim=(1, 2), keepdim=True)
        power = torch.fft.rfft2(x).abs().pow(2)
        # rfft2 stores each column of the half-plane once, except the 0 and Nyquist columns: weight the rest x2
        weight = torch.full((power.shape[-1],), 2.0)
        weight[0] = 1.0
        if x_all.shape[2] % 2 == 0:
            weight[-1] = 1.0
        power = power * weight
        high += float(power[:, mask].sum())
        total += float(power.sum())
    return high / total if total > 0 else 0.0
