"""``/healthz`` (process alive), ``/readyz`` (database, broker, storage) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.api.deps import SettingsDep, StoreDep
from app.core.problems import problem_response, problem_responses
from app.services.health import readiness

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz", responses=problem_responses(503), response_model=None)
def readyz(request: Request, settings: SettingsDep, store: StoreDep) -> dict[str, object] | Response:
    """Ready to serve: database ``SELECT 1``, broker reachable, storage reachable; 503 naming what failed."""
    checks = readiness(settings, store)
    failed = sorted(name for name, state in checks.items() if state != "ok")
    if failed:
        return problem_response(request, 503, "not-ready", "Not ready", f"unreachable: {', '.join(failed)}",
                                checks=checks)
    return {"status": "ok", "checks": checks}


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    """Prometheus text format: request latency, jobs by kind and status, queue depth, images generated."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
