"""``POST /v1/pretrainings``: self-supervised encoder pretraining on the tenant's datasets (a job)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import IdempotencyKeyDep, SessionDep, SettingsDep, TenantDep
from app.api.responses import CREATE_PROBLEMS, job_accepted
from app.schemas.jobs import JobOut, PretrainingRequest
from app.services.ssl_jobs import create_pretraining

router = APIRouter(prefix="/v1/pretrainings", tags=["pretrainings"])


@router.post("", status_code=202, response_model=JobOut, responses=CREATE_PROBLEMS)
def create(
    body: PretrainingRequest, response: Response, tenant: TenantDep, session: SessionDep, settings: SettingsDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> JobOut:
    """Queue a ``pretraining`` job (202 + the job; 200 for an idempotent replay). Every dataset must be
    the tenant's and ready; ``epochs`` are converted to ``steps`` over all their images and the seed is
    recorded in ``params``. On success ``result.encoder_id`` names the new encoder
    (``GET /v1/encoders/{id}/download``)."""
    job, created = create_pretraining(session, settings, tenant.id, body, idempotency_key)
    return job_accepted(response, job, created)
