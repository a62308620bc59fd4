"""Pretraining data: any image folder, a uint8 array or a torch Dataset, served as uint8 batches.

Small sets are decoded into RAM once (fast, no worker processes); large ones (e.g. 100k synthetic
images at 224 px) stream from disk through a ``DataLoader``. The batch order is a pure function of
``(seed, step)`` (:class:`StepBatchSampler`), so a resumed run reads exactly the batches the
uninterrupted run would have read, whatever the number of loader workers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from models.data.folders import AspectMode, images_to_array, list_image_folder, load_grey, resize_grey


@dataclass(frozen=True)
class DataSummary:
    """What a pretraining set was, for checkpoints and the model card (never the images)."""

    source: str
    num_images: int
    resolution: int
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


class FolderImages(Dataset[torch.Tensor]):
    """Images on disk, decoded lazily to ``(1, R, R)`` uint8 tensors (``load_grey`` + aspect handling)."""

    def __init__(self, paths: Sequence[str | Path], resolution: int, aspect_mode: AspectMode = "pad") -> None:
        self.paths = [Path(p) for p in paths]
        self.resolution = resolution
        self.aspect_mode: AspectMode = aspect_mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        # copy: PIL-backed arrays are read-only, torch wants writable memory
        return torch.from_numpy(load_grey(self.paths[i], self.resolution, self.aspect_mode).copy()).unsqueeze(0)


class ArrayImages(Dataset[torch.Tensor]):
    """An in-memory ``(N, R, R)`` uint8 array as ``(1, R, R)`` tensors (batched ``__getitems__``)."""

    def __init__(self, images: np.ndarray) -> None:
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W) uint8, got {images.shape} {images.dtype}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].unsqueeze(0)

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        return list(self.images[torch.as_tensor(indices)].unsqueeze(1))


def resize_array(images: np.ndarray, resolution: int, aspect_mode: AspectMode = "pad") -> np.ndarray:
    """Resize (N, H, W) uint8 images (e.g. 28 px PneumoniaMNIST) to ``resolution`` with ``resize_grey``."""
    if images.shape[1:] == (resolution, resolution):
        return images
    return np.stack(
        [np.asarray(resize_grey(Image.fromarray(im, mode="L"), resolution, aspect_mode)) for im in images]
    )


def pretraining_dataset(
    data: str | Path | np.ndarray | Dataset[Any],
    resolution: int,
    aspect_mode: AspectMode = "pad",
    cache_limit_mb: int = 512,
) -> tuple[Dataset[torch.Tensor], DataSummary]:
    """A dataset of ``(1, R, R)`` uint8 tensors and its summary, from a folder, an array or a Dataset.

    Folders may be ImageFolder (labels are counted for the model card, never used) or loose images.
    A folder whose decoded pixels fit in ``cache_limit_mb`` is loaded into RAM once; otherwise it is
    streamed. A user ``Dataset`` must already yield ``(1, R, R)`` or ``(R, R)`` uint8 images.
    """
    if isinstance(data, np.ndarray):
        if data.ndim != 3 or data.dtype != np.uint8:
            raise ValueError(f"an image array must be (N, H, W) uint8, got {data.shape} {data.dtype}")
        if len(data) == 0:
            raise ValueError("the pretraining set is empty")
        arr = resize_array(data, resolution, aspect_mode)
        return ArrayImages(arr), DataSummary("in-memory array", len(arr), resolution)
    if isinstance(data, str | Path):
        records = list_image_folder(data)  # raises on a missing or empty folder
        counts = dict(sorted(Counter(r.label or "unlabelled" for r in records).items()))
        summary = DataSummary(Path(data).name, len(records), resolution, counts)
        paths = [r.path for r in records]
        if len(paths) * resolution * resolution <= cache_limit_mb * 1024 * 1024:
            return ArrayImages(images_to_array(paths, resolution, aspect_mode, threads=2)), summary  # type: ignore[arg-type]
        return FolderImages(paths, resolution, aspect_mode), summary
    if isinstance(data, Dataset):
        n = len(data)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("the pretraining set is empty")
        first = torch.as_tensor(np.asarray(data[0]))
        if first.dtype != torch.uint8 or first.shape[-2:] != (resolution, resolution):
            raise ValueError(
                f"a Dataset must yield uint8 images of {resolution}x{resolution}, "
                f"got {tuple(first.shape)} {first.dtype}"
            )
        return _AsChannelFirst(data), DataSummary(type(data).__name__, n, resolution)
    raise TypeError(f"unsupported pretraining data: {type(data).__name__}")


class _AsChannelFirst(Dataset[torch.Tensor]):
    """Wrap a user dataset so every item is a ``(1, R, R)`` uint8 tensor."""

    def __init__(self, inner: Dataset[Any]) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(self.inner[i]))
        return x if x.ndim == 3 else x.unsqueeze(0)


class StepBatchSampler(Sampler[list[int]]):
    """Batches of indices for steps ``start_step .. total_steps - 1``; batch ``s`` depends only on
    ``(seed, s)``: positions ``s*B .. s*B+B-1`` of the concatenation of per-epoch permutations, epoch
    ``e`` shuffled by ``numpy.random.default_rng([seed, e])``. That is what makes resuming exact."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, total_steps: int) -> None:
        if n <= 0:
            raise ValueError("cannot sample from an empty set")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self._epoch = -1
        self._perm = np.arange(n)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._perm

    def batch(self, step: int) -> list[int]:
        """The indices of the batch at ``step``."""
        out: list[int] = []
        pos = step * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(pos, self.n)
            take = min(self.batch_size - len(out), self.n - offset)
            out.extend(int(i) for i in self._permutation(epoch)[offset : offset + take])
            pos += take
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            yield self.batch(step)
