"""``POST /v1/pretrainings``: specified, validated, but not accepted yet (the worker lands later)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import IdempotencyKeyDep, TenantDep
from app.core.problems import NotAvailableYet, problem_responses
from app.schemas.jobs import JobOut, PretrainingRequest

router = APIRouter(prefix="/v1/pretrainings", tags=["pretrainings"])


@router.post("", status_code=202, response_model=JobOut, responses=problem_responses(401, 422, 501))
def create_pretraining(
    body: PretrainingRequest, tenant: TenantDep, idempotency_key: IdempotencyKeyDep = None
) -> JobOut:
    """**Not available yet**: the request is validated (422 when invalid), then answered with a 501
    problem and nothing is created. When the pretraining worker ships this returns 202 + the job."""
    raise NotAvailableYet("encoder pretraining jobs are not available on this server yet; nothing was created")
