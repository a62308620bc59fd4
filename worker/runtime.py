"""What every task needs: settings, store, DB sessions, a dispatcher, and job bookkeeping helpers.

A task loads its job, runs ``models`` code with an ``on_step`` callback made here (progress to the DB,
cooperative cancellation), writes results, and marks the job done. Every helper is idempotent so a
redelivered task (worker killed, broker redelivery) converges to the same state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.orm import Encoder, Generator, Job, JobEvent, JobShard, JobStatus, utcnow
from app.db.session import get_engine, get_sessionmaker, retry_connects
from app.storage import ObjectStore, build_store
from models.callbacks import Canceled, OnStep
from worker.dispatch import Dispatcher

log = logging.getLogger(__name__)

# How long a worker waits for Postgres (each new connection) and S3 (each request) to come back after a
# restart or an outage before the step fails; the broker's budget is worker.dispatch.WORKER_PUBLISH_RETRY.
SERVICE_OUTAGE_S = 120.0
# Pauses before running again an idempotent step that a lost connection broke mid-way (retry_transient).
TRANSIENT_PAUSES_S = (2.0, 5.0, 10.0)


@dataclass
class WorkerContext:
    """Process-wide state of a worker (or of an inline CLI run)."""

    settings: Settings
    dispatcher: Dispatcher
    store: ObjectStore = field(init=False)
    sessions: sessionmaker[Session] = field(init=False)

    def __post_init__(self) -> None:
        self.store = build_store(self.settings, retry_for_s=SERVICE_OUTAGE_S)
        self.sessions = get_sessionmaker(self.settings.database_url)
        retry_connects(get_engine(self.settings.database_url), SERVICE_OUTAGE_S)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a lost or refused connection to Postgres, S3 or the broker (a restart, an outage)
    rather than a fault of the job itself."""
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
    return isinstance(exc, urllib3.exceptions.HTTPError | BrokerError | ConnectionError)


T = TypeVar("T")


def retry_transient(step: Callable[[], T], what: str, pauses_s: Sequence[float] = TRANSIENT_PAUSES_S) -> T:
    """Run an idempotent ``step``; when a connection broke under it (:func:`is_transient`; e.g. Postgres
    ended the session mid-transaction while restarting), pause and run it again, once per pause, then let the
    error through. The connect and request retries (``SERVICE_OUTAGE_S``) cover an outage; this covers what
    was in flight when it began."""
    for pause in (*pauses_s, None):
        try:
            return step()
        except Exception as exc:
            if pause is None or not is_transient(exc):
                raise
            log.warning("%s: %s: %s; running it again in %.0f s", what, type(exc).__name__, str(exc)[:300], pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def record_event(session: Session, job_id: str, message: str, level: str = "info",
                 step: int | None = None, total: int | None = None) -> None:
    """Append a progress/log line to the job's event stream."""
    session.add(JobEvent(job_id=job_id, message=message, level=level, step=step, total=total))


def mark_running(session: Session, job: Job) -> None:
    """queued -> running (first time only); counts the delivery."""
    if job.status == JobStatus.queued.value:
        job.status = JobStatus.running.value
        job.started_at = utcnow()
        record_event(session, job.id, "started")


def mark_failed(session: Session, job: Job, title: str, detail: str) -> None:
    """Terminal failure with a problem-shaped error; never overwrites another terminal state."""
    if JobStatus(job.status).terminal:
        return
    job.status = JobStatus.failed.value
    job.error = {"title": title, "detail": detail[-4000:]}
    job.finished_at = utcnow()
    record_event(session, job.id, f"failed: {title}: {detail[-500:]}", level="error")


def mark_canceled(session: Session, job: Job) -> None:
    if JobStatus(job.status).terminal:
        return
    job.status = JobStatus.canceled.value
    job.finished_at = utcnow()
    record_event(session, job.id, "canceled")


def make_progress_callback(
    ctx: WorkerContext,
    job_id: str,
    shard_index: int | None = None,
    throttle_s: float = 1.0,
    on_write: Callable[[Session, int, int], None] | None = None,
) -> OnStep:
    """An ``on_step`` that writes progress at most every ``throttle_s`` and raises ``Canceled``.

    For a shard, ``step`` counts finished images of the shard and the job's progress is the sum over
    its shards; otherwise ``step``/``total`` are the job's own.
    """
    last = [0.0]

    def on_step(step: int, total: int, message: str) -> None:
        now = time.monotonic()
        if now - last[0] < throttle_s and step < total:
            return
        last[0] = now
        with ctx.sessions.begin() as s:
            if shard_index is not None:
                s.execute(update(JobShard).where(JobShard.job_id == job_id, JobShard.index == shard_index)
                          .values(done_items=step, updated_at=utcnow()))
                done = s.scalar(select(func.coalesce(func.sum(JobShard.done_items), 0))
                                .where(JobShard.job_id == job_id)) or 0
                s.execute(update(Job).where(Job.id == job_id)
                          .values(progress_step=int(done), progress_message=message))
            else:
                s.execute(update(Job).where(Job.id == job_id)
                          .values(progress_step=step, progress_total=total, progress_message=message))
                record_event(s, job_id, message, step=step, total=total)
            if on_write is not None:
                on_write(s, step, total)
            canceled = s.scalar(select(Job.cancel_requested).where(Job.id == job_id))
        if canceled:
            raise Canceled(job_id)

    return on_step


def load_job(session: Session, job_id: str, lock: bool = False) -> Job | None:
    """The job row (``SELECT ... FOR UPDATE`` on Postgres when ``lock``)."""
    stmt = select(Job).where(Job.id == job_id)
    if lock:
        stmt = stmt.with_for_update()
    return session.scalar(stmt)


def begin_job(session: Session, settings: Settings, job_id: str) -> Job | None:
    """Lock the job and count this delivery; ``None`` when there is nothing to do (gone, finished, canceled
    before it ran, or delivered more than ``max_task_attempts`` times, which fails it). Call inside a
    transaction; the caller marks it running once its own checks pass."""
    job = load_job(session, job_id, lock=True)
    if job is None or JobStatus(job.status).terminal:
        return None
    if job.cancel_requested:
        mark_canceled(session, job)
        return None
    job.attempts += 1
    if job.attempts > settings.max_task_attempts:
        mark_failed(session, job, "worker lost", f"delivered {job.attempts - 1} times without finishing")
        return None
    return job


def public_error(exc: BaseException, work: Path) -> str:
    """``Type: message`` of an exception without the worker's temporary folder (clients never see worker
    paths)."""
    return f"{type(exc).__name__}: " + str(exc).replace(str(work) + "/", "").replace(str(work), "<work folder>")


# A job that produces a model (a generator or an encoder) owns one row of that model, created when the
# job first runs and finished here: ready with its files and metrics, or failed / canceled with the job.
ModelRow = TypeVar("ModelRow", Generator, Encoder)


def end_model_job(ctx: WorkerContext, job_id: str, model: type[ModelRow], model_id: str, *,
                  failure: tuple[str, str] | None = None) -> None:
    """Mark the job and its model row canceled (``failure=None``) or failed (``(title, detail)``)."""
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id)
        row = s.get(model, model_id)
        if row is not None:
            row.status = "canceled" if failure is None else "failed"
        if job is not None:
            cancel_or_fail(s, job, failure)


def cancel_or_fail(s: Session, job: Job, failure: tuple[str, str] | None) -> None:
    """In the caller's transaction: the job is canceled (``failure=None``) or fails with (title, detail)."""
    if failure is None:
        mark_canceled(s, job)
    else:
        mark_failed(s, job, *failure)


def complete_model_job(ctx: WorkerContext, job_id: str, model: type[ModelRow], model_id: str, *, kind: str,
                       prefix: str, config: dict[str, Any], card: str, steps: int, final_loss: float,
                       wall_seconds: float) -> None:
    """The model row ready (files under ``prefix``) and the job succeeded with links to it; a no-op when the
    job ended meanwhile (canceled while uploading, or finished by an earlier delivery)."""
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id, lock=True)
        row = s.get(model, model_id)
        if job is None or row is None or JobStatus(job.status).terminal:
            return
        row.prefix, row.config, row.card, row.status = prefix, config, card, "ready"
        row.metrics = {**(row.metrics or {}), "final_loss": final_loss, "steps": steps}
        job.status = JobStatus.succeeded.value
        job.finished_at = utcnow()
        job.compute_seconds = float(wall_seconds)
        job.result = {f"{kind}_id": model_id, "steps": steps, "final_loss": final_loss,
                      "links": {kind: f"/v1/{kind}s/{model_id}", "download": f"/v1/{kind}s/{model_id}/download"}}
        record_event(s, job_id, f"{kind} {model_id} ready")


def job_payload(job: Job) -> dict[str, Any]:
    """The job as the API shows it (used for webhooks)."""
    total = job.progress_total or 0
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "progress": {"fraction": (job.progress_step / total) if total else (1.0 if job.status == "succeeded" else 0.0),
                     "message": job.progress_message, "step": job.progress_step, "total": total},
        "params": job.params,
        "result": job.result,
        "error": job.error,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "compute_seconds": job.compute_seconds,
    }


#: Content types of the files of an exported model folder (generators, encoders).
MODEL_FILE_TYPES = {".json": "application/json", ".md": "text/markdown", ".png": "image/png",
                    ".safetensors": "application/octet-stream"}


def download_prefix(store: ObjectStore, prefix: str, dest: Path, skip: Iterable[str] = ()) -> int:
    """Copy every object under ``prefix/`` to ``dest`` (same relative paths), one file at a time, except
    those whose relative path starts with one of ``skip``. Returns the number of files."""
    n = 0
    skips = tuple(skip)
    for obj in store.list(prefix + "/"):
        rel = obj.key[len(prefix) + 1:]
        if not rel or (skips and rel.startswith(skips)):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(obj.key, target)
        n += 1
    return n


def upload_folder(store: ObjectStore, folder: Path, prefix: str) -> None:
    """Put every file under ``folder`` at ``prefix/<relative path>`` (an exported model folder)."""
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            store.put_file(f"{prefix}/{f.relative_to(folder).as_posix()}", f,
                           MODEL_FILE_TYPES.get(f.suffix, "application/octet-stream"))
