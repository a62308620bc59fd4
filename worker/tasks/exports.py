"""Dataset export tasks.

* ``cxrsynth.build_dataset(dataset_id)``: an upload or a registration recorded a ``pending`` dataset and
  enqueued this (the request answered at once); the zip export is built and the dataset becomes ``ready``.
* ``cxrsynth.build_export(dataset_id, format)``: a download asked for an export not built yet (the API
  answered 202); the archive is built and the build status cleared, so the client's next request gets a
  signed link.

Both build through :mod:`worker.exports` (``models.release`` + the store) and are idempotent: a
redelivered task finds the export built.
"""

from __future__ import annotations

from worker.exports import run_dataset_build, run_export_task
from worker.runtime import WorkerContext


def build_export(ctx: WorkerContext, dataset_id: str, fmt: str) -> None:
    """Build the ``fmt`` export of dataset ``dataset_id`` (a failure is recorded for the API to report)."""
    run_export_task(ctx.sessions, ctx.store, dataset_id, fmt)


def build_dataset(ctx: WorkerContext, dataset_id: str) -> None:
    """Build the zip export of a pending uploaded or registered dataset and mark it ready (or failed)."""
    run_dataset_build(ctx.sessions, ctx.store, dataset_id)
