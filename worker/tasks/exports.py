"""``cxrsynth.build_export(dataset_id, format)``: build a dataset export a download asked for.

The API answers such a download with 202 and enqueues this task (see ``app.services.releases``); the
task builds the archive through :mod:`models.release` into the store and clears the build status, so
the client's next request gets a signed link. Idempotent: a redelivered task finds the export built.
"""

from __future__ import annotations

from app.services.releases import run_export_task
from worker.runtime import WorkerContext


def build_export(ctx: WorkerContext, dataset_id: str, fmt: str) -> None:
    """Build the ``fmt`` export of dataset ``dataset_id`` (a failure is recorded for the API to report)."""
    run_export_task(ctx.sessions, ctx.store, dataset_id, fmt)
