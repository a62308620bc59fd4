"""The job queue contract between API and worker: Celery configuration, task names, queues.

The API only *sends* tasks by name (it never imports ``worker``); ``worker.celery_app`` builds its
Celery app from the same :func:`celery_config`, so producer and consumer cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from app.core.config import Settings

GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"
# Training jobs with gpus > 1: consumed only by the multi-GPU process of `cxrsynth worker --gpus ...`, which
# owns those devices and runs the job over them with torchrun.
MULTI_GPU_QUEUE = "gpus"

# Task names (the worker registers functions under exactly these names).
TASK_START_JOB = "cxrsynth.start_job"  # plan a job; for generation, fan out shard tasks
TASK_GENERATION_SHARD = "cxrsynth.generation_shard"
TASK_FINALIZE_JOB = "cxrsynth.finalize_job"
TASK_RUN_JOB = "cxrsynth.run_job"  # single-task kinds (generator_training, pretraining, evaluation)
TASK_RUN_MULTI_GPU_JOB = "cxrsynth.run_multi_gpu_job"  # the same, for a training job that asks for gpus > 1
TASK_DELIVER_WEBHOOK = "cxrsynth.deliver_webhook"
TASK_BUILD_EXPORT = "cxrsynth.build_export"  # (dataset id, format): a dataset export asked for before it existed
TASK_BUILD_DATASET = "cxrsynth.build_dataset"  # (dataset id): the zip of a pending upload / registration, then ready

TASK_QUEUES = {
    TASK_START_JOB: CPU_QUEUE,
    TASK_FINALIZE_JOB: CPU_QUEUE,
    TASK_DELIVER_WEBHOOK: CPU_QUEUE,
    TASK_BUILD_EXPORT: CPU_QUEUE,
    TASK_BUILD_DATASET: CPU_QUEUE,
    TASK_GENERATION_SHARD: GPU_QUEUE,
    TASK_RUN_JOB: GPU_QUEUE,
    TASK_RUN_MULTI_GPU_JOB: MULTI_GPU_QUEUE,
}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for a job service: late acks, prefetch 1, no result backend (state is in the DB)."""
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.embedded:
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        # kombu's filesystem transport: messages are files, so queued jobs survive a restart.
        transport.update(data_folder_in=str(folder / "queue"), data_folder_out=str(folder / "queue"),
                         processed_folder=str(folder / "processed"), store_processed=False,
                         control_folder=str(folder / "control"))
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,  # a task killed mid-way is redelivered, never lost
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,  # long GPU tasks: never hoard messages
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": max(60, settings.task_time_limit_s - 60),
        "task_queues": [Queue(GPU_QUEUE), Queue(CPU_QUEUE), Queue(MULTI_GPU_QUEUE)],
        "task_default_queue": CPU_QUEUE,
        "task_routes": {name: {"queue": q} for name, q in TASK_QUEUES.items()},
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


_PRODUCERS: dict[tuple[str, str], Celery] = {}


def producer_for(settings: Settings) -> Celery:
    """A cached Celery app used only to send tasks (by name) from the API and CLI."""
    cache_key = (settings.broker_url, str(settings.broker_dir))
    app = _PRODUCERS.get(cache_key)
    if app is None:
        app = Celery("cxrsynth-producer")
        app.conf.update(celery_config(settings))
        _PRODUCERS[cache_key] = app
    return app


def send_task(settings: Settings, name: str, *args: Any, retry_policy: dict[str, Any] | None = None) -> None:
    """Enqueue task ``name`` with positional JSON arguments on its queue.

    ``retry_policy`` (kombu's ``max_retries``, ``interval_start``, ``interval_step``, ``interval_max``)
    replaces Celery's short default (3 tries in under a second) for how long a publish waits for the broker.
    """
    extra: dict[str, Any] = {} if retry_policy is None else {"retry": True, "retry_policy": retry_policy}
    producer_for(settings).send_task(name, args=list(args), queue=TASK_QUEUES.get(name, CPU_QUEUE), **extra)
