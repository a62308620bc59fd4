"""``/v1/datasets``: upload or register real images, list, read, page thumbnails, download, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from app.api.routes.jobs import CursorQuery, LimitQuery
from app.core.problems import PayloadTooLarge, problem_responses
from app.schemas.common import DownloadLink, Page
from app.schemas.datasets import DatasetImage, DatasetOut, DownloadFormat, RegisterDatasetRequest
from app.schemas.releases import ExportPending
from app.services import datasets as svc

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                         "description": "A zip of an ImageFolder (LABEL/*.png|jpg), and/or single images."},
                "label": {"type": "string", "description": "Label of loose images (required for them)."},
                "name": {"type": "string", "description": "Dataset name (default: the first file's name)."},
            },
            "required": ["file"],
        }}},
    }
}


@router.post("", status_code=201, response_model=DatasetOut, openapi_extra=_UPLOAD_BODY,
             responses=problem_responses(401, 413, 415, 422, 503))
async def upload_dataset(request: Request, tenant: TenantDep, session: SessionDep, store: StoreDep,
                         settings: SettingsDep) -> DatasetOut:
    """Upload real images: a zip of an ImageFolder and/or single PNG/JPEG files (+ ``label``).

    The body is streamed to a temp folder (413 past ``max_upload_bytes``); every image is sniffed from its
    bytes, checked against ``max_image_pixels`` and converted to an 8-bit grey PNG; zips are checked for
    bombs (total size, compression ratio, member count) and unsafe names. Anything rejected leaves no
    trace. Labels are folder names lower-cased.

    Answers as soon as the images are stored, with the dataset ``pending``: a worker builds its zip export
    and marks it ``ready`` (``failed`` if that fails); poll ``GET /v1/datasets/{id}``. 503 when the job
    queue is unreachable (nothing is kept).
    """
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"the upload is over the limit of {settings.max_upload_bytes} bytes",
                              limit=settings.max_upload_bytes)
    # Hand the auth query's connection back to the pool while the (possibly long) body streams in.
    await run_in_threadpool(session.commit)
    ds = await svc.ingest_upload(session, store, settings, tenant.id, request.stream(),
                                 request.headers.get("content-type"))
    return svc.dataset_out(ds)


@router.post("/register", status_code=201, response_model=DatasetOut, responses=problem_responses(401, 422, 503))
def register_dataset(body: RegisterDatasetRequest, tenant: TenantDep, session: SessionDep, store: StoreDep,
                     settings: SettingsDep) -> DatasetOut:
    """Register images already under ``tenants/{your tenant}/...`` in object storage (``PREFIX/LABEL/NAME``).
    Each object is sniffed and hashed into a manifest; nothing is copied. The dataset is ``pending`` until a
    worker built its zip export, then ``ready``."""
    return svc.dataset_out(svc.register_dataset(session, store, settings, tenant.id, body.name, body.prefix))


@router.get("", response_model=Page[DatasetOut], responses=problem_responses(401, 422))
def list_datasets(
    tenant: TenantDep, session: SessionDep, settings: SettingsDep,
    origin: Literal["real", "synthetic"] | None = None, cursor: CursorQuery = None, limit: LimitQuery = None,
) -> Page[DatasetOut]:
    """The tenant's datasets, newest first."""
    rows, next_cursor = svc.list_datasets(session, settings, tenant.id, origin=origin, cursor=cursor, limit=limit)
    return Page[DatasetOut](items=[svc.dataset_out(d) for d in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=problem_responses(401, 404))
def get_dataset(dataset_id: str, tenant: TenantDep, session: SessionDep) -> DatasetOut:
    """A dataset: counts per label, manifest key, card."""
    return svc.dataset_out(svc.get_dataset(session, tenant.id, dataset_id))


@router.get("/{dataset_id}/images", response_model=Page[DatasetImage], responses=problem_responses(401, 404, 409, 422))
def list_images(
    dataset_id: str, tenant: TenantDep, session: SessionDep, store: StoreDep, settings: SettingsDep,
    label: Annotated[str | None, Query(max_length=100)] = None, cursor: CursorQuery = None, limit: LimitQuery = None,
) -> Page[DatasetImage]:
    """Manifest rows in manifest order with a short-lived signed URL per image (the thumbnail pager).
    Gated like downloads: a synthetic dataset whose privacy gate did not pass answers 409 ``privacy-gate``."""
    items, next_cursor = svc.list_dataset_images(session, store, settings, tenant.id, dataset_id, label=label,
                                                 cursor=cursor, limit=limit)
    return Page[DatasetImage](items=items, next_cursor=next_cursor)


@router.get("/{dataset_id}/download", response_model=DownloadLink, responses={
    202: {"model": ExportPending, "description": "The export is being built; ask again after Retry-After."},
    **problem_responses(401, 404, 409, 422, 500, 503)})
def download_dataset(
    dataset_id: str, tenant: TenantDep, session: SessionDep, store: StoreDep, settings: SettingsDep,
    format: DownloadFormat = "zip",
) -> DownloadLink | JSONResponse:
    """A short-lived signed URL (``url``, ``expires_at``, ``filename``) of the dataset's export.

    * ``zip``: ``LABEL/NAME.png`` as stored, ``manifest.csv``, ``card.json`` and ``README.md`` (the dataset
      card: sources and licences, generation config, privacy and fidelity figures, intended use);
    * ``webdataset``: a tar of WebDataset shards (``KEY.png``, ``KEY.json``, ``KEY.cls``) + manifest + card;
    * ``dicom`` (synthetic datasets only): a zip of Secondary Capture files marked synthetic, + manifest + card.

    An export not built yet answers ``202`` with ``Retry-After`` while a worker builds it. A synthetic
    dataset whose privacy gate did not pass answers 409 ``privacy-gate`` unless an admin overrode it.
    """
    result = svc.dataset_download(session, store, settings, tenant.id, dataset_id, format)
    if isinstance(result, ExportPending):
        return JSONResponse(result.model_dump(), status_code=202,
                            headers={"Retry-After": str(result.retry_after_s)})
    return result


@router.delete("/{dataset_id}", status_code=204, response_class=Response,
               responses=problem_responses(401, 404, 409))
def delete_dataset(dataset_id: str, tenant: TenantDep, session: SessionDep, store: StoreDep) -> Response:
    """Delete a real dataset and its objects. Synthetic datasets are immutable (409)."""
    svc.delete_dataset(session, store, tenant.id, dataset_id)
    return Response(status_code=204)
