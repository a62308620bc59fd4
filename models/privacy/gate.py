"""The memorisation gate: is a generated image closer to a training image than real images ever are?

:class:`MemorisationGate` scores images against a generator's privacy index (see
:mod:`models.privacy.scoring`) and rejects those above either calibrated threshold, or whose pixels
are byte-identical to a training image. The generation worker replaces a rejected image by a new seed;
the CLI's ``privacy-check`` uses the same gate to audit any folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.privacy.embedding import Embedder
from models.privacy.index import (
    PrivacyCalibration,
    PrivacyIndex,
    embedder_for_index,
    image_digests,
    load_privacy_index,
)
from models.privacy.scoring import score_images


@dataclass(frozen=True)
class GateResult:
    """Per image: nearest training image and similarity in each space, and the verdict."""

    pixel_similarity: np.ndarray  # (N,) float32
    pixel_neighbour: np.ndarray  # (N,) int64 row of the privacy index
    embedding_similarity: np.ndarray
    embedding_neighbour: np.ndarray
    exact_copy: np.ndarray  # (N,) bool: byte-identical to a training image at the training resolution
    passed: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.passed)

    def record(self, i: int) -> dict[str, Any]:
        """JSON-ready verdict of image ``i``."""
        return {"nn_pixel_similarity": round(float(self.pixel_similarity[i]), 6),
                "nn_pixel_index": int(self.pixel_neighbour[i]),
                "nn_embedding_similarity": round(float(self.embedding_similarity[i]), 6),
                "nn_embedding_index": int(self.embedding_neighbour[i]),
                "exact_copy": bool(self.exact_copy[i]), "passed": bool(self.passed[i])}


class MemorisationGate:
    """Thresholded nearest-neighbour test of generated images against a generator's training set."""

    def __init__(self, index: PrivacyIndex, calibration: PrivacyCalibration, embedder: Embedder,
                 device: str = "cpu") -> None:
        self.index = index
        self.calibration = calibration
        self.embedder = embedder
        self.device = device
        self._train_sha = {bytes.fromhex(h) for h in index.sha256}

    @classmethod
    def from_generator_dir(cls, generator_dir: str | Path, device: str = "auto") -> MemorisationGate:
        """Load the privacy index, calibration and embedding network of a generator.

        Raises :class:`~models.privacy.index.PrivacyIndexMissing` when the generator has no index and
        :class:`~models.privacy.embedding.EmbeddingMismatch` when its network changed.
        """
        index, calibration = load_privacy_index(generator_dir)
        embedder = embedder_for_index(index, device=device)
        search_device = "cuda" if device != "cpu" and _cuda() else "cpu"
        return cls(index, calibration, embedder, device=search_device)

    @property
    def thresholds(self) -> dict[str, float]:
        """``{"pixel": ..., "embedding": ...}``: an image above either is rejected."""
        return {"pixel": self.calibration.pixel_threshold, "embedding": self.calibration.embedding_threshold}

    def check(self, images: np.ndarray) -> GateResult:
        """Score uint8 ``(N, R, R)`` images (R = the index resolution) and decide pass / reject."""
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 (N, H, W) images, got {images.dtype} {images.shape}")
        if images.shape[1:] != (self.index.resolution, self.index.resolution):
            raise ValueError(f"images are {images.shape[1]}x{images.shape[2]}; the privacy index is at "
                             f"{self.index.resolution}x{self.index.resolution}")
        sc = score_images(images, self.index.pixel, self.index.embedding, self.embedder, self.index.space,
                          device=self.device)
        exact = np.array([bytes(row) in self._train_sha for row in image_digests(images)], dtype=bool)
        passed = ((sc.pixel <= self.calibration.pixel_threshold)
                  & (sc.embedding <= self.calibration.embedding_threshold) & ~exact)
        return GateResult(sc.pixel, sc.pixel_index, sc.embedding, sc.embedding_index, exact, passed)


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())
