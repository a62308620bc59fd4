"""The Celery application of the worker: configured from ``app.core.queue.celery_config``.

Start it with ``cxrsynth worker`` (one process per GPU: ``--gpus 0,1`` starts one Celery worker per
device with ``CUDA_VISIBLE_DEVICES`` set, so CUDA is initialised only in that child).
"""

from __future__ import annotations

import warnings

from celery import Celery
from celery.exceptions import SecurityWarning
from celery.signals import worker_ready

from app.core.config import get_settings
from app.core.queue import celery_config
from worker.lifeline import parent_pid_from_env, watch_parent


def make_celery() -> Celery:
    """The worker's Celery app, with the task modules registered."""
    celery = Celery("cxrsynth")
    celery.conf.update(celery_config(get_settings()))
    celery.conf.imports = ("worker.tasks.celery_tasks",)
    return celery


celery_app = make_celery()


if parent_pid_from_env() is not None:
    # The embedded worker of `cxrsynth serve`: Celery's "running as root" SecurityWarning is about a shared
    # broker whose messages could run code as root; the embedded broker is a folder only this user writes
    # and the task serializer is JSON, so for a newcomer it is noise (a stand-alone `cxrsynth worker` keeps it).
    warnings.filterwarnings("ignore", category=SecurityWarning)


@worker_ready.connect
def _exit_with_the_server(**_: object) -> None:
    """A worker started by ``cxrsynth serve`` exits when that server is gone (``worker.lifeline``)."""
    parent = parent_pid_from_env()
    if parent is not None:
        watch_parent(parent)
