"""``/v1/admin``: operator endpoints, enabled by the ``CXRSYNTH_ADMIN_TOKEN`` setting.

Authenticated with ``Authorization: Bearer <admin token>`` (not a tenant key). Without the setting
every admin endpoint answers 401 (like every other operation without a valid credential). Today: review
a dataset of any tenant and override (or revoke an override of) a synthetic dataset's privacy gate;
every override is recorded.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.deps import SessionDep, SettingsDep
from app.core.problems import Unauthorized, problem_responses
from app.db.orm import Dataset
from app.schemas.releases import AdminDatasetOut, GateOverrideRequest
from app.services import releases
from app.services.datasets import dataset_out

router = APIRouter(prefix="/v1/admin", tags=["admin"])

_admin_bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken",
                           description="`Authorization: Bearer <CXRSYNTH_ADMIN_TOKEN>`")


def require_admin(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)],
) -> None:
    """401 for a missing or wrong token, and when admin endpoints are disabled (no admin token set)."""
    expected = settings.admin_token.get_secret_value()
    if not expected:
        raise Unauthorized("admin endpoints are disabled on this service (CXRSYNTH_ADMIN_TOKEN is not set)")
    given = credentials.credentials if credentials is not None else ""
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("the admin token is missing or wrong")


AdminDep = Annotated[None, Depends(require_admin)]


def _admin_out(ds: Dataset) -> AdminDatasetOut:
    return AdminDatasetOut(**dataset_out(ds).model_dump(), tenant_id=ds.tenant_id)


@router.get("/datasets/{dataset_id}", response_model=AdminDatasetOut, responses=problem_responses(401, 404))
def get_dataset(dataset_id: str, _: AdminDep, session: SessionDep) -> AdminDatasetOut:
    """A dataset of any tenant, with its privacy summary and gate status (to review before an override)."""
    return _admin_out(releases.get_any_dataset(session, dataset_id))


@router.post("/datasets/{dataset_id}/gate-override", response_model=AdminDatasetOut,
             responses=problem_responses(401, 404, 409, 422))
def override_gate(dataset_id: str, body: GateOverrideRequest, _: AdminDep, session: SessionDep) -> AdminDatasetOut:
    """Allow the tenant to download a synthetic dataset whose privacy gate failed or was not run.

    Recorded on the dataset (``gate_override``: by, reason, at, gate result), in the source job's events
    and in the ``cxrsynth.audit`` log. 409 when the gate passed, for real datasets, or when already overridden.
    """
    return _admin_out(releases.override_gate(session, dataset_id, body.actor, body.reason))


@router.delete("/datasets/{dataset_id}/gate-override", response_model=AdminDatasetOut,
               responses=problem_responses(401, 404, 409, 422))
def revoke_gate_override(
    dataset_id: str, _: AdminDep, session: SessionDep,
    actor: Annotated[str, Query(min_length=1, max_length=200, description="Who revokes.")],
    reason: Annotated[str, Query(min_length=10, max_length=2000, description="Why.")],
) -> AdminDatasetOut:
    """Withdraw an override (recorded like the override). Links already handed out expire on their own."""
    return _admin_out(releases.revoke_gate_override(session, dataset_id, actor, reason))
