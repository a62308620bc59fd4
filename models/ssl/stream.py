"""Pretraining images streamed from WebDataset shards, in an order fixed by ``(seed, step)``: exact resume.

The order, as :class:`StreamOrder` defines it:

* epoch ``e`` is a permutation of all N samples; the global stream is epoch 0, 1, 2, ... end to end and
  batch ``s`` is its items ``s*B .. s*B+B-1`` (the same contract as
  :class:`~models.ssl.data.StepBatchSampler`, so the batch at step ``s`` never depends on where a run
  started);
* batches go to the T readers in turn (T = DataLoader workers, at least 1, times the
  ``torch.distributed`` world size), so in epoch ``e`` reader ``r`` needs a known number of samples;
* it takes them as one contiguous run of the epoch's shard sequence (the shards in an order drawn from
  ``(seed, e)``, the runs of readers ``0..T-1`` end to end): a reader opens only its own shards and the
  readers together read every sample exactly once per epoch;
* within its run a reader shuffles with webdataset's bounded buffer shuffle, seeded by ``(seed, e, r)``.

Resuming at step ``s`` recomputes where each reader stands and skips the samples before it undecoded
(whole epochs are not even opened). The order depends on the seed, the shard counts, B and T, all of
which a checkpoint's config pins.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from models.data.folders import AspectMode, resize_grey
from models.ssl.shards import ShardIndex, iter_samples, require_image

SHUFFLE_BUFFER = 1000  # raw samples a reader holds to shuffle its run (part of the order: keep it fixed)
_SHARD_ORDER_TAG = 0x5348  # keeps the shard permutation's seed apart from StepBatchSampler's


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from ``torch.distributed`` when it is initialised, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def items_before(position: int, reader: int, readers: int, batch_size: int) -> int:
    """How many of the global stream's first ``position`` items belong to ``reader``'s batches."""
    full, rest = divmod(position, batch_size * readers)
    return full * batch_size + min(max(rest - reader * batch_size, 0), batch_size)


@dataclass(frozen=True)
class StreamOrder:
    """Which samples each reader reads in each epoch, and in what order (see the module docstring).

    Hand-written rather than webdataset's ``split_by_worker``/``split_by_node``, which deal whole shards
    round-robin: readers then hold unequal sample counts, their epochs drift apart, and the batch at a
    step is no longer a function of the step alone.
    """

    counts: tuple[int, ...]
    batch_size: int
    readers: int
    seed: int

    @property
    def num_samples(self) -> int:
        """N, the samples of one epoch."""
        return sum(self.counts)

    def shard_order(self, epoch: int) -> np.ndarray:
        """The shard indices of ``epoch`` in reading order."""
        return np.random.default_rng([self.seed, epoch, _SHARD_ORDER_TAG]).permutation(len(self.counts))

    def share(self, epoch: int, reader: int) -> int:
        """How many samples ``reader`` reads in ``epoch``."""
        n = self.num_samples
        return (items_before((epoch + 1) * n, reader, self.readers, self.batch_size)
                - items_before(epoch * n, reader, self.readers, self.batch_size))

    def run(self, epoch: int, reader: int) -> list[tuple[int, int, int]]:
        """``reader``'s samples of ``epoch`` as ``(shard index, first, stop)`` segments in reading order."""
        start = sum(self.share(epoch, r) for r in range(reader))
        stop = start + self.share(epoch, reader)
        segments: list[tuple[int, int, int]] = []
        pos = 0
        for j in self.shard_order(epoch):
            if pos >= stop:
                break
            n = self.counts[j]
            lo, hi = max(start, pos), min(stop, pos + n)
            if lo < hi:
                segments.append((int(j), lo - pos, hi - pos))
            pos += n
        return segments

    def locate(self, reader: int, item: int) -> tuple[int, int]:
        """``(epoch, offset in that epoch's run)`` of ``reader``'s ``item``-th sample (counted from step 0)."""
        batch, within = divmod(item, self.batch_size)
        position = (batch * self.readers + reader) * self.batch_size + within
        epoch = position // self.num_samples
        return epoch, item - items_before(epoch * self.num_samples, reader, self.readers, self.batch_size)

    def rng(self, epoch: int, reader: int) -> random.Random:
        """The seeded generator of ``reader``'s buffer shuffle in ``epoch``."""
        state = np.random.SeedSequence([self.seed, epoch, reader, self.readers]).generate_state(2)
        return random.Random(int(state[0]) << 32 | int(state[1]))


def decode_grey(data: bytes, resolution: int, aspect_mode: AspectMode, where: str) -> torch.Tensor:
    """PNG/JPEG bytes -> ``(1, R, R)`` uint8, exactly as a folder image is read (``resize_grey``)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            grey = im.convert("L")
    except Exception as exc:  # PIL raises several types for corrupt files
        raise ValueError(f"not a readable image: {where} ({exc})") from exc
    pixels = np.asarray(resize_grey(grey, resolution, aspect_mode), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).unsqueeze(0)  # copy: PIL-backed arrays are read-only


class ShardStream(IterableDataset[Any]):
    """``(1, R, R)`` uint8 images (or ``(key, image)`` with ``with_keys``) of steps ``start_step ..
    total_steps - 1``, ``batch_size`` per step, from a :class:`~models.ssl.shards.ShardIndex`.

    Give it to a ``DataLoader`` with the same ``batch_size`` and ``num_workers`` (each worker yields whole
    batches; the loader takes them in turn). ``total_steps=None`` is one epoch. Images are decoded in the
    workers; skipped samples (before ``start_step``) never are.
    """

    def __init__(self, index: ShardIndex, resolution: int, aspect_mode: AspectMode = "pad", *,
                 batch_size: int = 1, seed: int = 0, start_step: int = 0, total_steps: int | None = None,
                 num_workers: int = 0, shuffle_buffer: int = SHUFFLE_BUFFER, with_keys: bool = False) -> None:
        super().__init__()
        if batch_size < 1 or start_step < 0 or num_workers < 0 or shuffle_buffer < 0:
            raise ValueError("batch_size must be >= 1; start_step, num_workers, shuffle_buffer >= 0")
        if total_steps is not None and total_steps < start_step:
            raise ValueError(f"total_steps {total_steps} < start_step {start_step}")
        self.index, self.resolution, self.aspect_mode = index, resolution, aspect_mode
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.start_step, self.total_steps = start_step, total_steps
        self.shuffle_buffer, self.with_keys = shuffle_buffer, with_keys

    def configured(self, **changes: Any) -> ShardStream:
        """A copy with some constructor arguments changed (validated again)."""
        args = {k: getattr(self, k) for k in ("resolution", "aspect_mode", "batch_size", "seed", "start_step",
                                              "total_steps", "num_workers", "shuffle_buffer", "with_keys")}
        args.update(changes)
        return ShardStream(self.index, **args)

    def _reader_samples(self, order: StreamOrder, reader: int, item: int) -> Iterator[dict[str, Any]]:
        """``reader``'s raw samples from its ``item``-th on, epoch after epoch (endless)."""
        epoch, skip = order.locate(reader, item)
        while True:
            raw = self._run_samples(order.run(epoch, reader))
            if self.shuffle_buffer > 1:
                raw = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=order.rng(epoch, reader))(raw)
            yield from islice(raw, skip, None)  # skipped samples are never decoded
            skip = 0
            epoch += 1

    def _run_samples(self, segments: list[tuple[int, int, int]]) -> Iterator[dict[str, Any]]:
        src, shards, counts = self.index.source, self.index.shards, self.index.counts
        for j, lo, hi in segments:
            # Each shard is read to its end, so a short or damaged one is always reported.
            for i, sample in enumerate(iter_samples(src, shards[j], counts[j])):
                if lo <= i < hi:
                    yield sample

    def _decode(self, sample: dict[str, Any]) -> torch.Tensor:
        key, where = sample["__key__"], sample["__url__"]
        ext = require_image(sample, key, where)
        return decode_grey(sample[ext], self.resolution, self.aspect_mode, f"{where}:{key}.{ext}")

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != max(1, self.num_workers):
            raise ValueError(f"this ShardStream was set up for num_workers={self.num_workers}, "
                             f"the DataLoader runs {workers}")
        rank, world = distributed_rank()
        b = self.batch_size
        total = self.total_steps if self.total_steps is not None else -(-self.index.num_samples // (b * world))
        first = self.start_step + worker  # the loader takes worker 0's batch first, whatever the start
        n_batches = len(range(first, total, workers))
        if n_batches == 0:
            return
        order = StreamOrder(self.index.counts, b, workers * world, self.seed)
        reader = rank + world * (first % workers)  # the reader of global batch first * world + rank
        for sample in islice(self._reader_samples(order, reader, (first // workers) * b), n_batches * b):
            image = self._decode(sample)
            yield (sample["__key__"], image) if self.with_keys else image
