"""The web console under ``/console``: Jinja2 pages over the services the ``/v1`` routes call.

Data flows one way, as in the API: every page validates, authorises (the tenant of the API key in the
session cookie, see :mod:`app.console.session`) and calls ``app.services.*``; it never runs a model and
holds no business rule of its own. Errors the services raise (:class:`ProblemError`: 404 for another
tenant's ids, 409, 422...) are rendered as an HTML page with the same status, title and detail the API
would answer with (:class:`ConsoleRoute`). Images are shown through the services' short-lived signed URLs.

Mounted by :func:`install_console` (``app.main``): the router, ``/console/static`` and ``/`` -> console.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from app.api.deps import SessionDep, SettingsDep, StoreDep
from app.console import reports
from app.console.render import (
    fmt_bytes,
    fmt_number,
    fmt_time,
    humanise_key,
    is_number_list,
    is_row_table,
    is_table,
    render_card,
    security_headers,
    table_columns,
)
from app.console.session import (
    ConsoleSession,
    clear_session,
    csrf_ok,
    new_session,
    read_session,
    same_origin,
    write_session,
)
from app.core.config import Settings
from app.core.problems import Forbidden, InvalidInput, NotFound, ProblemError
from app.db.orm import ACTIVE_STATUSES, Encoder, Generator, JobKind, Tenant
from app.schemas.common import DownloadLink
from app.schemas.datasets import DatasetImage
from app.schemas.jobs import GenerationRequest
from app.services import datasets as datasets_svc
from app.services import jobs as jobs_svc
from app.services import model_assets as assets_svc
from app.services.exports import formats_for
from app.services.generations import create_generation
from app.services.pagination import encode_cursor
from app.services.tenants import authenticate
from app.storage.base import ObjectStore
from models.release.writers import FORMATS
from models.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS

HERE = Path(__file__).resolve().parent
PREFIX = "/console"
GALLERY_PAGE = 24
JOBS_PAGE = 20
LIST_PAGE = 25
POLL_IDS_MAX = 50
EVENTS_SHOWN = 200

templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters.update(num=fmt_number, when=fmt_time, size=fmt_bytes, human=humanise_key)
templates.env.tests.update(table=is_table, rowtable=is_row_table, numbers=is_number_list)
templates.env.globals.update(PREFIX=PREFIX, table_columns=table_columns)


# --------------------------------------------------------------------------------------------------
# Who is looking, and how errors look
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Viewer:
    """The logged-in tenant and its console session (for the CSRF token of forms)."""

    tenant: Tenant
    session: ConsoleSession


class LoginRequired(Exception):
    """No valid session (absent, expired, tampered with, or the key was revoked): go to the login page."""


def current_viewer(request: Request, session: SessionDep, settings: SettingsDep) -> Viewer:
    """The tenant of the session cookie's API key, checked against the database on every request."""
    cs = read_session(request, settings)
    if cs is None or cs.api_key is None:
        raise LoginRequired
    tenant = authenticate(session, cs.api_key)
    if tenant is None:
        raise LoginRequired
    viewer = Viewer(tenant, cs)
    request.state.viewer = viewer
    return viewer


ViewerDep = Annotated[Viewer, Depends(current_viewer)]


async def checked_form(request: Request, viewer: ViewerDep) -> FormData:
    """The POSTed form of a logged-in viewer, after the CSRF checks (token and, when the browser sends
    them, ``Sec-Fetch-Site``/``Origin``); 403 page otherwise."""
    form = await request.form()
    token = form.get("csrf_token")
    if not same_origin(request) or not csrf_ok(viewer.session, token if isinstance(token, str) else None):
        raise Forbidden("the form is stale or did not come from this console; reload the page and try again",
                        slug="csrf")
    return form


FormDep = Annotated[FormData, Depends(checked_form)]


def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """Render a template with the viewer (nav, tenant name, CSRF token) in its context."""
    viewer: Viewer | None = getattr(request.state, "viewer", None)
    return templates.TemplateResponse(
        request, template, {"viewer": viewer, "csrf": viewer.session.csrf if viewer else "", **context},
        status_code=status)


def error_page(request: Request, status: int, title: str, detail: str, **context: Any) -> HTMLResponse:
    """The HTML twin of a problem+json answer."""
    return page(request, "error.html", status, status_code=status, title=title, detail=detail, **context)


def _login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET" or not target.startswith(PREFIX + "/"):
        target = PREFIX + "/jobs"
    return RedirectResponse(f"{PREFIX}/login?{_qs(next=target)}", status_code=303)


def _back_link(request: Request, status: int) -> dict[str, str]:
    """Where an error page leads back to: the dataset, job or model the request was about (when that
    itself exists, i.e. the error was not a 404), else the jobs page."""
    params = request.path_params
    if status != 404:
        if "dataset_id" in params:
            return {"back": f"{PREFIX}/datasets/{params['dataset_id']}", "back_label": "Back to the dataset"}
        if "job_id" in params:
            return {"back": f"{PREFIX}/jobs/{params['job_id']}", "back_label": "Back to the job"}
        if "asset_id" in params and params.get("kind") in ("generators", "encoders"):
            return {"back": f"{PREFIX}/{params['kind']}/{params['asset_id']}", "back_label": "Back"}
    return {}


class ConsoleRoute(APIRoute):
    """Route class of the console: problems become HTML error pages, missing logins a redirect to the
    login page, and every response carries the console's security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                response = await handler(request)
            except LoginRequired:
                response = _login_redirect(request)
            except ProblemError as exc:
                response = error_page(request, exc.status, exc.title, exc.detail, **_back_link(request, exc.status))
                response.headers.update(exc.headers)
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {}
                where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
                response = error_page(request, 422, "Validation error",
                                      f"{where}: {first.get('msg', 'invalid request')}")
            settings: Settings = request.app.state.settings
            for name, value in security_headers(settings).items():
                response.headers.setdefault(name, value)
            return response

        return run


router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute, include_in_schema=False)


def _qs(**params: Any) -> str:
    return urlencode({k: v for k, v in params.items() if v not in (None, "")})


def _safe_next(target: str | None) -> str:
    """Only redirect to a console path of this site (never ``//host`` or another scheme)."""
    if target and target.startswith(PREFIX + "/") and not target.startswith("//") and "\\" not in target:
        return target
    return PREFIX + "/jobs"


# --------------------------------------------------------------------------------------------------
# Login and logout
# --------------------------------------------------------------------------------------------------
@router.get("/login")
def login_form(request: Request, session: SessionDep, settings: SettingsDep, next: str | None = None) -> Response:
    """The login form. A session cookie with a CSRF token is set before login (login CSRF)."""
    cs = read_session(request, settings)
    if cs is not None and cs.api_key is not None and authenticate(session, cs.api_key) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    cs = new_session() if cs is None else ConsoleSession(csrf=cs.csrf)
    response = templates.TemplateResponse(request, "login.html", {"viewer": None, "csrf": cs.csrf,
                                                                  "next": _safe_next(next), "error": None})
    write_session(response, request, settings, cs)
    return response


@router.post("/login")
async def login(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    """Check the API key; on success a new session (fresh CSRF token) holds it."""
    form = await request.form()
    cs = read_session(request, settings)
    token, key, target = form.get("csrf_token"), form.get("api_key"), form.get("next")
    if not same_origin(request) or not csrf_ok(cs, token if isinstance(token, str) else None):
        raise Forbidden("the login form has expired; reload the page and try again", slug="csrf")
    assert cs is not None
    target = _safe_next(target if isinstance(target, str) else None)
    key = key.strip() if isinstance(key, str) else ""
    tenant = await run_in_threadpool(authenticate, session, key) if key else None
    if tenant is None:
        message = "the API key is invalid or revoked" if key else "enter your API key"
        return templates.TemplateResponse(request, "login.html", {"viewer": None, "csrf": cs.csrf, "next": target,
                                                                  "error": message}, status_code=401)
    response = RedirectResponse(target, status_code=303)
    write_session(response, request, settings, new_session(key))
    return response


@router.post("/logout")
def logout(request: Request, form: FormDep) -> Response:
    """End the session (the cookie is deleted; the API key itself stays valid)."""
    response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    clear_session(response, request)
    return response


@router.get("")
@router.get("/")
def console_home() -> Response:
    """The console starts at the jobs page."""
    return RedirectResponse(f"{PREFIX}/jobs", status_code=303)


# --------------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------------
def _generators(session: Session, settings: Settings, tenant_id: str) -> list[Any]:
    rows, _ = assets_svc.list_assets(session, settings, Generator, tenant_id, None, settings.page_size_max)
    return [assets_svc.generator_out(g) for g in rows if g.status == "ready"]


def _job_row(job: Any) -> dict[str, Any]:
    """What the jobs table and the status poller show of a job."""
    out = jobs_svc.job_out(job)
    dataset_id = (out.result or {}).get("dataset_id") if out.result else None
    return {"job": out, "active": out.status.value in ACTIVE_STATUSES, "dataset_id": dataset_id,
            "percent": round(out.progress.fraction * 100)}


def _form_defaults() -> dict[str, str]:
    return {"n": "", "sampler": DEFAULT_SAMPLER, "guidance_scale": "2.0", "num_inference_steps": "", "seed": "",
            "label": "", "name": "", "generator_id": ""}


def _jobs_page(request: Request, viewer: Viewer, session: Session, settings: Settings, *, cursor: str | None = None,
               values: dict[str, str] | None = None, errors: dict[str, str] | None = None,
               form_error: str | None = None, status: int = 200) -> HTMLResponse:
    rows, next_cursor = jobs_svc.list_jobs(session, settings, viewer.tenant.id, cursor=cursor, limit=JOBS_PAGE)
    generators = _generators(session, settings, viewer.tenant.id)
    labels = sorted({name for g in generators for name in g.labels})
    return page(request, "jobs.html", status, jobs=[_job_row(j) for j in rows], next_cursor=next_cursor,
                cursor=cursor, generators=generators, labels=labels, samplers=SAMPLERS, default_steps=DEFAULT_STEPS,
                values=values or _form_defaults(), errors=errors or {}, form_error=form_error,
                form_id="console-" + secrets.token_urlsafe(16), max_images=settings.max_images_per_job)


@router.get("/jobs")
def jobs_page(request: Request, viewer: ViewerDep, session: SessionDep, settings: SettingsDep,
              cursor: Annotated[str | None, Query(max_length=500)] = None) -> Response:
    """The tenant's jobs (newest first, live progress) and the generation form."""
    return _jobs_page(request, viewer, session, settings, cursor=cursor)


def generation_body(form: FormData, labels: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The JSON body a ``POST /v1/generations`` would carry, from the form's fields (blank = not given),
    and the raw values to show the form again. ``counts_LABEL`` fields become ``counts``."""
    raw = {k: v.strip() for k, v in form.items() if isinstance(v, str)}
    body: dict[str, Any] = {}
    for field in ("generator_id", "n", "label", "sampler", "num_inference_steps", "guidance_scale", "seed", "name"):
        if raw.get(field):
            body[field] = raw[field]
    counts = {label: raw[f"counts_{label}"] for label in labels if raw.get(f"counts_{label}")}
    if counts:
        body["counts"] = counts
    return body, raw


def validation_messages(exc: ValidationError) -> tuple[dict[str, str], str | None]:
    """Pydantic's messages (the ones the API's 422 problem carries) by form field; model-level ones
    (e.g. "give either counts, or n ...") as the form's message."""
    by_field: dict[str, str] = {}
    general: list[str] = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        msg = str(err.get("msg", "invalid"))
        if not loc:
            general.append(msg.removeprefix("Value error, "))
            continue
        general.append(f"{'.'.join(loc)}: {msg}")  # as the API's problem detail words it
        if loc[0] == "counts" and len(loc) > 1:
            by_field.setdefault(f"counts_{loc[1]}", msg)
        else:
            by_field.setdefault(loc[0], msg)
    return by_field, ("; ".join(general) or None)


@router.post("/jobs")
def create_generation_job(request: Request, viewer: ViewerDep, form: FormDep, session: SessionDep,
                          settings: SettingsDep) -> Response:
    """Queue a generation from the form, through the service ``POST /v1/generations`` calls (same
    validation, same messages); the form's ``form_id`` is the Idempotency-Key, so a double submit makes
    one job."""
    generators = _generators(session, settings, viewer.tenant.id)
    labels = sorted({name for g in generators for name in g.labels})
    body, raw = generation_body(form, labels)
    values = {**_form_defaults(), **{k: v for k, v in raw.items() if k != "csrf_token"}}
    try:
        req = GenerationRequest.model_validate(body)
    except ValidationError as exc:
        errors, general = validation_messages(exc)
        return _jobs_page(request, viewer, session, settings, values=values, errors=errors,
                          form_error=general, status=422)
    form_id = raw.get("form_id") or None
    try:
        job, _ = create_generation(session, settings, viewer.tenant.id, req,
                                   form_id[:200] if form_id and form_id.isascii() else None)
    except ProblemError as exc:
        field = "label" if exc.slug == "unknown-label" and "label" in body else (
            "n" if exc.slug == "too-many-images" and "n" in body else None)
        return _jobs_page(request, viewer, session, settings, values=values, errors={field: exc.detail} if field
                          else {}, form_error=exc.detail, status=exc.status)
    return RedirectResponse(f"{PREFIX}/jobs/{job.id}?created=1", status_code=303)


@router.get("/jobs/status")
def jobs_status(viewer: ViewerDep, session: SessionDep,
                id: Annotated[list[str], Query(max_length=POLL_IDS_MAX)]) -> JSONResponse:
    """Progress of some of the tenant's jobs, for the page's poller (ids of other tenants: left out)."""
    out = []
    for job_id in id[:POLL_IDS_MAX]:
        try:
            row = _job_row(jobs_svc.get_job(session, viewer.tenant.id, job_id[:64]))
        except NotFound:
            continue
        job = row["job"]
        out.append({"id": job.id, "status": job.status.value, "active": row["active"], "percent": row["percent"],
                    "fraction": job.progress.fraction, "message": job.progress.message, "step": job.progress.step,
                    "total": job.progress.total, "cancel_requested": job.cancel_requested,
                    "dataset_url": f"{PREFIX}/datasets/{row['dataset_id']}" if row["dataset_id"] else None,
                    "error": (job.error or {}).get("message") if job.error else None})
    return JSONResponse({"jobs": out}, headers={"Cache-Control": "no-store"})


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, viewer: ViewerDep, session: SessionDep, created: bool = False) -> Response:
    """One job: progress (live), parameters, result, error and its event log."""
    job = jobs_svc.get_job(session, viewer.tenant.id, job_id)
    events = jobs_svc.list_job_events(session, viewer.tenant.id, job_id)
    return page(request, "job.html", row=_job_row(job), events=[jobs_svc.event_out(e) for e in events][-EVENTS_SHOWN:],
                events_shown=EVENTS_SHOWN, created=created)


@router.get("/jobs/{job_id}/events")
def job_events(job_id: str, viewer: ViewerDep, session: SessionDep,
               after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0) -> JSONResponse:
    """The job's events with ``id > after`` (oldest first, at most ``EVENTS_SHOWN``), for the job page's
    poller, and whether the job is still active. The status is read before the events, so an inactive
    answer with fewer than ``EVENTS_SHOWN`` events ends the log: the poller can stop."""
    job = jobs_svc.get_job(session, viewer.tenant.id, job_id)  # 404 page for another tenant's job
    active = job.status in ACTIVE_STATUSES
    events = jobs_svc.list_job_events(session, viewer.tenant.id, job_id, after, EVENTS_SHOWN)
    return JSONResponse({"events": [jobs_svc.event_out(e).model_dump(mode="json") for e in events],
                         "active": active}, headers={"Cache-Control": "no-store"})


@router.post("/jobs/{job_id}/cancel")
def cancel_job(request: Request, job_id: str, viewer: ViewerDep, form: FormDep, session: SessionDep,
               settings: SettingsDep) -> Response:
    """Cancel through the service ``POST /v1/jobs/{id}/cancel`` calls (409 page for a finished job)."""
    jobs_svc.cancel_job(session, settings, viewer.tenant.id, job_id)
    back = form.get("next")
    return RedirectResponse(_safe_next(back if isinstance(back, str) else f"{PREFIX}/jobs/{job_id}"), status_code=303)


# --------------------------------------------------------------------------------------------------
# Datasets: list, gallery, one image, downloads
# --------------------------------------------------------------------------------------------------
@router.get("/datasets")
def datasets_page(request: Request, viewer: ViewerDep, session: SessionDep, settings: SettingsDep,
                  cursor: Annotated[str | None, Query(max_length=500)] = None) -> Response:
    """The tenant's datasets, newest first."""
    rows, next_cursor = datasets_svc.list_datasets(session, settings, viewer.tenant.id, cursor=cursor,
                                                   limit=min(LIST_PAGE, settings.page_size_max))
    return page(request, "datasets.html", datasets=[datasets_svc.dataset_out(d) for d in rows],
                next_cursor=next_cursor, cursor=cursor)


def _offset_cursor(start: int) -> str | None:
    # The opaque cursor of ``list_dataset_images`` is an offset into the manifest (see that function);
    # pages and image positions are addressed by number here so that both directions can be linked.
    return encode_cursor("offset", start) if start > 0 else None


def _images(session: Session, store: ObjectStore, settings: Settings, tenant_id: str, dataset_id: str,
            label: str | None, start: int, limit: int) -> tuple[list[DatasetImage], bool]:
    items, next_cursor = datasets_svc.list_dataset_images(session, store, settings, tenant_id, dataset_id,
                                                          label=label, cursor=_offset_cursor(start), limit=limit)
    return items, next_cursor is not None


def _image_views(ds: Any, store: ObjectStore, items: list[DatasetImage], start: int) -> list[dict[str, Any]]:
    rows = reports.manifest_rows(store, ds.manifest_key) if ds.manifest_key else {}
    views = []
    for offset, item in enumerate(items):
        row = rows.get(item.file, {})
        views.append({"item": item, "pos": start + offset, "row": row,
                      "alt": reports.image_alt(ds.origin, item.file, item.label, row)})
    return views


def _formats(ds: Any | None = None) -> list[str]:
    """The export formats the download service offers (for ``ds``: those its kind of dataset has), so a
    new format shows up here by itself."""
    names = list(FORMATS)  # the registry: models/release/writers.py::EXPORT_FORMATS
    if ds is None:
        return names
    offered = set(formats_for(ds))
    return [f for f in names if f in offered]


LabelQuery = Annotated[str | None, Query(max_length=100)]


@router.get("/datasets/{dataset_id}")
def dataset_page(request: Request, dataset_id: str, viewer: ViewerDep, session: SessionDep, store: StoreDep,
                 settings: SettingsDep, label: LabelQuery = None,
                 page_no: Annotated[int, Query(alias="page", ge=1, le=1_000_000)] = 1) -> Response:
    """Gallery: paged thumbnails (optionally one label), privacy summary, download buttons."""
    ds = datasets_svc.get_dataset(session, viewer.tenant.id, dataset_id)
    out = datasets_svc.dataset_out(ds)
    size = min(GALLERY_PAGE, settings.page_size_max)
    label = label.strip().lower() if label else None
    images: list[dict[str, Any]] = []
    has_next = False
    blocked = None
    if ds.status == "ready" and ds.manifest_key:
        try:
            items, has_next = _images(session, store, settings, viewer.tenant.id, dataset_id, label,
                                      (page_no - 1) * size, size)
        except ProblemError as exc:  # e.g. 409 privacy-gate: image links are downloads too
            if exc.status == 404:
                raise
            blocked = exc.detail
        else:
            images = _image_views(ds, store, items, (page_no - 1) * size)
    return page(request, "dataset.html", ds=out, images=images, label=label, page_no=page_no, has_next=has_next,
                formats=_formats(ds), privacy=reports.privacy_view(out), blocked=blocked)


@router.get("/datasets/{dataset_id}/images/{pos}")
def image_page(request: Request, dataset_id: str, pos: int, viewer: ViewerDep, session: SessionDep,
               store: StoreDep, settings: SettingsDep, label: LabelQuery = None) -> Response:
    """One image at full size with its manifest row (seed, label, nearest-neighbour similarity...)."""
    if pos < 0:
        raise NotFound(f"no image {pos}")
    ds = datasets_svc.get_dataset(session, viewer.tenant.id, dataset_id)
    label = label.strip().lower() if label else None
    items, has_next = _images(session, store, settings, viewer.tenant.id, dataset_id, label, pos, 1)
    if not items:
        raise NotFound(f"dataset {dataset_id} has no image {pos}" + (f" with label {label}" if label else ""))
    view = _image_views(ds, store, items, pos)[0]
    return page(request, "image.html", ds=datasets_svc.dataset_out(ds), view=view, label=label, has_next=has_next,
                gallery_page=pos // min(GALLERY_PAGE, settings.page_size_max) + 1)


@router.get("/datasets/{dataset_id}/download")
def dataset_download(request: Request, dataset_id: str, viewer: ViewerDep, session: SessionDep, store: StoreDep,
                     settings: SettingsDep, format: Annotated[str, Query(max_length=40)] = "zip") -> Response:
    """Redirect to the signed URL ``GET /v1/datasets/{id}/download`` hands out; while a worker builds the
    export, a page that asks again after the service's ``retry_after_s``; a 4xx page otherwise (unknown
    format, privacy gate not passed, not ready...)."""
    if format not in _formats():
        raise InvalidInput(f"unknown format {format!r}; one of {', '.join(_formats())}", slug="unknown-format")
    result = datasets_svc.dataset_download(session, store, settings, viewer.tenant.id, dataset_id, format)  # type: ignore[arg-type]
    if isinstance(result, DownloadLink):
        return RedirectResponse(result.url, status_code=303)
    ds = datasets_svc.dataset_out(datasets_svc.get_dataset(session, viewer.tenant.id, dataset_id))
    retry = max(1, int(getattr(result, "retry_after_s", 5)))
    response = page(request, "export_pending.html", 202, ds=ds, format=format, retry=retry,
                    detail=getattr(result, "detail", "the export is being built"),
                    attempt=getattr(result, "attempt", None))
    response.headers["Retry-After"] = str(retry)
    return response


@router.get("/datasets/{dataset_id}/report")
def dataset_report_page(request: Request, dataset_id: str, viewer: ViewerDep, session: SessionDep,
                        store: StoreDep) -> Response:
    """The privacy report of a dataset: summary, figures and closest pairs (or "gate not run")."""
    ds = datasets_svc.get_dataset(session, viewer.tenant.id, dataset_id)
    out = datasets_svc.dataset_out(ds)
    report = reports.privacy_report(store, ds)
    return page(request, "dataset_report.html", ds=out, privacy=reports.privacy_view(out), report=report)


@router.get("/datasets/{dataset_id}/report/{name}")
def dataset_report_file(dataset_id: str, name: str, viewer: ViewerDep, session: SessionDep,
                        store: StoreDep) -> Response:
    """A figure of the dataset's privacy report, streamed after the tenant check."""
    ds = datasets_svc.get_dataset(session, viewer.tenant.id, dataset_id)
    report = reports.privacy_report(store, ds)
    key = next((f.key for f in report.figures if f.name == name), None) if report else None
    if key is None:
        raise NotFound(f"dataset {dataset_id} has no report figure {name}")
    return Response(store.get_bytes(key), media_type=reports.content_type(name),
                    headers={"Cache-Control": "private, max-age=300"})


# --------------------------------------------------------------------------------------------------
# Reports, generators, encoders
# --------------------------------------------------------------------------------------------------
@router.get("/reports")
def reports_page(request: Request, viewer: ViewerDep, session: SessionDep, settings: SettingsDep) -> Response:
    """Privacy gates of the synthetic datasets, fidelity of the generators, evaluations of encoders."""
    rows, _ = datasets_svc.list_datasets(session, settings, viewer.tenant.id, origin="synthetic",
                                         limit=min(LIST_PAGE, settings.page_size_max))
    datasets = [datasets_svc.dataset_out(d) for d in rows]
    gens, _ = assets_svc.list_assets(session, settings, Generator, viewer.tenant.id, None, settings.page_size_max)
    evals, _ = jobs_svc.list_jobs(session, settings, viewer.tenant.id, kind=JobKind.evaluation,
                                  limit=settings.page_size_max)
    evaluations = reports.evaluation_views([jobs_svc.job_out(j) for j in evals])
    return page(request, "reports.html", datasets=[(d, reports.privacy_view(d)) for d in datasets],
                generators=[assets_svc.generator_out(g) for g in gens], evaluations=evaluations,
                efficiency=reports.label_efficiency(evaluations))


def _asset_kind(kind: str) -> Any:  # type[Generator] | type[Encoder]; the services take either (a TypeVar)
    if kind == "generators":
        return Generator
    if kind == "encoders":
        return Encoder
    raise NotFound(f"no page {kind}")


@router.get("/{kind}")
def assets_page(request: Request, kind: str, viewer: ViewerDep, session: SessionDep, settings: SettingsDep,
                cursor: Annotated[str | None, Query(max_length=500)] = None) -> Response:
    """Generators or encoders the tenant may use (its own and the built-in ones)."""
    model = _asset_kind(kind)
    rows, next_cursor = assets_svc.list_assets(session, settings, model, viewer.tenant.id, cursor,
                                               min(LIST_PAGE, settings.page_size_max))
    to_out = assets_svc.generator_out if model is Generator else assets_svc.encoder_out
    return page(request, "assets.html", kind=kind, assets=[to_out(r) for r in rows], next_cursor=next_cursor,
                cursor=cursor)


@router.get("/{kind}/{asset_id}")
def asset_page(request: Request, kind: str, asset_id: str, viewer: ViewerDep, session: SessionDep) -> Response:
    """A generator or encoder: its model card, config, metrics and the download button."""
    model = _asset_kind(kind)
    row = assets_svc.get_asset(session, model, viewer.tenant.id, asset_id)
    out = assets_svc.generator_out(row) if isinstance(row, Generator) else assets_svc.encoder_out(row)
    card = render_card(out.card, f"{PREFIX}/{kind}/{out.id}/files") if out.card else ""
    return page(request, "asset.html", kind=kind, asset=out, card_html=card)


@router.get("/{kind}/{asset_id}/download")
def asset_download(kind: str, asset_id: str, viewer: ViewerDep, session: SessionDep, store: StoreDep,
                   settings: SettingsDep) -> Response:
    """Redirect to the signed URL of the model's zip (as ``GET /v1/{kind}/{id}/download``)."""
    link = assets_svc.asset_download(session, store, settings, _asset_kind(kind), viewer.tenant.id, asset_id)
    return RedirectResponse(link.url, status_code=303)


@router.get("/{kind}/{asset_id}/files/{name}")
def asset_file(kind: str, asset_id: str, name: str, viewer: ViewerDep, session: SessionDep,
               store: StoreDep) -> Response:
    """An image a model card shows (``samples.png``), from the model's own folder, after the tenant check."""
    row = assets_svc.get_asset(session, _asset_kind(kind), viewer.tenant.id, asset_id)
    media = reports.content_type(name)
    if PurePosixPath(name).name != name or not media.startswith("image/"):
        raise NotFound(f"no file {name}")
    if row.tenant_id is None and row.builtin_path:
        path = Path(row.builtin_path) / name
        if not path.is_file():
            raise NotFound(f"no file {name}")
        return FileResponse(path, media_type=media, headers={"Cache-Control": "private, max-age=300"})
    if row.prefix:
        key = f"{row.prefix.rstrip('/')}/{name}"
        if store.exists(key):
            return Response(store.get_bytes(key), media_type=media, headers={"Cache-Control": "private, max-age=300"})
    raise NotFound(f"no file {name}")


@router.get("/{rest:path}")
def not_found_page(rest: str, viewer: ViewerDep) -> Response:
    """Any other console path: the 404 page (after login, so nothing is revealed before it)."""
    raise NotFound(f"no console page /{rest}")


# --------------------------------------------------------------------------------------------------
# Mounting
# --------------------------------------------------------------------------------------------------
def install_console(app: FastAPI) -> None:
    """Serve the console on ``app``: static files (every asset local, no CDN), the pages, ``/`` -> console."""
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.include_router(router)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/jobs", status_code=307)
