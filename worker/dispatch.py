"""How tasks reach their code: through Celery (the service) or inline in this process (the CLI).

Both paths run the very same task functions of ``worker.tasks``; only delivery differs, so the embedded
``cxrsynth generate`` exercises the code a GPU worker runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from app.core.config import Settings
from app.core.queue import send_task


class Dispatcher(Protocol):
    """Sends a task by name with JSON arguments."""

    def send(self, name: str, *args: Any) -> None: ...


# A task sent by a worker (the next shard, finalize) exists only in that publish: if it failed, the job would
# wait forever. So a worker waits for the broker (a restart, an outage) for a minute (pauses of 0, 1, 2, 3, 4
# and then 10 x 5 s), where Celery's default gives up after three tries in under a second. The API keeps the short
# default: its caller gets a 503 and nothing is created.
WORKER_PUBLISH_RETRY: dict[str, Any] = {"max_retries": 15, "interval_start": 0, "interval_step": 1,
                                        "interval_max": 5}


class CeleryDispatcher:
    """Sends to the broker; a worker process picks the task up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def send(self, name: str, *args: Any) -> None:
        send_task(self.settings, name, *args, retry_policy=WORKER_PUBLISH_RETRY)


class InlineDispatcher:
    """Runs tasks in this process, in FIFO order, until none is left (no broker, no worker)."""

    def __init__(self, registry: dict[str, Callable[..., None]]) -> None:
        self.registry = registry
        self.pending: deque[tuple[str, tuple[Any, ...]]] = deque()

    def send(self, name: str, *args: Any) -> None:
        self.pending.append((name, args))

    def drain(self) -> None:
        """Run every queued task, including those the tasks themselves send."""
        while self.pending:
            name, args = self.pending.popleft()
            self.registry[name](*args)
