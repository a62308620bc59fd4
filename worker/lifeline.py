"""A worker started by ``cxrsynth serve`` exits when the server that started it is gone.

``serve`` passes its pid in ``CXRSYNTH_PARENT_PID``. When the worker's parent changes (the server was
killed with SIGKILL, crashed, or its terminal closed), the worker would otherwise live on as an orphan,
holding the embedded database and consuming the embedded queue. Celery has no "exit with the parent"
option and ``prctl(PR_SET_PDEATHSIG)`` is Linux-only, so a small watcher thread does it: it asks Celery
for a warm shutdown (SIGTERM) and, if a long task keeps the worker busy past ``grace`` seconds, exits hard.
That is safe because every task is idempotent and resumable, and the next ``serve`` re-queues unfinished
jobs (``app.cli.recover_unfinished_jobs``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

PARENT_PID_ENV = "CXRSYNTH_PARENT_PID"
log = logging.getLogger("cxrsynth.worker")


def parent_pid_from_env() -> int | None:
    """The pid ``serve`` recorded, or ``None`` for a stand-alone worker (``cxrsynth worker``)."""
    raw = os.environ.get(PARENT_PID_ENV, "").strip()
    return int(raw) if raw.isdigit() else None


def _parent_alive(parent_pid: int) -> bool:
    # An orphan is re-parented (to init or a subreaper), so getppid() stops matching.
    return os.getppid() == parent_pid


def watch_parent(parent_pid: int, interval: float = 0.5, grace: float = 10.0) -> threading.Thread:
    """Start a daemon thread that shuts this process down once ``parent_pid`` is no longer its parent."""

    def run() -> None:
        while _parent_alive(parent_pid):
            time.sleep(interval)
        log.warning("the server that started this worker (pid %d) is gone: shutting down", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown: finish or hand back the task
        time.sleep(grace)
        log.warning("still busy %.0f s after the server exited: exiting now (the job resumes later)", grace)
        os._exit(1)

    thread = threading.Thread(target=run, name="cxrsynth-lifeline", daemon=True)
    thread.start()
    return thread
