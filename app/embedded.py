"""The embedded runner: a recorded job run by the worker's own task code in this process (CLI jobs with no
server), the worker's export build for the embedded ``cxrsynth datasets export``, and what
``cxrsynth serve`` hands the worker process it starts.

This is the one module of ``app/`` that imports ``worker`` (the API enqueues through ``app.core.queue``;
``serve`` starts its worker by command line). It composes ``WorkerContext`` + ``InlineDispatcher`` + the
worker's task registry exactly as a Celery worker would run them, so an embedded job and a served one
are the same code.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from models.callbacks import OnStep, no_progress

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from app.core.config import Settings
    from app.db.orm import Dataset
    from app.storage.base import ObjectStore


def run_job_inline(settings: Settings, job_id: str, poll: Callable[[], None], every: float = 0.5) -> ObjectStore:
    """Run the recorded job ``job_id`` to its end here (every task it sends included), calling ``poll``
    from another thread every ``every`` seconds meanwhile; returns the object store the tasks wrote to."""
    from app.core.queue import TASK_START_JOB
    from worker.dispatch import InlineDispatcher
    from worker.runtime import WorkerContext
    from worker.tasks.jobs import task_registry

    ctx = WorkerContext(settings, dispatcher=InlineDispatcher({}))
    dispatcher = InlineDispatcher(task_registry(ctx))
    ctx.dispatcher = dispatcher
    dispatcher.send(TASK_START_JOB, job_id)
    done = threading.Event()

    def loop() -> None:
        while not done.wait(every):
            poll()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        dispatcher.drain()
    finally:
        done.set()
        t.join()
    return ctx.store


def build_export_inline(session: Session, store: ObjectStore, ds: Dataset, fmt: str,
                        on_step: OnStep = no_progress) -> str:
    """Build (or find) the ``fmt`` export of ``ds`` in this process with the worker's own code, cached in the
    store as a worker would; returns its key (``cxrsynth datasets export`` in embedded mode)."""
    from worker.exports import build_export_now

    return build_export_now(session, store, ds, fmt, on_step=on_step)


def lifeline_env() -> dict[str, str]:
    """Environment for a worker process this process starts: it shuts down when this process dies without
    stopping it (``worker/lifeline.py``)."""
    from worker.lifeline import PARENT_PID_ENV

    return {PARENT_PID_ENV: str(os.getpid())}
