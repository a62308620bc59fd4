"""``/v1/jobs``: read, list, cancel and follow jobs of every kind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import format_sse_event
from starlette.responses import StreamingResponse

from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.core.problems import problem_responses
from app.db.orm import JobKind, JobStatus
from app.schemas.common import Page
from app.schemas.jobs import JobEventOut, JobOut
from app.services import jobs as svc

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

CursorQuery = Annotated[str | None, Query(max_length=500, description="next_cursor of the previous page")]
LimitQuery = Annotated[int | None, Query(ge=1, description="Page size (default 50, at most page_size_max)")]


@router.get("", response_model=Page[JobOut], responses=problem_responses(401, 422))
def list_jobs(
    tenant: TenantDep, session: SessionDep, settings: SettingsDep,
    kind: JobKind | None = None, status: JobStatus | None = None, cursor: CursorQuery = None, limit: LimitQuery = None,
) -> Page[JobOut]:
    """The tenant's jobs, newest first (ties broken by id), optionally of one kind and/or status."""
    rows, next_cursor = svc.list_jobs(session, settings, tenant.id, kind=kind, status=status, cursor=cursor,
                                      limit=limit)
    return Page[JobOut](items=[svc.job_out(j) for j in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=problem_responses(401, 404))
def get_job(job_id: str, tenant: TenantDep, session: SessionDep) -> JobOut:
    """One job: status, progress, params, result, error, timings."""
    return svc.job_out(svc.get_job(session, tenant.id, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=problem_responses(401, 404, 409))
def cancel_job(job_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> JobOut:
    """Cancel a job. Queued: canceled at once. Running: ``cancel_requested`` is set and the worker stops
    between steps. Finished (succeeded, failed, canceled): 409."""
    return svc.job_out(svc.cancel_job(session, settings, tenant.id, job_id))


_EVENTS_RESPONSES = {
    200: {
        "description": "`text/event-stream` (default): one `progress` event per job event with `id:` = the "
                       "event id, then one `end` event carrying the job once it is terminal. "
                       "`?format=json`: the events so far as a JSON list.",
        # One schema per event (``itemSchema``, OpenAPI 3.2's way for event streams, as FastAPI writes it).
        "content": {"text/event-stream": {"itemSchema": {
                        "type": "object",
                        "properties": {"event": {"type": "string", "enum": ["progress", "end"]},
                                       "data": {"type": "string", "description": "JSON: a JobEventOut "
                                                "(progress) or the JobOut (end)"},
                                       "id": {"type": "string"}, "retry": {"type": "integer", "minimum": 0}}}},
                    "application/json": {"schema": {"type": "array",
                                                    "items": {"$ref": "#/components/schemas/JobEventOut"}}}},
    },
    **problem_responses(401, 404, 422),
}


@router.get("/{job_id}/events", response_model=None, responses=_EVENTS_RESPONSES)
async def job_events(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    format: Literal["sse", "json"] = "sse",
    after: Annotated[int | None, Query(ge=0, description="Only events with a larger id")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=30)] = None,
) -> list[JobEventOut] | StreamingResponse:
    """Progress and log lines of a job, as Server-Sent Events until the job is terminal (resume with
    ``Last-Event-ID``), or with ``format=json`` as a plain list."""
    start = after or 0
    if last_event_id and last_event_id.strip().isdigit():
        start = max(start, int(last_event_id.strip()))
    events = await run_in_threadpool(svc.list_job_events, session, tenant.id, job_id, start)  # tenancy check
    if format == "json":
        return [svc.event_out(e) for e in events]
    session.close()  # the stream polls with its own short sessions

    async def stream() -> AsyncIterator[bytes]:
        yield format_sse_event(retry=2000, comment="job events")
        async for item in svc.follow_job_events(settings.database_url, job_id, start,
                                                is_disconnected=request.is_disconnected):
            if isinstance(item, JobEventOut):
                yield format_sse_event(event="progress", id=str(item.id), data_str=item.model_dump_json())
            else:
                yield format_sse_event(event="end", data_str=item.model_dump_json())

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
