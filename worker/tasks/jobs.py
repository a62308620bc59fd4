"""Task entry points by job kind. Plain functions of ``(ctx, ...)``: Celery wraps them in
``worker.tasks.celery_tasks``; the CLI runs them inline through the same dispatcher interface."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

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
from app.db.orm import JobKind, JobStatus
from worker.runtime import WorkerContext, is_transient, load_job, mark_failed, retry_transient
from worker.tasks import evaluation, exports, generation, ssl, training, webhooks

# The job kinds that run as one task, and the function that runs each (generation is sharded: start_job
# fans it out). The registry of job kinds is app.db.orm.JobKind: every kind must be here or be generation
# (checked at import), and a job of an unknown kind fails loudly.
SINGLE_TASK_RUNNERS: dict[str, Callable[[WorkerContext, str], None]] = {
    JobKind.generator_training.value: training.train_generator_job,
    JobKind.pretraining.value: ssl.pretrain_job,
    JobKind.evaluation.value: evaluation.evaluate_job,
}
SINGLE_TASK_KINDS = tuple(SINGLE_TASK_RUNNERS)
_unrouted = {k.value for k in JobKind} ^ {*SINGLE_TASK_KINDS, JobKind.generation.value}
if _unrouted:
    raise RuntimeError(f"worker/tasks/jobs.py: job kinds without a runner, or runners of no JobKind: "
                       f"{sorted(_unrouted)}")

log = logging.getLogger(__name__)


def _notify_if_terminal(ctx: WorkerContext, job_id: str) -> None:
    with ctx.sessions() as s:
        job = load_job(s, job_id)
        notify = job is not None and bool(job.webhook_url) and JobStatus(job.status).terminal
    if notify:
        ctx.dispatcher.send(TASK_DELIVER_WEBHOOK, job_id)


def start_job(ctx: WorkerContext, job_id: str) -> None:
    """Route a new (or recovered) job to the tasks of its kind (run again if a connection broke under it:
    an unrouted job would stay queued for ever)."""
    retry_transient(partial(_route_job, ctx, job_id), f"start of job {job_id}")


def _route_job(ctx: WorkerContext, job_id: str) -> None:
    """Fail, cancel or route the job by kind (idempotent: a generation plans once, then resends shards)."""
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id)
        if job is None or JobStatus(job.status).terminal:
            return
        kind = job.kind
        multi_gpu = int((job.params or {}).get("gpus") or 1) > 1
        if job.cancel_requested:
            from worker.runtime import mark_canceled

            mark_canceled(s, job)
            kind = ""
        elif kind != JobKind.generation.value and kind not in SINGLE_TASK_KINDS:
            mark_failed(s, job, "unsupported job kind", f"this worker cannot run {kind!r} jobs yet")
            kind = ""
    if kind == JobKind.generation.value:
        generation.start_generation(ctx, job_id)
    elif kind in SINGLE_TASK_KINDS:
        # A data-parallel training job goes to the queue of the workers that own several GPUs.
        ctx.dispatcher.send(TASK_RUN_MULTI_GPU_JOB if multi_gpu else TASK_RUN_JOB, job_id)
    _notify_if_terminal(ctx, job_id)


def run_job(ctx: WorkerContext, job_id: str) -> None:
    """Single-task kinds: generator training, pretraining, evaluation."""
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id)
        if job is None:
            return
        runner = SINGLE_TASK_RUNNERS.get(job.kind)
        if runner is None:  # never fall through to another kind's code
            mark_failed(s, job, "unsupported job kind", f"this worker cannot run {job.kind!r} jobs")
    if runner is not None:
        runner(ctx, job_id)
    _notify_if_terminal(ctx, job_id)


def generation_shard(ctx: WorkerContext, job_id: str, shard_index: int) -> None:
    """One shard; run again if a connection broke in one of its transactions (claim, complete) or while
    sending finalize, where nothing else would ever finish the shard."""
    retry_transient(partial(generation.generation_shard, ctx, job_id, shard_index),
                    f"shard {shard_index} of job {job_id}")
    with ctx.sessions() as s:
        job = load_job(s, job_id)
        failed_or_canceled = job is not None and job.status in (JobStatus.failed.value, JobStatus.canceled.value)
    if failed_or_canceled:
        _notify_if_terminal(ctx, job_id)


def finalize_job(ctx: WorkerContext, job_id: str) -> None:
    """Finalize a generation (idempotent: run again if a connection broke under it). If it still fails,
    the job fails with the reason: an error escaping the task would be acknowledged and leave the job
    ``running`` for ever."""
    try:
        retry_transient(partial(generation.finalize_generation, ctx, job_id), f"finalize of job {job_id}")
    except Exception as exc:
        log.exception("finalize of job %s failed", job_id)
        title = "storage or database unreachable" if is_transient(exc) else "finalize failed"
        generation.fail_generation(ctx, job_id, title, f"{type(exc).__name__}: {exc}")
    _notify_if_terminal(ctx, job_id)


def deliver_webhook(ctx: WorkerContext, job_id: str) -> None:
    webhooks.deliver_webhook(ctx, job_id)


def task_registry(ctx: WorkerContext) -> dict[str, Callable[..., None]]:
    """Task name -> function bound to ``ctx`` (for the inline dispatcher)."""
    return {
        TASK_START_JOB: lambda job_id: start_job(ctx, job_id),
        TASK_GENERATION_SHARD: lambda job_id, k: generation_shard(ctx, job_id, k),
        TASK_FINALIZE_JOB: lambda job_id: finalize_job(ctx, job_id),
        TASK_RUN_JOB: lambda job_id: run_job(ctx, job_id),
        TASK_RUN_MULTI_GPU_JOB: lambda job_id: run_job(ctx, job_id),
        TASK_DELIVER_WEBHOOK: lambda job_id: deliver_webhook(ctx, job_id),
        TASK_BUILD_EXPORT: lambda dataset_id, fmt: exports.build_export(ctx, dataset_id, fmt),
        TASK_BUILD_DATASET: lambda dataset_id: exports.build_dataset(ctx, dataset_id),
    }
