"""Celery wrappers: each task builds (once per process) a ``WorkerContext`` and calls ``jobs``."""

from __future__ import annotations

from functools import lru_cache

from app.core.config import get_settings
from app.core.queue import (
    TASK_BUILD_DATASET,
    TASK_BUILD_EXPORT,
    TASK_DELIVER_WEBHOOK,
    TASK_FINALIZE_JOB,
    TASK_GENERATION_SHARD,
    TASK_RUN_JOB,
    TASK_RUN_MULTI_GPU_JOB,
    TASK_START_JOB,
)
from worker.celery_app import celery_app
from worker.dispatch import CeleryDispatcher
from worker.multi_gpu import hold_worker_gpu
from worker.runtime import WorkerContext
from worker.tasks import exports, jobs


@lru_cache(maxsize=1)
def context() -> WorkerContext:
    """Built lazily in the worker child, after fork (so CUDA and DB pools start in the child)."""
    settings = get_settings()
    return WorkerContext(settings, CeleryDispatcher(settings))


@celery_app.task(name=TASK_START_JOB)
def start_job(job_id: str) -> None:
    jobs.start_job(context(), job_id)


@celery_app.task(name=TASK_GENERATION_SHARD)
def generation_shard(job_id: str, shard_index: int) -> None:
    with hold_worker_gpu(context().settings):  # not while a multi-GPU job trains on this process's GPU
        jobs.generation_shard(context(), job_id, shard_index)


@celery_app.task(name=TASK_FINALIZE_JOB)
def finalize_job(job_id: str) -> None:
    jobs.finalize_job(context(), job_id)


@celery_app.task(name=TASK_RUN_JOB)
def run_job(job_id: str) -> None:
    with hold_worker_gpu(context().settings):
        jobs.run_job(context(), job_id)


@celery_app.task(name=TASK_RUN_MULTI_GPU_JOB)
def run_multi_gpu_job(job_id: str) -> None:
    """A training job with gpus > 1 (this worker's multi-GPU process runs it with torchrun)."""
    jobs.run_job(context(), job_id)


@celery_app.task(name=TASK_DELIVER_WEBHOOK)
def deliver_webhook(job_id: str) -> None:
    jobs.deliver_webhook(context(), job_id)


@celery_app.task(name=TASK_BUILD_EXPORT)
def build_export(dataset_id: str, fmt: str) -> None:
    exports.build_export(context(), dataset_id, fmt)


@celery_app.task(name=TASK_BUILD_DATASET)
def build_dataset(dataset_id: str) -> None:
    exports.build_dataset(context(), dataset_id)
