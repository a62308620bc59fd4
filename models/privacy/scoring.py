"""How close an image is to a training set, in pixel space and in embedding space.

One scoring function serves both the calibration (real images against the training set) and the gate
(synthetic images against the training set), so a threshold taken from one applies to the other.

Pixel similarity
    Normalised cross-correlation (NCC) of intensity-normalised, downsampled images: each image is cut
    to its centre crop (a margin of ``resolution / 16`` pixels, 4 at 64 px), area-averaged to 14x14,
    made zero-mean and unit-length, so the dot product of two vectors is their Pearson correlation,
    unchanged by brightness or contrast. 14x14 keeps the anatomy (ribs, heart border, diaphragm) and
    averages away noise. A memorised image may come out shifted or mirrored, so the query's crop
    window is slid over every offset within the margin (81 positions at 64 px) in both orientations,
    and the highest correlation counts: the window that undoes a shift of up to 4 px sees exactly the
    training crop again. Measured on Kermany (``docs/results/privacy_gate.md``): with the same calibration,
    a plain whole-image 32x32 NCC catches 1% of 2-4 px shifted copies and 0% of mirrored ones; the
    aligned comparison catches all of them.

Embedding similarity
    Cosine similarity of network features (see :mod:`models.privacy.embedding`), centred on the
    training mean and projected on its top principal components (at most 128, stored fp16 in the
    index), the query taken in both orientations.

Exact search over the whole training set (see :mod:`models.privacy.search` for cost and what to use
at 10^6 images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.privacy.embedding import Embedder
from models.privacy.search import nearest_neighbours

PIXEL_SIZE = 14
QUERY_IMAGES = 32  # query images per block of shifted variants (bounds memory: 32 x 162 x 196 floats)


def crop_margin(resolution: int) -> int:
    """Margin cut from each side before the pixel comparison; also the largest shift searched."""
    return max(1, round(resolution / 16))


def shift_step(resolution: int) -> int:
    """Stride of the shift search: 1 px up to 64 px images, coarser above (the 14x14 pooling tolerates it)."""
    return max(1, resolution // 64)


def _unit_float(images: np.ndarray) -> torch.Tensor:
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 (N, H, W) images, got {images.dtype} {images.shape}")
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"expected square images, got {images.shape[1]}x{images.shape[2]}")
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)


def _normalise(v: torch.Tensor) -> torch.Tensor:
    v = v - v.mean(-1, keepdim=True)
    return F.normalize(v, dim=-1)


def _pooled_windows(x: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """Centre-crop windows of ``x`` (N, 1, R, R) shifted by ``offsets``, each area-averaged to 14x14:
    ``(N, len(offsets), 196)``, not yet normalised.

    When the crop is a whole multiple of 14 (56 px at 64, 28 at 32, 112 at 128) every k x k block mean
    at every position comes from one ``avg_pool2d`` with stride 1, and each window is a strided view of
    it: 81 windows cost about one pooling instead of 81. Other sizes pool each window (same maths).
    """
    r = x.shape[-1]
    m = crop_margin(r)
    c = r - 2 * m
    k, rest = divmod(c, PIXEL_SIZE)
    if rest == 0:
        blocks = F.avg_pool2d(x, k, stride=1)  # mean of the k x k block starting at each pixel
        span = k * PIXEL_SIZE
        views = [blocks[:, 0, m + dy : m + dy + span : k, m + dx : m + dx + span : k] for dy, dx in offsets]
    else:
        views = [F.adaptive_avg_pool2d(x[:, :, m + dy : m + dy + c, m + dx : m + dx + c], PIXEL_SIZE)[:, 0]
                 for dy, dx in offsets]
    return torch.stack(views, dim=1).flatten(2)


def pixel_vectors(images: np.ndarray) -> torch.Tensor:
    """Index-side pixel features: centre crop, 14x14, zero mean, unit length; float32 ``(N, 196)``."""
    return _normalise(_pooled_windows(_unit_float(images), [(0, 0)]))[:, 0]


def pixel_query_vectors(images: np.ndarray) -> torch.Tensor:
    """Query-side pixel features: every shifted crop window in both orientations, ``(N, V, 196)``."""
    x = _unit_float(images)
    r = x.shape[-1]
    m, step = crop_margin(r), shift_step(r)
    offsets = [(dy, dx) for dy in range(-m, m + 1, step) for dx in range(-m, m + 1, step)]
    both = torch.cat([_pooled_windows(x, offsets), _pooled_windows(torch.flip(x, dims=[-1]), offsets)], dim=1)
    return _normalise(both)


@dataclass(frozen=True)
class EmbeddingSpace:
    """Centring and PCA projection of raw network features into the index's embedding space."""

    mean: torch.Tensor  # (D,)
    projection: torch.Tensor  # (D, k)

    @classmethod
    def fit(cls, features: torch.Tensor, max_dims: int = 128) -> EmbeddingSpace:
        """Principal axes of the training features (k = min(max_dims, D, N - 1), at least 1)."""
        mean = features.mean(0)
        k = max(1, min(max_dims, features.shape[1], features.shape[0] - 1))
        _, _, v = torch.linalg.svd(features - mean, full_matrices=False)
        return cls(mean, v[:k].T.contiguous())

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize((features.float() - self.mean) @ self.projection, dim=1)


@dataclass(frozen=True)
class Scores:
    """Per query image: nearest training row and similarity in each space."""

    pixel: np.ndarray  # (Q,) float32
    pixel_index: np.ndarray  # (Q,) int64
    embedding: np.ndarray
    embedding_index: np.ndarray


def score_images(
    images: np.ndarray,
    train_pixel: np.ndarray | torch.Tensor,
    train_embedding: np.ndarray | torch.Tensor,
    embedder: Embedder,
    space: EmbeddingSpace,
    *,
    query_groups: np.ndarray | None = None,
    train_groups: np.ndarray | None = None,
    device: str | torch.device = "cpu",
) -> Scores:
    """Nearest training image of each query in pixel space (aligned NCC) and embedding space.

    ``query_groups`` / ``train_groups`` (see :func:`models.privacy.search.nearest_neighbours`) skip
    pairs that share a key: the calibration uses them to leave out the image itself, its patient and
    its exact duplicates.
    """
    n = len(images)
    pix_sim = np.empty(n, dtype=np.float32)
    pix_idx = np.empty(n, dtype=np.int64)
    for s in range(0, n, QUERY_IMAGES):
        block = images[s : s + QUERY_IMAGES]
        q = pixel_query_vectors(block)  # (B, V, D)
        b, v, d = q.shape
        groups = None if query_groups is None else np.repeat(query_groups[s : s + b], v, axis=0)
        nn = nearest_neighbours(q.reshape(b * v, d), train_pixel, query_groups=groups, index_groups=train_groups,
                                device=device)
        sims = torch.from_numpy(nn.similarity).reshape(b, v)
        best = sims.argmax(dim=1)
        rows = torch.arange(b)
        pix_sim[s : s + b] = sims[rows, best].numpy()
        pix_idx[s : s + b] = nn.index.reshape(b, v)[rows.numpy(), best.numpy()]
    emb_sim = np.full(n, -np.inf, dtype=np.float32)
    emb_idx = np.full(n, -1, dtype=np.int64)
    for oriented in (images, np.ascontiguousarray(images[:, :, ::-1])):
        nn = nearest_neighbours(space(embedder(oriented)), train_embedding, query_groups=query_groups,
                                index_groups=train_groups, device=device)
        better = nn.similarity > emb_sim
        emb_sim = np.where(better, nn.similarity, emb_sim)
        emb_idx = np.where(better, nn.index, emb_idx)
    return Scores(pix_sim, pix_idx, emb_sim.astype(np.float32), emb_idx.astype(np.int64))
