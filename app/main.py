"""``create_app()``: the cxrsynth REST API (routers under ``/v1``, problem+json errors, Prometheus metrics).

Run it with ``uvicorn --factory app.main:create_app`` or ``cxrsynth serve``. On start-up (lifespan) the
database is migrated to head and the built-in generator/encoder rows are upserted.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from app.api.openapi_extras import install_openapi_extras
from app.api.routes import admin as admin_routes
from app.api.routes import datasets, encoders, evaluations, files, generations, generators, health, jobs, pretrainings
from app.console.routes import install_console
from app.core.config import Settings, get_settings
from app.core.metrics import RequestMetricsMiddleware, ServiceMetrics, StateCollector
from app.core.problems import install_problem_handlers
from app.db.session import get_sessionmaker, migrate
from app.services import health as health_svc
from app.services.model_assets import ensure_builtin_models
from app.storage.base import ObjectStore, build_store

log = logging.getLogger("cxrsynth.api")

API_DESCRIPTION = """
Privacy-safe synthetic chest X-rays from diffusion models.

* Authenticate with `Authorization: Bearer cxr_...` (or `X-API-Key: cxr_...`).
* Long work runs as **jobs** (`/v1/jobs`): creation endpoints answer `202` with the job; follow it with
  `GET /v1/jobs/{id}` or `GET /v1/jobs/{id}/events` (Server-Sent Events). Every create accepts an
  `Idempotency-Key` header.
* Errors are RFC 9457 `application/problem+json`.
* `POST /v1/pretrainings` and `POST /v1/evaluations` are specified but **not available yet** (501).
"""


def startup(settings: Settings, store: ObjectStore) -> None:
    """Migrate the database, make sure the bucket exists (S3) and upsert the built-in models."""
    migrate(settings.database_url)
    ensure_bucket = getattr(store, "ensure_bucket", None)
    if callable(ensure_bucket):
        try:
            ensure_bucket()
        except Exception:
            log.exception("could not create the bucket; /readyz will report storage")
    with get_sessionmaker(settings.database_url)() as session:
        ensure_builtin_models(session, settings)


def create_app(settings: Settings | None = None, store: ObjectStore | None = None) -> FastAPI:
    """Build the API for ``settings`` (default: the process settings) and ``store`` (default: the store
    the settings select). Nothing touches the database until the app starts (lifespan)."""
    settings = settings or get_settings()
    store = store or build_store(settings)
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(startup, settings, store)
        yield

    app = FastAPI(title="cxrsynth", version="0.1.0", description=API_DESCRIPTION, lifespan=lifespan,
                  openapi_url="/openapi.json", docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.store = store
    app.state.metrics = metrics
    metrics.registry.register(StateCollector(
        job_counts=lambda: health_svc.job_counts(settings),
        queue_depths=lambda: health_svc.queue_depths(settings),
        images_generated=lambda: health_svc.images_generated(settings),
    ))
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    install_problem_handlers(app)
    for module in (jobs, generations, generators, datasets, pretrainings, evaluations, encoders, files, health):
        app.include_router(module.router)
    app.include_router(admin_routes.router)  # /v1/admin (app/api/routes/admin.py)
    install_console(app)  # web console under /console (and / redirects there)
    install_openapi_extras(app)  # OpenAPI links between operations, 400 of bodies (app/api/openapi_extras.py)
    return app
