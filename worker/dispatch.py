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


class CeleryDispatcher:
    """Sends to the broker; a worker process picks the task up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def send(self, name: str, *args: Any) -> None:
        send_task(self.settings, name, *args)


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
