"""``POST /v1/generations``: make synthetic images with a generator (a job)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import IdempotencyKeyDep, SessionDep, SettingsDep, TenantDep
from app.api.responses import CREATE_PROBLEMS, job_accepted
from app.schemas.jobs import GenerationRequest, JobOut
from app.services.generations import create_generation

router = APIRouter(prefix="/v1/generations", tags=["generations"])


@router.post("", status_code=202, response_model=JobOut, responses=CREATE_PROBLEMS)
def create(
    body: GenerationRequest, response: Response, tenant: TenantDep, session: SessionDep, settings: SettingsDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> JobOut:
    """Queue a generation job (202 + the job; 200 for an idempotent replay). Labels are checked against
    the generator's labels and ``n`` against ``max_images_per_job``; the seed is recorded in ``params``."""
    job, created = create_generation(session, settings, tenant.id, body, idempotency_key)
    return job_accepted(response, job, created)
