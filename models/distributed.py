"""Data-parallel training over several processes: ``torch.distributed`` (DDP) launched by ``torchrun``.

Generator training and SSL pretraining run unchanged in one process. Launched by ``torchrun``
(``torch.distributed.run``, see :func:`torchrun_command` and :mod:`models.launch`), every rank runs the
same loop with these rules, so a run of N ranks at global batch B follows one process at batch B:

* the batch size in the config is the *global* batch; every rank draws the same global batch of
  indices and random numbers (noise, timesteps, augmentation parameters) from the same seeded
  generators, then keeps its rows ``rank::world`` (:func:`shard_rows`): the data split is the
  DistributedSampler's strided split, and the randomness a sample gets does not depend on the world size;
* gradients are averaged by ``DistributedDataParallel`` (NCCL on GPUs, gloo on CPUs), so the
  optimiser, gradient clipping, LR schedule, EMA and DINO teacher see the same numbers on every rank;
  the DINO centre is all-reduced by lightly, SimCLR gathers negatives from every rank (lightly's
  ``gather_distributed``); batch norm is synchronised on GPUs (``SyncBatchNorm``; torch has none on CPU);
* rank 0 alone reports progress, writes checkpoints (:func:`models.checkpoints.save_checkpoint_atomic`
  checks it) and exports; every rank reads the checkpoint on resume, so the checkpoint folder must be
  one every rank sees (the same disk, or a shared file system across machines). A checkpoint holds
  global state only, so a run may resume with another world size;
* a cancel seen by rank 0 stops every rank at the same step (:func:`agree`).

Nothing here replaces torch's engine: process groups, gradient all-reduce, rendezvous and failure
handling are torch's; this module holds the few rules above that make our loops world-size invariant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

# Long enough for a rank that resumes a large checkpoint or builds a dataset cache while the others
# wait in the first collective; torch's defaults are 10 min (NCCL) and 30 min (gloo).
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    """This process's place in a run: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on rank 0, the rank that reports, checkpoints and exports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains together."""
        return self.size > 1


def world() -> World:
    """The current world: from ``torch.distributed`` when a process group is up, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def launched_by_torchrun() -> bool:
    """True in a process ``torchrun`` started (it sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_from_env(device: str = "auto") -> tuple[World, str]:
    """Join the process group ``torchrun`` describes; this rank's world and device string.

    NCCL when the ranks train on CUDA (each on GPU ``LOCAL_RANK`` of the ones it may see), gloo on CPU.
    Outside torchrun it is a no-op returning a single-process world and ``device`` unchanged.
    """
    if not launched_by_torchrun():
        return World(), device
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return world(), device


def shutdown(barrier: bool = False) -> None:
    """Leave the process group (no-op when none is up).

    ``barrier=True`` (every rank finished its work the same way): wait for all ranks first, so no rank tears
    down its gloo connections while a peer still uses them; gloo's transport thread aborts the peer
    (``terminate called after throwing gloo::IoException``) when that happens. Never after a failure: a
    barrier with a dead peer would wait out the process-group timeout.
    """
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def check_global_batch(batch_size: int, w: World, what: str = "batch_size") -> int:
    """The per-rank batch of a global ``batch_size``; ``ValueError`` unless the world size divides it."""
    if batch_size % w.size:
        raise ValueError(f"{what}={batch_size} is the global batch: it must be a multiple of the "
                         f"{w.size} ranks (each rank takes an equal share)")
    return batch_size // w.size


def shard_rows(x: T, w: World) -> T:
    """This rank's rows ``rank::size`` of a global batch (a tensor, array or list); all rows for one process.

    The strided split is the one ``torch.utils.data.DistributedSampler`` uses; applied to the batch's
    indices and to every random draw made for the global batch, it gives each sample the same data and
    the same randomness whatever the world size.
    """
    if not w.distributed:
        return x
    return x[w.rank :: w.size]  # type: ignore[index]


def wrap_ddp(module: nn.Module, dev: torch.device, w: World) -> nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` (its forward syncs the gradients); itself alone.

    Batch norm becomes ``SyncBatchNorm`` on CUDA, so its statistics cover the global batch as in one
    process; torch implements no SyncBatchNorm on CPU, where gloo ranks keep per-rank statistics.
    """
    if not w.distributed:
        return module
    if dev.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    device_ids = [dev.index] if dev.type == "cuda" and dev.index is not None else None
    # forward_sync_buffers=False: buffers (batch-norm running statistics, the DINO centre) are either
    # updated identically on every rank or are per-rank by nature; broadcasting them every step would
    # make rank 0's batch statistics overwrite the others' for no gain.
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)


def agree(loss: float, stop: bool, w: World, dev: torch.device) -> tuple[float, bool]:
    """The mean of ``loss`` over the ranks and whether any rank asked to stop, in one all-reduce.

    Every rank calls it once per step: rank 0 passes ``stop=True`` when its progress callback raised
    :class:`~models.callbacks.Canceled`, and every rank then checkpoints and stops at the same step.
    """
    if not w.distributed:
        return loss, stop
    t = torch.tensor([loss, 1.0 if stop else 0.0], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return float(t[0]) / w.size, bool(t[1] > 0)


def broadcast_from_main(obj: T, w: World) -> T:
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    if not w.distributed:
        return obj
    box: list[Any] = [obj if w.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[no-any-return]
