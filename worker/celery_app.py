"""The Celery application of the worker: configured from ``app.core.queue.celery_config``.

Start it with ``cxrsynth worker`` (one process per GPU: ``--gpus 0,1`` starts one Celery worker per
device with ``CUDA_VISIBLE_DEVICES`` set, so CUDA is initialised only in that child).
"""

from __future__ import annotations

from celery import Celery

from app.core.config import get_settings
from app.core.queue import celery_config


def make_celery() -> Celery:
    """The worker's Celery app, with the task modules registered."""
    celery = Celery("cxrsynth")
    celery.conf.update(celery_config(get_settings()))
    celery.conf.imports = ("worker.tasks.celery_tasks",)
    return celery


celery_app = make_celery()
