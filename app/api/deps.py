"""Request dependencies as ``Annotated`` aliases: settings, a DB session, the object store, the tenant.

Routes declare e.g. ``session: SessionDep, tenant: TenantDep``; the app built by ``create_app`` keeps
its settings, store and metrics on ``app.state``, so several apps (tests) can live in one process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.problems import Unauthorized
from app.db.orm import Tenant
from app.db.session import get_sessionmaker
from app.services.tenants import authenticate
from app.storage.base import ObjectStore


# The dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency in its thread
# pool, and each such hop costs a thread handoff per request (benchmarks/api_load.py, docs/results/api_load.md).
async def get_app_settings(request: Request) -> Settings:
    """The settings of the app serving this request."""
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_session(settings: SettingsDep) -> AsyncIterator[Session]:
    """One session per request; service functions commit, the session is closed afterwards.

    Making a ``Session`` touches no database (it connects on its first query, in the route's thread), so it
    is made on the event loop; closing it may give a connection back to the pool (a rollback on the wire),
    so that runs in the thread pool, one hop instead of a sync generator's two."""
    session = get_sessionmaker(settings.database_url)()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


SessionDep = Annotated[Session, Depends(get_session)]


async def get_store(request: Request) -> ObjectStore:
    """The app's object store (S3 or local folder)."""
    return request.app.state.store  # type: ignore[no-any-return]


StoreDep = Annotated[ObjectStore, Depends(get_store)]

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer cxr_...`")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: cxr_...`")


def current_tenant(
    session: SessionDep,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> Tenant:
    """The tenant of the request's API key (Bearer or ``X-API-Key``); 401 problem when missing,
    unknown or revoked (the three are not told apart)."""
    key = bearer.credentials if bearer is not None else api_key
    if not key:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer cxr_...' or 'X-API-Key'")
    tenant = authenticate(session, key.strip(), settings.auth_cache_ttl_s)
    if tenant is None:
        raise Unauthorized("the API key is invalid or revoked")
    return tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]

IdempotencyKeyDep = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
           description="Same key + same body returns the same job; same key + other body answers 409."),
]
