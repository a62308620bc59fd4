"""Releasing datasets: the privacy gate on downloads, the admin's override, exports built on request.

Rules:

* A tenant downloads a **synthetic** dataset only when its privacy gate ``passed`` or an admin has
  overridden the gate (``gate_override``); otherwise 409 ``privacy-gate``. Real datasets are the
  tenant's own images: the gate does not apply to them.
* An override names who and why; it is stored on the dataset, appended to the source job's events
  (level ``warning``) and written to the ``cxrsynth.audit`` log. Revoking it is recorded the same way.
* Exports are immutable and built once per format, by the worker (``worker/exports.py``). A generation
  builds the zip when it finishes; an upload or registration is recorded ``pending`` and its zip built by
  the ``cxrsynth.build_dataset`` task, which then marks it ``ready``; any other export (WebDataset, DICOM, or a
  dataset made before an export existed) is built by a worker on the first request: the request
  answers ``202`` with ``Retry-After`` and the client asks again. A small status object per format
  (``exports/FORMAT.status.json``) remembers the build in flight, so repeated requests enqueue once; the
  worker refreshes it with its progress while it builds, and a build with no sign of life for
  ``STALE_AFTER_S`` (message lost, worker gone) is sent again. A build that failed is retried up to
  ``max_task_attempts`` times, then the request answers 500 ``export-failed`` with the error.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.problems import Conflict, NotFound, ProblemError, ServiceUnavailable
from app.core.queue import TASK_BUILD_EXPORT, send_task
from app.db.orm import Dataset, JobEvent
from app.schemas.common import DownloadLink
from app.schemas.releases import ExportPending
from app.services.exports import export_content_type, export_filename, formats_for, signed_download
from app.storage.base import ObjectStore
from app.storage.layout import dataset_export_key, export_status_key, read_export_status, write_export_status
from models.release.writers import EXPORT_FORMATS

log = logging.getLogger("cxrsynth.releases")
audit = logging.getLogger("cxrsynth.audit")

RETRY_AFTER_S = 5
STALE_AFTER_S = 600  # a build whose status was not refreshed for this long is sent to the queue again


# --------------------------------------------------------------------------------------------------
# Privacy gate
# --------------------------------------------------------------------------------------------------
def release_allowed(ds: Dataset) -> bool:
    """May the tenant download this dataset? Real: yes. Synthetic: gate passed, or an admin override."""
    return ds.origin != "synthetic" or ds.gate_status == "passed" or bool(ds.gate_override)


def check_release_allowed(ds: Dataset) -> None:
    """:class:`Conflict` ``privacy-gate`` when a synthetic dataset's gate did not pass and nobody overrode it."""
    if release_allowed(ds):
        return
    if ds.gate_status == "failed":
        detail = ("this synthetic dataset failed the privacy (memorisation) gate: some images are too close to "
                  "the generator's training images. It cannot be downloaded unless an admin overrides the gate.")
    else:
        detail = (f"the privacy gate of this synthetic dataset has not passed (status {ds.gate_status!r}); it cannot "
                  "be downloaded until it passes or an admin overrides the gate.")
    raise Conflict(detail, slug="privacy-gate", title="Privacy gate", gate_status=ds.gate_status,
                   privacy=ds.privacy)


def _record(session: Session, ds: Dataset, message: str) -> None:
    if ds.source_job_id:
        session.add(JobEvent(job_id=ds.source_job_id, level="warning", message=message))
    audit.warning("dataset %s (tenant %s): %s", ds.id, ds.tenant_id, message)


def get_any_dataset(session: Session, dataset_id: str) -> Dataset:
    """A dataset of any tenant (admin and embedded CLI only)."""
    ds = session.get(Dataset, dataset_id)
    if ds is None:
        raise NotFound(f"no dataset {dataset_id}")
    return ds


def override_gate(session: Session, dataset_id: str, actor: str, reason: str) -> Dataset:
    """Record an admin's override of a synthetic dataset's privacy gate (who, why, when, gate result)."""
    ds = get_any_dataset(session, dataset_id)
    if ds.origin != "synthetic":
        raise Conflict("the privacy gate applies to synthetic datasets only", slug="gate-not-applicable")
    if ds.status != "ready":
        raise Conflict(f"dataset {ds.id} is {ds.status}, not ready", slug="not-ready")
    if ds.gate_status == "passed":
        raise Conflict("the privacy gate passed: there is nothing to override", slug="gate-passed")
    if ds.gate_override:
        raise Conflict(f"already overridden by {ds.gate_override.get('by')!r}; revoke it first",
                       slug="already-overridden", gate_override=ds.gate_override)
    actor, reason = actor.strip(), reason.strip()
    ds.gate_override = {"by": actor, "reason": reason, "at": datetime.now(UTC).isoformat(),
                        "gate_status": ds.gate_status}
    _record(session, ds, f"privacy gate ({ds.gate_status}) overridden by {actor}: {reason}")
    session.commit()
    return ds


def revoke_gate_override(session: Session, dataset_id: str, actor: str, reason: str) -> Dataset:
    """Withdraw an override (links already handed out stay valid until they expire)."""
    ds = get_any_dataset(session, dataset_id)
    if not ds.gate_override:
        raise Conflict("the privacy gate of this dataset is not overridden", slug="not-overridden")
    previous = ds.gate_override
    ds.gate_override = None
    _record(session, ds, f"privacy gate override by {previous.get('by')} revoked by {actor.strip()}: "
                         f"{reason.strip()}")
    session.commit()
    return ds


# --------------------------------------------------------------------------------------------------
# Exports on request
# --------------------------------------------------------------------------------------------------
def check_format(ds: Dataset, fmt: str) -> None:
    """409 ``format-not-available`` when the dataset has no export in ``fmt`` (DICOM of real images)."""
    available = formats_for(ds)
    if fmt not in available:
        spec = EXPORT_FORMATS.get(fmt)
        why = spec.synthetic_only if spec is not None else None
        raise Conflict(f"a {ds.origin} dataset has no {fmt} export" + (f": {why}" if why else ""),
                       slug="format-not-available", available=list(available))


def request_export(
    session: Session, store: ObjectStore, settings: Settings, ds: Dataset, fmt: str,
) -> DownloadLink | ExportPending:
    """A signed link of the dataset's export in ``fmt``, or :class:`ExportPending` after asking a worker
    to build it. The caller has checked the tenant, readiness and the privacy gate."""
    key = dataset_export_key(ds, fmt)
    if store.exists(key):
        return signed_download(store, settings, key, export_filename(ds, fmt), export_content_type(fmt))
    status_key = export_status_key(ds, fmt)
    status = read_export_status(store, status_key) or {}
    attempts = int(status.get("attempts", 0))
    building = status.get("status") == "building"
    if building and time.time() - float(status.get("updated", 0)) < STALE_AFTER_S:
        return _pending(ds, fmt, attempts, status.get("done"))
    if status.get("status") == "failed" and attempts >= settings.max_task_attempts:
        raise ProblemError(f"building the {fmt} export failed {attempts} times: {status.get('error')}",
                           status=500, slug="export-failed", title="Export failed")
    attempt = attempts if building else attempts + 1  # a lost message is sent again, not counted as a failure
    write_export_status(store, status_key, status="building", attempts=attempt)
    try:
        send_task(settings, TASK_BUILD_EXPORT, ds.id, fmt)
    except Exception as exc:
        log.exception("could not enqueue the %s export of dataset %s", fmt, ds.id)
        store.delete(status_key)
        raise ServiceUnavailable("the job queue is unreachable; retry later", slug="queue-unavailable",
                                 headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
    return _pending(ds, fmt, attempt, None)


def _pending(ds: Dataset, fmt: str, attempt: int, done: int | None) -> ExportPending:
    progress = f"{done} of {ds.num_images}" if done is not None else f"{ds.num_images}"
    return ExportPending(dataset_id=ds.id, format=fmt, attempt=attempt, retry_after_s=RETRY_AFTER_S,
                         images_done=done, detail=f"the {fmt} export ({progress} images) is being built; "
                                                  f"ask again in {RETRY_AFTER_S} s")
