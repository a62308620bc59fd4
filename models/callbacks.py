"""Progress and cancellation protocol shared by every long-running function in ``models``.

A long-running function takes ``on_step(step, total, message)``. The caller (the worker, the CLI)
records progress there and raises :class:`Canceled` to stop the work cooperatively between steps.
"""

from __future__ import annotations

from typing import Protocol


class Canceled(Exception):
    """Raised by an ``on_step`` callback to stop a long-running function between two steps."""


class OnStep(Protocol):
    """Progress callback: called after each unit of work; may raise :class:`Canceled`."""

    def __call__(self, step: int, total: int, message: str) -> None: ...


def no_progress(step: int, total: int, message: str) -> None:
    """The default callback: report nothing, never cancel."""
