"""Jobs: submit (idempotent, rate-limited, enqueued after commit), read, list, cancel, follow events.

Every function filters on ``tenant_id``: another tenant's job is :class:`NotFound`, like an unknown id.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from pydantic import BaseModel
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.problems import Conflict, NotFound, ServiceUnavailable, TooManyJobs
from app.core.queue import TASK_DELIVER_WEBHOOK, TASK_START_JOB, send_task
from app.db.orm import ACTIVE_STATUSES, Job, JobEvent, JobKind, JobStatus, Tenant, new_id, utcnow
from app.db.session import get_sessionmaker
from app.schemas.jobs import JobEventOut, JobOut, JobProgress
from app.services.pagination import as_utc, check_limit, paginate_newest_first

log = logging.getLogger("cxrsynth.jobs")

RETRY_AFTER_S = 30
LOCK_MARGIN = 64  # lock the tenant row when this close to the in-flight limit
EVENTS_POLL_S = 0.5
EVENTS_BATCH = 500


# --------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------
def job_out(job: Job) -> JobOut:
    """The public shape of a job (same for every kind)."""
    status = JobStatus(job.status)
    if job.progress_total > 0:
        fraction = min(1.0, max(0.0, job.progress_step / job.progress_total))
    else:
        fraction = 1.0 if status == JobStatus.succeeded else 0.0
    if status == JobStatus.succeeded:
        fraction = 1.0
    return JobOut(
        id=job.id,
        kind=JobKind(job.kind),
        status=status,
        progress=JobProgress(fraction=fraction, message=job.progress_message or "", step=job.progress_step,
                             total=job.progress_total),
        params=job.params or {},
        result=job.result,
        error=job.error,
        cancel_requested=bool(job.cancel_requested),
        webhook_url=job.webhook_url,
        created_at=as_utc(job.created_at),
        started_at=as_utc(job.started_at) if job.started_at else None,
        finished_at=as_utc(job.finished_at) if job.finished_at else None,
        compute_seconds=job.compute_seconds or 0.0,
    )


def event_out(event: JobEvent) -> JobEventOut:
    """The public shape of a job event."""
    return JobEventOut(id=event.id, job_id=event.job_id, created_at=as_utc(event.created_at), level=event.level,
                       message=event.message, step=event.step, total=event.total)


# --------------------------------------------------------------------------------------------------
# Submission
# --------------------------------------------------------------------------------------------------
def request_hash(kind: str, request: BaseModel | dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON (sorted keys, defaults filled in) of a creation request and its kind."""
    body = request.model_dump(mode="json") if isinstance(request, BaseModel) else request
    canonical = json.dumps({"kind": kind, "body": body}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def find_idempotent_job(session: Session, tenant_id: str, idempotency_key: str, req_hash: str) -> Job | None:
    """The job an earlier request with this key created, or None; 409 when its body was different."""
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key))
    if job is not None and job.request_hash != req_hash:
        raise Conflict("this Idempotency-Key was already used with a different request body",
                       slug="idempotency-key-reused", job_id=job.id)
    return job


def jobs_in_flight(session: Session, tenant_id: str) -> int:
    """How many of the tenant's jobs are queued or running."""
    return session.scalar(select(func.count()).select_from(Job)
                          .where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_STATUSES))) or 0


def _check_in_flight(session: Session, settings: Settings, tenant_id: str) -> None:
    """429 when the tenant is at ``max_jobs_in_flight_per_tenant``.

    More than ``LOCK_MARGIN`` below the limit a plain count decides (fewer than ``LOCK_MARGIN``
    submissions of one tenant in progress at once cannot overshoot it); closer, the tenant row is locked
    (Postgres ``FOR UPDATE``, held to the commit) and the count redone, so concurrent requests cannot
    slip past the limit. Locking only there keeps a tenant's submissions parallel when its limit is high.
    """
    limit = settings.max_jobs_in_flight_per_tenant
    in_flight = jobs_in_flight(session, tenant_id)
    if limit - in_flight <= LOCK_MARGIN:
        session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
        in_flight = jobs_in_flight(session, tenant_id)
    if in_flight >= limit:
        session.rollback()
        raise TooManyJobs(
            f"at most {limit} jobs may be queued or running at once; retry when one has finished",
            headers={"Retry-After": str(RETRY_AFTER_S)}, limit=limit,
        )


def submit_job(
    session: Session,
    settings: Settings,
    tenant_id: str,
    kind: JobKind,
    request: BaseModel,
    plan: Callable[[], BaseModel],
    *,
    idempotency_key: str | None = None,
    webhook_url: str | None = None,
    enqueue: bool = True,
) -> tuple[Job, bool]:
    """Create and enqueue a job; returns ``(job, created)``.

    ``enqueue=False`` records the job without sending it (the embedded CLI runs it inline).

    Order: an ``Idempotency-Key`` seen before with the same request returns that job (``created`` is
    False; with another request: 409). Then ``plan()`` validates the request and resolves the params the
    worker reads; then the tenant's jobs in flight are counted (429 with ``Retry-After`` at the limit, see
    :func:`_check_in_flight`); the job is committed, and only then ``TASK_START_JOB`` is sent, so a
    worker never sees a job that is not in the database. If the broker refuses, the job is deleted and the
    answer is 503 (nothing is left behind).
    """
    req_hash = request_hash(kind.value, request)
    if idempotency_key is not None:
        existing = find_idempotent_job(session, tenant_id, idempotency_key, req_hash)
        if existing is not None:
            return existing, False
    params = plan().model_dump(mode="json")

    _check_in_flight(session, settings, tenant_id)
    job = Job(id=new_id(), tenant_id=tenant_id, kind=kind.value, status=JobStatus.queued.value, params=params,
              idempotency_key=idempotency_key, request_hash=req_hash, webhook_url=webhook_url)
    # The id is set here so the job and its first event go to the database in one flush.
    session.add_all([job, JobEvent(job_id=job.id, message=f"{kind.value} job queued")])
    try:
        session.flush()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the race.
        session.rollback()
        if idempotency_key is None:
            raise
        existing = find_idempotent_job(session, tenant_id, idempotency_key, req_hash)
        if existing is None:
            raise
        return existing, False
    session.commit()
    if enqueue:
        enqueue_job(session, settings, job)
    return job, True


def enqueue_job(session: Session, settings: Settings, job: Job) -> None:
    """Send ``TASK_START_JOB(job.id)``; on a broker error delete the job and raise 503."""
    try:
        send_task(settings, TASK_START_JOB, job.id)
    except Exception as exc:
        log.exception("could not enqueue job %s", job.id)
        session.delete(job)
        session.commit()
        raise ServiceUnavailable("the job queue is unreachable; nothing was created, retry later",
                                 slug="queue-unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from exc


# --------------------------------------------------------------------------------------------------
# Reading and canceling
# --------------------------------------------------------------------------------------------------
def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """The tenant's job ``job_id``; :class:`NotFound` for unknown ids and other tenants' jobs alike."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def list_jobs(
    session: Session,
    settings: Settings,
    tenant_id: str,
    *,
    kind: JobKind | None = None,
    status: JobStatus | None = None,
    cursor: str | None = None,
    limit: int | None = None,
) -> tuple[list[Job], str | None]:
    """One page of the tenant's jobs, newest first, optionally of one kind and/or status."""
    limit = check_limit(limit, settings.page_size_max)
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if kind is not None:
        stmt = stmt.where(Job.kind == kind.value)
    if status is not None:
        stmt = stmt.where(Job.status == status.value)
    return paginate_newest_first(session, stmt, Job, cursor, limit)


def cancel_job(session: Session, settings: Settings, tenant_id: str, job_id: str) -> Job:
    """Cancel a job: queued -> canceled at once; running -> ``cancel_requested`` (the worker stops
    between steps); finished -> 409. The status checks are conditional UPDATEs, so a worker picking
    the job up at the same moment cannot be overwritten."""
    job = get_job(session, tenant_id, job_id)
    now = utcnow()
    done = session.execute(
        update(Job).where(Job.id == job.id, Job.status == JobStatus.queued.value)
        .values(status=JobStatus.canceled.value, finished_at=now, cancel_requested=True)
    ).rowcount  # type: ignore[attr-defined]
    if done:
        session.add(JobEvent(job_id=job.id, level="warning", message="canceled before it started"))
        session.commit()
        session.refresh(job)
        if job.webhook_url:
            _notify_webhook(settings, job.id)
        return job
    requested = session.execute(
        update(Job).where(Job.id == job.id, Job.status == JobStatus.running.value).values(cancel_requested=True)
    ).rowcount  # type: ignore[attr-defined]
    if requested:
        session.add(JobEvent(job_id=job.id, level="warning", message="cancel requested"))
        session.commit()
        session.refresh(job)
        return job
    session.rollback()
    session.refresh(job)
    raise Conflict(f"job {job.id} is already {job.status}", slug="job-finished", job_status=job.status)


def _notify_webhook(settings: Settings, job_id: str) -> None:
    """Ask the worker to deliver the completion webhook of a job the API finished (best effort)."""
    try:
        send_task(settings, TASK_DELIVER_WEBHOOK, job_id)
    except Exception:
        log.exception("could not enqueue the webhook of job %s", job_id)


def list_job_events(
    session: Session, tenant_id: str, job_id: str, after_id: int = 0, limit: int = EVENTS_BATCH
) -> list[JobEvent]:
    """The job's events with ``id > after_id``, oldest first (checks the job belongs to the tenant)."""
    get_job(session, tenant_id, job_id)
    return _events_after(session, job_id, after_id, limit)


def _events_after(session: Session, job_id: str, after_id: int, limit: int) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id)
                                .order_by(JobEvent.id).limit(limit)))


async def follow_job_events(
    database_url: str,
    job_id: str,
    after_id: int = 0,
    *,
    poll_s: float = EVENTS_POLL_S,
    max_duration_s: float = 3600.0,
    is_disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> AsyncIterator[JobEventOut | JobOut]:
    """Yield the job's events as they are written, then the final job once it is terminal.

    Polls the database every ``poll_s`` seconds (each poll is a short session in a worker thread, so
    the event loop never blocks); stops when the job is terminal and every event has been sent, when
    the client disconnects, or after ``max_duration_s`` (clients reconnect with ``Last-Event-ID``).
    The caller checks tenancy first.
    """
    maker = get_sessionmaker(database_url)

    def poll(last: int) -> tuple[list[JobEventOut], JobOut | None, bool]:
        with maker() as s:
            job = s.get(Job, job_id)
            if job is None:  # deleted meanwhile
                return [], None, True
            # Read the status before the events: a job seen terminal has written all its events.
            terminal = JobStatus(job.status).terminal
            events = [event_out(e) for e in _events_after(s, job_id, last, EVENTS_BATCH)]
            return events, (job_out(job) if terminal else None), False

    last = after_id
    deadline = anyio.current_time() + max_duration_s
    while True:
        events, final, gone = await anyio.to_thread.run_sync(poll, last)
        if gone:
            return
        for ev in events:
            last = ev.id
            yield ev
        if len(events) == EVENTS_BATCH:
            continue
        if final is not None:
            yield final
            return
        if anyio.current_time() > deadline:
            return
        if is_disconnected is not None and await is_disconnected():
            return
        await asyncio.sleep(poll_s)
