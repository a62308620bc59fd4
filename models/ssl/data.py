"""Pretraining data: an image folder, a uint8 array, a torch Dataset or WebDataset shards, as uint8 batches.

Small sets are decoded into RAM once (fast, no worker processes); large ones (e.g. 100k synthetic
images at 224 px) stream from disk through a ``DataLoader``. The batch order is a pure function of
``(seed, step)`` (:class:`StepBatchSampler`), so a resumed run reads exactly the batches the
uninterrupted run would have read, whatever the number of loader workers.

WebDataset shards (a folder, the export layout with ``shards/``, ``s3://bucket/prefix/`` or any
:class:`~models.ssl.shards.ShardSource`) are never loaded whole: :class:`~models.ssl.stream.ShardStream`
streams them in an order that is also fixed by ``(seed, step)`` (for a given number of workers).
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
from torch.utils.data import DataLoader, Dataset, Sampler

from models.data.folders import AspectMode, images_to_array, list_image_folder, load_grey, resize_grey
from models.distributed import World, check_global_batch, shard_rows
from models.ssl.shards import SHARD_SUFFIX, SHARDS_DIR, LocalShards, S3Shards, ShardIndex, ShardSource, index_shards
from models.ssl.stream import ShardStream

PretrainData = str | Path | np.ndarray | Dataset[Any] | ShardSource


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


def shard_source(data: object) -> ShardSource | None:
    """The shard source ``data`` names, or ``None`` when it is not shards.

    Shards: a :class:`ShardSource`, an ``s3://`` URL (credentials from the AWS environment variables,
    :meth:`S3Shards.from_env`), or a folder holding ``*.tar`` files or a ``shards/`` folder.
    """
    if isinstance(data, ShardSource):
        return data
    if isinstance(data, str) and data.startswith("s3://"):
        return S3Shards.from_env(data)
    if isinstance(data, str | Path):
        root = Path(data)
        if root.is_dir() and (any(root.glob("*" + SHARD_SUFFIX)) or (root / SHARDS_DIR).is_dir()):
            return LocalShards(root)
    return None


def shard_summary(index: ShardIndex, resolution: int) -> DataSummary:
    """The :class:`DataSummary` of indexed shards (labels from the manifest or the samples' ``.json``/``.cls``)."""
    return DataSummary(index.source.name, index.num_samples, resolution, dict(index.labels))


def pretraining_dataset(
    data: PretrainData,
    resolution: int,
    aspect_mode: AspectMode = "pad",
    cache_limit_mb: int = 512,
) -> tuple[Dataset[torch.Tensor], DataSummary]:
    """A dataset of ``(1, R, R)`` uint8 tensors and its summary, from a folder, an array, a Dataset or shards.

    Folders may be ImageFolder (labels are counted for the model card, never used) or loose images.
    A folder whose decoded pixels fit in ``cache_limit_mb`` is loaded into RAM once; otherwise it is
    streamed. A user ``Dataset`` must already yield ``(1, R, R)`` or ``(R, R)`` uint8 images.
    WebDataset shards (see :func:`shard_source`) give a :class:`ShardStream`, whatever their size.
    """
    source = shard_source(data)
    if source is not None:
        index = index_shards(source)  # raises on no shards, no samples or a damaged shard
        return ShardStream(index, resolution, aspect_mode), shard_summary(index, resolution)
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
    ``e`` shuffled by ``numpy.random.default_rng([seed, e])``. That is what makes resuming exact.

    In a distributed run ``batch_size`` is the global batch and each rank iterates over its rows
    ``rank::world`` of it (:func:`models.distributed.shard_rows`): every sample is read once per epoch
    across the ranks, and a resumed run may have another world size."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, total_steps: int,
                 w: World | None = None) -> None:
        if n <= 0:
            raise ValueError("cannot sample from an empty set")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.world = w or World()
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
            yield shard_rows(self.batch(step), self.world)


def pretraining_loader(
    dataset: Dataset[torch.Tensor], batch_size: int, seed: int, start_step: int, total_steps: int,
    num_workers: int = 0, pin_memory: bool = False, w: World | None = None,
) -> DataLoader[Any]:
    """Batches of steps ``start_step .. total_steps - 1``; batch ``s`` depends only on ``(seed, s)``.

    Map-style data goes through :class:`StepBatchSampler`; a :class:`ShardStream` is set up for the same
    steps and workers (see :mod:`models.ssl.stream`). Either way a resumed run reads the batches the
    uninterrupted run would have read. ``batch_size`` is the global batch; in a distributed run (``w``)
    each rank gets its share: its rows of each global batch, or for a stream its own shard readers
    (``rank + world * worker``), so a stream resumes exactly only with the same world size.
    """
    w = w or World()
    local = check_global_batch(batch_size, w)
    # Its own generator: a DataLoader otherwise draws a base seed from the global RNG, which
    # would shift the augmentation draws of a resumed run.
    generator = torch.Generator().manual_seed(seed)
    if isinstance(dataset, ShardStream):
        stream = dataset.configured(batch_size=local, seed=seed, start_step=start_step,
                                    total_steps=total_steps, num_workers=num_workers)
        return DataLoader(stream, batch_size=local, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=False, generator=generator)
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, total_steps, w)  # type: ignore[arg-type]
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=False, generator=generator,
    )
