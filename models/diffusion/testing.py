"""Test helpers: a tiny real generator (trained in seconds on CPU) for unit and service tests.

Other packages' test fixtures use :func:`train_tiny_generator` to get a complete generator directory
(diffusers weights, ``cxrsynth.json``, training index, model card) without shipping test weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from models.diffusion.config import TrainingConfig
from models.diffusion.training import TrainingData, TrainingResult, train_generator

PNEUMONIAMNIST = Path("pneumoniamnist") / "pneumoniamnist_28.npz"
LABEL_NAMES = ("normal", "pneumonia")


def shared_data_dir() -> Path:
    """The real-data folder: ``$CXR_DATA_DIR``, default ``<repo>/../shared/data``."""
    env = os.environ.get("CXR_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def default_data_npz() -> Path | None:
    """PneumoniaMNIST in the shared data folder, or ``None`` when it is not there."""
    path = shared_data_dir() / PNEUMONIAMNIST
    return path if path.is_file() else None


def synthetic_training_data(n: int = 64, size: int = 28, seed: int = 0) -> TrainingData:
    """Labelled stand-in images (smooth random blobs) for tests that cannot reach the shared data.

    They are NOT chest X-rays: use them only where the image content does not matter (plumbing).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))
        images[i] = np.clip(blob * 255 * rng.uniform(0.6, 1.0), 0, 255).astype(np.uint8)
    labels = (np.arange(n) % 2).astype(np.int64)
    return TrainingData(images, labels, LABEL_NAMES, "synthetic blobs (test only)")


def tiny_training_data(data_npz: str | Path | None = None, num_images: int = 128) -> TrainingData:
    """A class-balanced slice of PneumoniaMNIST (train split), or synthetic blobs when absent.

    ``data_npz=None`` uses the shared PneumoniaMNIST if present; ``"synthetic"`` forces blobs.
    """
    from models.data.folders import load_pneumoniamnist

    path = default_data_npz() if data_npz is None else None if str(data_npz) == "synthetic" else Path(data_npz)
    if path is None:
        return synthetic_training_data(num_images)
    images, labels = load_pneumoniamnist(path, "train")
    half = num_images // 2
    idx = np.concatenate([np.flatnonzero(labels == 0)[:half], np.flatnonzero(labels == 1)[: num_images - half]])
    idx.sort()
    return TrainingData(images[idx], labels[idx], LABEL_NAMES, path.name)


def train_tiny_generator(
    out_dir: str | Path,
    data_npz: str | Path | None = None,
    steps: int = 20,
    num_images: int = 128,
    seed: int = 0,
    sample_grid: bool = False,
) -> Path:
    """Train and export a tiny 32 px class-conditional generator (normal / pneumonia) in seconds.

    The result is a real, loadable generator directory (its images are blurry blobs after so few
    steps). Returns ``out_dir``. See :func:`tiny_training_data` for ``data_npz``.
    """
    return train_tiny_generator_with_result(out_dir, data_npz, steps, num_images, seed, sample_grid)[0]


def train_tiny_generator_with_result(
    out_dir: str | Path,
    data_npz: str | Path | None = None,
    steps: int = 20,
    num_images: int = 128,
    seed: int = 0,
    sample_grid: bool = False,
) -> tuple[Path, TrainingResult]:
    """:func:`train_tiny_generator` that also returns the :class:`TrainingResult` (losses)."""
    data = tiny_training_data(data_npz, num_images)
    config = TrainingConfig.tiny(max_steps=steps, seed=seed)
    result = train_generator(data, out_dir, config, sample_grid=sample_grid)
    assert result.out_dir is not None
    return result.out_dir, result


def tiny_latent_training_data(data_npz: str | Path | None = None, num_images: int = 64,
                              resolution: int = 64) -> TrainingData:
    """:func:`tiny_training_data` upscaled (bicubic) to ``resolution`` px, for tiny latent generators.

    Patient ids are one per image, so the autoencoder's held-out split has whole "patients".
    """
    from PIL import Image

    from models.data.folders import resize_grey

    td = tiny_training_data(data_npz, num_images)
    images = np.stack([np.asarray(resize_grey(Image.fromarray(im, mode="L"), resolution)) for im in td.images])
    return TrainingData(images, td.labels, td.label_names, td.source, tuple(f"p{i}" for i in range(len(images))))


def train_tiny_latent_generator(
    out_dir: str | Path, data_npz: str | Path | None = None, ae_steps: int = 6, unet_steps: int = 8,
    num_images: int = 64, seed: int = 0,
) -> tuple[Path, TrainingResult]:
    """Train and export a tiny 64 px latent generator (autoencoder + UNet on 16 px latents) in seconds."""
    from models.diffusion.latent import LatentGeneratorConfig, train_latent_generator

    data = tiny_latent_training_data(data_npz, num_images)
    config = LatentGeneratorConfig.tiny(autoencoder={"max_steps": ae_steps, "seed": seed},
                                        max_steps=unet_steps, seed=seed)
    result = train_latent_generator(data, out_dir, config, sample_grid=False, device="cpu")
    assert result.out_dir is not None
    return result.out_dir, result
