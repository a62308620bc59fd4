"""Training jobs that ask for ``gpus: N > 1``: run over this worker's devices with torchrun.

``cxrsynth worker --gpus 0,1,2,3`` starts one Celery process per GPU (single-GPU work: generation shards,
evaluations, one-GPU training) and one multi-GPU process on the ``gpus`` queue with ``worker_gpus`` set
to the list. That process runs a job's training through :func:`models.launch.launch`: torchrun starts
N ranks on the first N listed devices; rank 0 reports progress (relayed to the job and its cancel
flag) and checkpoints into the job's checkpoint folder, on this machine's disk.

The GPUs are shared with the per-GPU processes through file leases (:func:`gpu_leases`, ``fcntl``
locks under ``data_dir/gpu-leases``): a per-GPU process holds its device's lease while it runs a GPU task
(:func:`hold_worker_gpu`), a multi-GPU job takes the leases of its devices in ascending order, so the two
never train on one GPU at the same time and cannot deadlock.

A rank that fails (killed, out of memory, a lost machine) fails the torchrun run with its report; the
job keeps its checkpoint and runs again from it while it has deliveries left (``max_task_attempts``),
then fails with the report.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.devices import LEASED_GPU_ENV, worker_devices
from app.core.queue import TASK_RUN_MULTI_GPU_JOB
from app.db.orm import Encoder, Generator, Job
from models.callbacks import OnStep
from worker.runtime import WorkerContext, load_job, mark_failed, record_event


def _lease_path(settings: Settings, gpu: str) -> Path:
    folder = settings.data_dir / "gpu-leases"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"gpu{gpu}.lock"


@contextmanager
def gpu_leases(settings: Settings, gpus: tuple[str, ...]) -> Iterator[None]:
    """Hold the leases of ``gpus`` (ascending order: no deadlock); blocks while another process holds one."""
    with ExitStack() as stack:
        for gpu in sorted(gpus, key=int):
            fh = stack.enter_context(open(_lease_path(settings, gpu), "a+"))
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released when the file closes
        yield


@contextmanager
def hold_worker_gpu(settings: Settings) -> Iterator[None]:
    """In a per-GPU process of ``cxrsynth worker --gpus``: hold its device's lease; elsewhere nothing."""
    gpu = os.environ.get(LEASED_GPU_ENV, "")
    if not gpu.isdigit():
        yield
        return
    with gpu_leases(settings, (gpu,)):
        yield


def check_capacity(settings: Settings, gpus: int) -> str | None:
    """Why this worker cannot run a job of ``gpus`` ranks (``None`` when it can)."""
    devices = worker_devices(settings)
    if devices.count >= gpus:
        return None
    have = "no devices for multi-GPU jobs" if devices.count == 0 else f"{devices.count} ({settings.worker_gpus})"
    return (f"the job asks for {gpus} GPUs; this worker has {have}: run it on a worker started with "
            f"`cxrsynth worker --gpus` listing at least {gpus}")


def refuse_without_devices(s: Session, settings: Settings, job: Job, gpus: int, row: Generator | Encoder) -> bool:
    """Fail ``job`` and its model ``row`` when this worker lacks the ``gpus`` devices; True when it did."""
    no_room = check_capacity(settings, gpus) if gpus > 1 else None
    if no_room is None:
        return False
    row.status = "failed"
    mark_failed(s, job, "not enough GPUs on this worker", no_room)
    return True


def run_on_ranks(ctx: WorkerContext, job_id: str, gpus: int, task: str, *, data: Path, out: Path,
                 config: dict[str, Any], ckpt: Path, resume: bool, on_step: OnStep,
                 notes: str = "") -> SimpleNamespace:
    """Run one training call of a job on ``gpus`` ranks of this worker's devices; rank 0's result.

    Raises :class:`~models.callbacks.Canceled` when the job was canceled (the ranks checkpointed) and
    :class:`~models.launch.DistributedRunError` when a rank failed (the checkpoint stays).
    """
    from models.launch import launch, make_spec
    from models.torchrun import LaunchOptions

    devices = worker_devices(ctx.settings)
    chosen = devices.ids[:gpus]
    env = {"CUDA_VISIBLE_DEVICES": ",".join(chosen)} if devices.kind == "cuda" else {}
    device = "cuda" if devices.kind == "cuda" else "cpu"
    spec = make_spec(task, data=data, out_dir=out, config=config, checkpoint_dir=ckpt, resume=resume, device=device,
                     notes=notes)
    with ExitStack() as stack:
        if devices.kind == "cuda":
            with ctx.sessions.begin() as s:
                record_event(s, job_id, f"waiting for GPUs {', '.join(chosen)}")
            stack.enter_context(gpu_leases(ctx.settings, chosen))
        with ctx.sessions.begin() as s:
            record_event(s, job_id, f"training on {gpus} ranks ({device}, torchrun)")
        record = launch(spec, LaunchOptions(nproc_per_node=gpus), ckpt / "torchrun", on_step=on_step, env=env)
    assert record is not None  # a single machine hosts rank 0
    return SimpleNamespace(**record)


def retry_after_rank_failure(ctx: WorkerContext, job_id: str, error: Exception, ckpt: Path) -> bool:
    """After a failed rank: send the job again (it resumes from its checkpoint in ``ckpt``, if one was written
    yet) while it has deliveries left; True when it was sent, False when the caller must fail it."""
    from models.checkpoints import CHECKPOINT_NAME

    with ctx.sessions.begin() as s:
        job = load_job(s, job_id)
        if job is None or job.attempts >= ctx.settings.max_task_attempts or job.cancel_requested:
            return False
        first = str(error).splitlines()[0]
        where = ("from its last checkpoint" if ckpt.is_dir() and any(ckpt.rglob(CHECKPOINT_NAME))
                 else "from the start (no checkpoint yet)")
        record_event(s, job_id, f"{first}; running it again {where} (delivery {job.attempts + 1} of "
                                f"{ctx.settings.max_task_attempts})", level="warning")
    ctx.dispatcher.send(TASK_RUN_MULTI_GPU_JOB, job_id)
    return True
