"""Datasets: record validated uploads, register an existing prefix, list, page images, download, delete.

Key layout: ``app.storage.layout`` (images, ``manifest.csv``, ``exports/``).

An upload or a registration answers at once: the images (uploads) and the manifest are stored, the row
is committed ``pending`` and the ``cxrsynth.build_dataset`` task is enqueued; the worker builds the zip
export (``worker/exports.py``) and marks the dataset ``ready`` (``failed`` when the build fails). Clients
poll ``GET /v1/datasets/ID``. The other formats are built by a worker on request (``app.services.releases``).

Objects are written only after the whole upload validated; if storing fails part-way, everything under
the dataset's key space is deleted before the error propagates and no row is committed. If the queue is
unreachable, the recorded dataset is removed again and the request answers 503.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from threading import Lock
from typing import Literal

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.problems import Conflict, InvalidInput, NotFound, ServiceUnavailable
from app.core.queue import TASK_BUILD_DATASET, send_task
from app.db.orm import ACTIVE_STATUSES, Dataset, Job, new_id
from app.schemas.common import DownloadLink
from app.schemas.datasets import DatasetImage, DatasetOut, DownloadFormat
from app.schemas.releases import ExportPending
from app.services import releases
from app.services.exports import (
    ManifestRow,
    dataset_image_key,
    dataset_root,
    manifest_csv,
    parse_manifest,
    signed_download,
)
from app.services.pagination import as_utc, check_limit, decode_cursor, encode_cursor, paginate_newest_first
from app.services.uploads import (
    PreparedImage,
    is_top_level_note,
    normalise_label,
    prepare_images,
    sniff_stored_image,
    spool_multipart,
)
from app.storage.base import ObjectStore, tenant_key

log = logging.getLogger("cxrsynth.datasets")

UPLOAD_THREADS = 4
_CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def dataset_out(ds: Dataset) -> DatasetOut:
    """The public shape of a dataset."""
    return DatasetOut(
        id=ds.id, name=ds.name, origin=ds.origin, status=ds.status, num_images=ds.num_images,  # type: ignore[arg-type]
        label_counts={k: int(v) for k, v in (ds.label_counts or {}).items()}, prefix=ds.prefix,
        manifest_key=ds.manifest_key, card=ds.card or {}, privacy=ds.privacy, gate_status=ds.gate_status,
        gate_override=ds.gate_override, source_job_id=ds.source_job_id, total_bytes=ds.total_bytes,
        created_at=as_utc(ds.created_at),
    )


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    """The tenant's dataset; :class:`NotFound` for unknown ids and other tenants' alike."""
    ds = session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))
    if ds is None:
        raise NotFound(f"no dataset {dataset_id}")
    return ds


def list_datasets(
    session: Session, settings: Settings, tenant_id: str, *, origin: Literal["real", "synthetic"] | None = None,
    cursor: str | None = None, limit: int | None = None,
) -> tuple[list[Dataset], str | None]:
    """One page of the tenant's datasets, newest first."""
    limit = check_limit(limit, settings.page_size_max)
    stmt = select(Dataset).where(Dataset.tenant_id == tenant_id)
    if origin is not None:
        stmt = stmt.where(Dataset.origin == origin)
    return paginate_newest_first(session, stmt, Dataset, cursor, limit)


# --------------------------------------------------------------------------------------------------
# Creating
# --------------------------------------------------------------------------------------------------
def _card(source: str, rows: Sequence[ManifestRow], extra: dict[str, object] | None = None) -> dict[str, object]:
    counts = Counter(r.label for r in rows)
    return {"origin": "real", "source": source, "num_images": len(rows), "labels": sorted(counts),
            "image_format": "8-bit grey PNG" if source == "upload" else "as stored", **(extra or {})}


def image_sizes(images: Sequence[PreparedImage]) -> dict[str, int]:
    """Images per ``"WxH"`` size, most common first: what generator training checks a dataset against."""
    counts = Counter(f"{img.width}x{img.height}" for img in images if img.width and img.height)
    return dict(counts.most_common())


def create_uploaded_dataset(
    session: Session, store: ObjectStore, tenant_id: str, name: str, images: Sequence[PreparedImage]
) -> Dataset:
    """Store validated images (see :func:`app.services.uploads.prepare_images`) as a new real dataset:
    PNGs, ``manifest.csv``, then the row, ``pending`` until a worker built its zip export (the caller
    enqueues that: :func:`enqueue_dataset_build`). All or nothing."""
    name = name.strip()[:200] or "upload"
    ds_id = new_id()
    root = tenant_key(tenant_id, "datasets", ds_id)
    prefix = tenant_key(tenant_id, "datasets", ds_id, "images")
    rows = sorted((ManifestRow(f"{img.label}/{img.name}", img.label, img.sha256) for img in images),
                  key=lambda r: r.file)
    ds = Dataset(id=ds_id, tenant_id=tenant_id, name=name, origin="real", status="pending", prefix=prefix,
                 num_images=len(rows), label_counts=dict(sorted(Counter(r.label for r in rows).items())),
                 manifest_key=tenant_key(tenant_id, "datasets", ds_id, "manifest.csv"),
                 card=_card("upload", rows, {"image_sizes": image_sizes(images)}),
                 total_bytes=sum(img.size for img in images))
    try:
        def put(img: PreparedImage) -> None:
            store.put_file(f"{prefix}/{img.label}/{img.name}", img.path, "image/png")

        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(put, images))
        assert ds.manifest_key is not None
        store.put_bytes(ds.manifest_key, manifest_csv(rows), "text/csv")
        session.add(ds)
        session.commit()
    except BaseException:
        session.rollback()
        _delete_quietly(store, root + "/")
        raise
    return ds


def enqueue_dataset_build(session: Session, store: ObjectStore, settings: Settings, ds: Dataset) -> None:
    """Ask a worker to build the zip export of the pending ``ds`` (``cxrsynth.build_dataset``), which then
    marks it ready. When the queue is unreachable the dataset is removed again (row and the objects the
    service wrote) and :class:`ServiceUnavailable` (503, ``Retry-After``) is raised: no trace."""
    try:
        send_task(settings, TASK_BUILD_DATASET, ds.id)
    except Exception as exc:
        log.exception("could not enqueue the build of dataset %s", ds.id)
        root = dataset_root(ds) + "/"
        session.rollback()
        session.delete(ds)
        session.commit()
        _delete_quietly(store, root)
        raise ServiceUnavailable("the job queue is unreachable; retry later", slug="queue-unavailable",
                                 headers={"Retry-After": str(releases.RETRY_AFTER_S)}) from exc


async def ingest_upload(
    session: Session, store: ObjectStore, settings: Settings, tenant_id: str, chunks: AsyncIterator[bytes],
    content_type: str | None,
) -> Dataset:
    """A multipart upload (body ``chunks``) -> a new real dataset, ``pending``, or a problem and no trace.

    The body is spooled to a temp folder (413 past ``max_upload_bytes``), validated and converted in a
    worker thread (:func:`app.services.uploads.prepare_images`), stored by :func:`create_uploaded_dataset`,
    and its export build enqueued (:func:`enqueue_dataset_build`; 503 when the queue is unreachable).
    Form fields: ``name`` (default: the first file's name), ``label``.
    """
    workdir = Path(await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="cxr-upload-")))
    try:
        (workdir / "parts").mkdir()
        form = await spool_multipart(chunks, content_type, workdir / "parts", settings.max_upload_bytes)
        images = await anyio.to_thread.run_sync(prepare_images, form, settings, workdir / "images")
        name = form.fields.get("name") or PurePosixPath(form.files[0].filename or "upload").stem or "upload"
        ds = await anyio.to_thread.run_sync(create_uploaded_dataset, session, store, tenant_id, name, images)
        await anyio.to_thread.run_sync(enqueue_dataset_build, session, store, settings, ds)
        return ds
    finally:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(workdir, ignore_errors=True))


def _delete_quietly(store: ObjectStore, prefix: str) -> None:
    try:
        store.delete_prefix(prefix)
    except Exception:
        log.exception("could not clean up %s", prefix)


def normalise_registered_prefix(tenant_id: str, prefix: str) -> str:
    """``tenants/{tenant}/...`` without a trailing slash; 422 for other tenants' or unsafe prefixes."""
    p = prefix.strip().lstrip("/").rstrip("/")
    own = f"tenants/{tenant_id}/"
    parts = p.split("/")
    if "\\" in p or any(part in ("", ".", "..") for part in parts) or not (p + "/").startswith(own) or p + "/" == own:
        raise InvalidInput(f"prefix must be a folder inside your key space {own}", slug="invalid-prefix")
    return p


def register_dataset(
    session: Session, store: ObjectStore, settings: Settings, tenant_id: str, name: str, prefix: str
) -> Dataset:
    """Register images already stored under ``prefix`` (``LABEL/NAME.png|jpg``, within the tenant's own
    key space) as a real dataset: each object is read, sniffed and hashed into a manifest; nothing is
    copied. Top-level notes (csv, txt, md, json) and hidden files are skipped. The dataset is recorded
    ``pending``; a worker builds its zip export (capturing the objects) and marks it ready."""
    prefix = normalise_registered_prefix(tenant_id, prefix)
    base = prefix + "/"
    rows: list[ManifestRow] = []
    total = 0
    for n, obj in enumerate(store.list(base)):
        if n >= settings.max_upload_files:
            raise InvalidInput(f"more than {settings.max_upload_files} objects under {prefix}", slug="too-many-files")
        rel = obj.key[len(base):]
        parts = tuple(rel.split("/"))
        if any(p.startswith(".") for p in parts) or (len(parts) == 1 and is_top_level_note(rel)):
            continue
        if len(parts) != 2:
            raise InvalidInput(f"{obj.key}: expected {prefix}/LABEL/NAME.png", slug="bad-layout")
        label = normalise_label(parts[0], obj.key)
        if obj.size > 8 * settings.max_image_pixels + (1 << 20):
            raise InvalidInput(f"{obj.key}: too big for one image", slug="image-too-large")
        data = store.get_bytes(obj.key)
        sniff_stored_image(data, settings.max_image_pixels, obj.key)
        rows.append(ManifestRow(rel, label, hashlib.sha256(data).hexdigest()))
        total += len(data)
    if not rows:
        raise InvalidInput(f"no PNG or JPEG images under {prefix}/LABEL/", slug="no-files")
    ds_id = new_id()
    ds = Dataset(id=ds_id, tenant_id=tenant_id, name=name.strip()[:200] or prefix.rsplit("/", 1)[-1], origin="real",
                 status="pending", prefix=prefix, num_images=len(rows),
                 label_counts=dict(sorted(Counter(r.label for r in rows).items())),
                 manifest_key=tenant_key(tenant_id, "datasets", ds_id, "manifest.csv"),
                 card=_card("registered", rows, {"registered_prefix": prefix}), total_bytes=total)
    try:
        assert ds.manifest_key is not None
        store.put_bytes(ds.manifest_key, manifest_csv(rows), "text/csv")
        session.add(ds)
        session.commit()
    except BaseException:
        session.rollback()
        _delete_quietly(store, dataset_root(ds) + "/")
        raise
    # The worker's zip captures the objects (they are the tenant's and may change later).
    enqueue_dataset_build(session, store, settings, ds)
    return ds


# --------------------------------------------------------------------------------------------------
# Images, downloads, deletion
# --------------------------------------------------------------------------------------------------
class ManifestCache:
    """Parsed manifests by key (manifests never change once written), least recently used out."""

    def __init__(self, max_entries: int = 16) -> None:
        self._items: OrderedDict[str, list[ManifestRow]] = OrderedDict()
        self._max = max_entries
        self._lock = Lock()

    def get(self, store: ObjectStore, key: str) -> list[ManifestRow]:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        rows = parse_manifest(store.get_bytes(key))
        with self._lock:
            self._items[key] = rows
            while len(self._items) > self._max:
                self._items.popitem(last=False)
        return rows


_MANIFESTS = ManifestCache()


def _ready(ds: Dataset) -> str:
    if ds.status != "ready" or not ds.manifest_key:
        raise Conflict(f"dataset {ds.id} is {ds.status}, not ready", slug="not-ready")
    return ds.manifest_key


def list_dataset_images(
    session: Session, store: ObjectStore, settings: Settings, tenant_id: str, dataset_id: str, *,
    label: str | None = None, cursor: str | None = None, limit: int | None = None,
) -> tuple[list[DatasetImage], str | None]:
    """One page of a dataset's manifest rows (optionally of one label) with a signed URL per image."""
    limit = check_limit(limit, settings.page_size_max)
    ds = get_dataset(session, tenant_id, dataset_id)
    manifest_key = _ready(ds)
    releases.check_release_allowed(ds)  # signed image URLs are downloads too
    rows = _MANIFESTS.get(store, manifest_key)
    if label is not None:
        wanted = label.strip().lower()
        rows = [r for r in rows if r.label == wanted]
    start = 0
    if cursor:
        parts = decode_cursor(cursor)
        if len(parts) != 2 or parts[0] != "offset" or not isinstance(parts[1], int) or parts[1] < 0:
            raise InvalidInput("cursor is not a cursor returned by this API", slug="invalid-cursor")
        start = parts[1]
    page = rows[start:start + limit]
    items = []
    for r in page:
        suffix = PurePosixPath(r.file).suffix.lower()
        link = signed_download(store, settings, dataset_image_key(ds, r.file), PurePosixPath(r.file).name,
                               _CONTENT_TYPES.get(suffix, "application/octet-stream"))
        items.append(DatasetImage(file=r.file, label=r.label, sha256=r.sha256, url=link.url,
                                  expires_at=link.expires_at))
    next_cursor = encode_cursor("offset", start + limit) if start + limit < len(rows) else None
    return items, next_cursor


def dataset_download(
    session: Session, store: ObjectStore, settings: Settings, tenant_id: str, dataset_id: str,
    fmt: DownloadFormat = "zip",
) -> DownloadLink | ExportPending:
    """A signed URL of the dataset's export in ``fmt``, or :class:`ExportPending` while a worker builds it.

    404 for other tenants' datasets, 409 ``format-not-available`` (DICOM of real images), 409 ``not-ready``,
    409 ``privacy-gate`` for a synthetic dataset whose gate did not pass and was not overridden.
    """
    ds = get_dataset(session, tenant_id, dataset_id)
    releases.check_format(ds, fmt)
    _ready(ds)
    releases.check_release_allowed(ds)
    return releases.request_export(session, store, settings, ds, fmt)


def delete_dataset(session: Session, store: ObjectStore, tenant_id: str, dataset_id: str) -> None:
    """Delete a real dataset and every object under its key space (a registered prefix's own objects
    are not the service's and stay). Synthetic datasets are immutable (409); so is a dataset an active
    job is reading (409)."""
    ds = get_dataset(session, tenant_id, dataset_id)
    if ds.origin != "real":
        raise Conflict("synthetic datasets are immutable", slug="immutable-dataset")
    busy = session.scalar(select(Job.id).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_STATUSES),
                                               Job.params["dataset_id"].as_string() == ds.id).limit(1))
    if busy is not None:
        raise Conflict(f"job {busy} is using this dataset; cancel it or wait", slug="dataset-in-use", job_id=busy)
    store.delete_prefix(dataset_root(ds) + "/")
    session.delete(ds)
    session.commit()
