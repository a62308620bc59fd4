"""``POST /v1/evaluations``: downstream evaluation of an encoder on the tenant's datasets (a job)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import IdempotencyKeyDep, SessionDep, SettingsDep, TenantDep
from app.api.responses import CREATE_PROBLEMS, job_accepted
from app.schemas.jobs import EvaluationRequest, JobOut
from app.services.evaluations import create_evaluation

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"])


@router.post("", status_code=202, response_model=JobOut, responses=CREATE_PROBLEMS)
def create(
    body: EvaluationRequest, response: Response, tenant: TenantDep, session: SessionDep, settings: SettingsDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> JobOut:
    """Queue an ``evaluation`` job (202 + the job). ``encoder_id`` is an encoder the tenant may use, or
    ``scratch`` / ``scratch:<backbone>``; the two datasets must differ and fit the task. The finished job's
    ``result`` holds the metrics with bootstrap 95% CIs and the full report."""
    job, created = create_evaluation(session, settings, tenant.id, body, idempotency_key)
    return job_accepted(response, job, created)
