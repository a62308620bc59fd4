"""RFC 9457 problem details: one exception type for the services, and the handlers that render it.

Services raise :class:`ProblemError` (or a subclass such as :class:`NotFound`) with a slug, a title and a
detail; the handlers installed by :func:`install_problem_handlers` turn it, FastAPI's validation errors,
Starlette's HTTP errors and anything unexpected into ``application/problem+json`` with ``type``,
``title``, ``status``, ``detail`` and ``instance``. Unexpected errors answer 500 without internals.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

PROBLEM_BASE = "https://cxrsynth.dev/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"

log = logging.getLogger("cxrsynth.api")


class ProblemError(Exception):
    """An error a client can act on; rendered as a problem+json response with ``status``."""

    status: int = 400
    slug: str = "bad-request"
    title: str = "Bad request"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        slug: str | None = None,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        if slug is not None:
            self.slug = slug
        if title is not None:
            self.title = title
        self.headers = dict(headers or {})
        self.extra = extra


class NotFound(ProblemError):
    """Unknown id, or an id of another tenant (the two are indistinguishable on purpose)."""

    status, slug, title = 404, "not-found", "Not found"


class Conflict(ProblemError):
    """The request clashes with the resource's current state (e.g. canceling a finished job)."""

    status, slug, title = 409, "conflict", "Conflict"


class InvalidInput(ProblemError):
    """Well-formed but semantically wrong input (unknown label, bad zip, non-image bytes...)."""

    status, slug, title = 422, "invalid-input", "Invalid input"


class PayloadTooLarge(ProblemError):
    """The upload is over ``max_upload_bytes``."""

    status, slug, title = 413, "payload-too-large", "Payload too large"


class TooManyJobs(ProblemError):
    """The tenant already has ``max_jobs_in_flight_per_tenant`` queued or running jobs."""

    status, slug, title = 429, "too-many-jobs", "Too many jobs in flight"


class Unauthorized(ProblemError):
    """Missing, unknown or revoked API key."""

    status, slug, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="cxrsynth"'})


class Forbidden(ProblemError):
    """A signed URL that is invalid, tampered with or expired."""

    status, slug, title = 403, "forbidden", "Forbidden"


class NotAvailableYet(ProblemError):
    """A feature that is specified but not shipped yet (501)."""

    status, slug, title = 501, "not-available-yet", "Not available yet"


class ServiceUnavailable(ProblemError):
    """A dependency (database, broker, storage) is unreachable."""

    status, slug, title = 503, "service-unavailable", "Service unavailable"


def problem_body(
    status: int, slug: str, title: str, detail: str, instance: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The JSON members of a problem (``type`` is a URI under :data:`PROBLEM_BASE`)."""
    body: dict[str, Any] = {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail}
    if instance is not None:
        body["instance"] = instance
    body.update(extra)
    return body


def problem_response(
    request: Request | None,
    status: int,
    slug: str,
    title: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A ``application/problem+json`` response; ``instance`` is the request path."""
    instance = request.url.path if request is not None else None
    body = problem_body(status, slug, title, detail, instance, **extra)
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=dict(headers or {}),
                        media_type=PROBLEM_CONTENT_TYPE)


def _slug_for(status: int) -> tuple[str, str]:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return phrase.lower().replace(" ", "-").replace("'", ""), phrase


def _clean_validation_errors(errors: Any) -> list[dict[str, Any]]:
    """Pydantic errors without ``input``/``url`` (inputs may be large or secret)."""
    cleaned = []
    for err in errors:
        item = {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        if err.get("ctx"):
            item["ctx"] = {k: str(v) for k, v in err["ctx"].items()}
        cleaned.append(item)
    return cleaned


async def _problem_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return problem_response(request, exc.status, exc.slug, exc.title, exc.detail, exc.headers, **exc.extra)


async def _http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    slug, title = _slug_for(exc.status_code)
    detail = exc.detail if isinstance(exc.detail, str) else title
    if exc.status_code in (204, 304) or exc.status_code < 200:
        return Response(status_code=exc.status_code, headers=exc.headers)
    return problem_response(request, exc.status_code, slug, title, detail, exc.headers)


async def _validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = _clean_validation_errors(exc.errors())
    first = errors[0] if errors else None
    detail = "The request is invalid"
    if first is not None:
        where = ".".join(str(p) for p in first["loc"])
        detail = f"{where}: {first['msg']}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
    return problem_response(request, 422, "validation-error", "Validation error", detail, errors=errors)


async def _data_error_handler(request: Request, exc: Exception) -> Response:
    """The database refused a value that passed validation (a NUL character in text, a number out of range):
    the client's input, so 422, not 500."""
    nul = "NUL" in str(exc)
    log.warning("database refused a value on %s %s: %s", request.method, request.url.path,
                type(getattr(exc, "orig", exc)).__name__)
    detail = ("text values may not contain NUL (\\u0000) characters" if nul
              else "a value of the request cannot be stored (out of range or malformed)")
    return problem_response(request, 422, "invalid-input", "Invalid input", detail)


async def _unhandled_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(request, 500, "internal-error", "Internal server error",
                            "An unexpected error occurred; it has been logged.")


def install_problem_handlers(app: FastAPI) -> None:
    """Render every error of ``app`` as problem+json."""
    app.add_exception_handler(ProblemError, _problem_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(DataError, _data_error_handler)
    app.add_exception_handler(Exception, _unhandled_error_handler)


# Shared OpenAPI description of problem responses (routes list the statuses they can answer).
PROBLEM_SCHEMA: dict[str, Any] = {
    "content": {
        PROBLEM_CONTENT_TYPE: {
            "schema": {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "format": "uri"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                    "instance": {"type": "string"},
                },
                "required": ["type", "title", "status", "detail"],
            }
        }
    }
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status documented as a problem+json body."""
    out: dict[int | str, dict[str, Any]] = {}
    for s in statuses:
        out[s] = {"description": _slug_for(s)[1], **PROBLEM_SCHEMA}
    return out
