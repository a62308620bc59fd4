"""Building dataset exports (zip, WebDataset, DICOM) from the store: the worker's side of releases.

A build downloads the stored manifest to a temp file, streams the images one at a time (a few read
ahead in threads) through :func:`models.release.dataset.build_dataset_release` into a temp archive, and
stores it under the dataset's key space (``app.storage.layout``). Datasets never change once ready, so
each format is built once; builds are deterministic, so a rebuild writes the same bytes.

Who calls what:

* :func:`run_dataset_build` (task ``cxrsynth.build_dataset``): an upload or a registration recorded a
  ``pending`` dataset and enqueued this; it builds the zip export and marks the dataset ``ready`` (or
  ``failed``);
* :func:`run_export_task` (task ``cxrsynth.build_export``): a download asked for an export not built yet
  (the API answered 202); it builds it and clears the status object the API reads;
* :func:`build_dataset_export`: the generation's finalize (the zip), and the embedded CLI
  (``cxrsynth datasets export``, through ``app.embedded``).

Only ``app.db``, ``app.storage`` and ``models`` are used here: no service code.
"""

from __future__ import annotations

import logging
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db.orm import Dataset, Generator, Job
from app.storage.base import ObjectNotFound, ObjectStore
from app.storage.layout import (
    dataset_export_key,
    dataset_image_key,
    export_status_key,
    read_export_status,
    write_export_status,
)
from models.callbacks import OnStep, no_progress
from models.release.dataset import (
    READ_WORKERS,
    DatasetFacts,
    GeneratorFacts,
    build_dataset_release,
    formats_for_origin,
)
from models.release.writers import CONTENT_TYPE, SUFFIX

log = logging.getLogger("cxrsynth.exports")

HEARTBEAT_S = 15.0  # how often a running build refreshes its status object


def _utc_iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)).isoformat()


def dataset_facts(ds: Dataset) -> DatasetFacts:
    """What an export says about ``ds`` (its row's values, as stored)."""
    return DatasetFacts(id=ds.id, name=ds.name, origin=ds.origin, num_images=ds.num_images,
                        label_counts=ds.label_counts, card=ds.card, gate_status=ds.gate_status,
                        privacy=ds.privacy, created_at=_utc_iso(ds.created_at))


def generator_facts(gen: Generator | None) -> GeneratorFacts | None:
    """What a dataset card takes from a generator row."""
    if gen is None:
        return None
    return GeneratorFacts(id=gen.id, name=gen.name, config=gen.config or {}, readme=gen.card or "",
                          metrics=gen.metrics or {})


def dataset_generator(session: Session, dataset: Dataset) -> Generator | None:
    """The generator a synthetic dataset came from (its card's generator id, else its job's params), if
    it still exists and is the dataset's tenant's or built in."""
    gen_id = ((dataset.card or {}).get("generator") or {}).get("id")
    if not gen_id and dataset.source_job_id:
        job = session.get(Job, dataset.source_job_id)
        gen_id = (job.params or {}).get("generator_id") if job is not None else None
    if not gen_id:
        return None
    return session.scalar(select(Generator).where(Generator.id == gen_id,
                                                  (Generator.tenant_id == dataset.tenant_id)
                                                  | Generator.tenant_id.is_(None)))


def build_dataset_export(
    store: ObjectStore, dataset: Dataset, fmt: str = "zip", *, generator: Generator | None = None,
    key: str | None = None, on_step: OnStep = no_progress, read_workers: int = READ_WORKERS,
) -> str:
    """Build ``dataset``'s export in ``fmt`` and store it under ``key`` (default
    :func:`app.storage.layout.dataset_export_key`); returns the key. ``ValueError`` for a format the
    dataset has none of, or a dataset without a manifest."""
    available = formats_for_origin(dataset.origin)
    if fmt not in available:
        raise ValueError(f"a {dataset.origin} dataset has no {fmt!r} export (one of {', '.join(available)})")
    if not dataset.manifest_key:
        raise ValueError(f"dataset {dataset.id} has no manifest yet")
    key = key or dataset_export_key(dataset, fmt)
    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        manifest_path = Path(tmp) / "manifest.csv"
        store.download_file(dataset.manifest_key, manifest_path)
        out = Path(tmp) / f"export{SUFFIX[fmt]}"
        build_dataset_release(fmt, out, manifest_path, lambda file: store.get_bytes(dataset_image_key(dataset, file)),
                              dataset_facts(dataset), generator_facts(generator), on_step=on_step,
                              read_workers=read_workers)
        store.put_file(key, out, CONTENT_TYPE[fmt])
    return key


def build_zip_export(store: ObjectStore, dataset: Dataset, key: str | None = None,
                     generator: Generator | None = None) -> str:
    """Zip a dataset (images as in the manifest, ``manifest.csv``, ``dataset.json``, ``card.json``,
    ``README.md``) into ``key`` (default :func:`app.storage.layout.dataset_export_key`); returns the key."""
    return build_dataset_export(store, dataset, "zip", generator=generator, key=key)


def build_export_now(session: Session, store: ObjectStore, ds: Dataset, fmt: str,
                     on_step: OnStep = no_progress) -> str:
    """Build (or find) the export of ``ds`` in ``fmt`` in this process; returns its key."""
    key = dataset_export_key(ds, fmt)
    if not store.exists(key):
        build_dataset_export(store, ds, fmt, generator=dataset_generator(session, ds), key=key, on_step=on_step)
    return key


def _public_error(exc: Exception) -> str:
    # What the tenant will read: a missing image by its key (their own data), else only the kind of error
    # (connection errors can name internal hosts); the worker log has the traceback.
    return (f"an image is missing from storage: {exc}" if isinstance(exc, ObjectNotFound)
            else f"{type(exc).__name__} (see the worker log)")


def run_export_task(sessions: sessionmaker[Session], store: ObjectStore, dataset_id: str, fmt: str) -> None:
    """``cxrsynth.build_export``: build, then clear the status object (or record the failure in it).
    Idempotent: a redelivered task finds the export and only clears the status."""
    with sessions() as s:
        ds = s.get(Dataset, dataset_id)
        if ds is None or ds.status != "ready":
            log.warning("export %s of dataset %s skipped: %s", fmt, dataset_id,
                        "no such dataset" if ds is None else f"dataset is {ds.status}")
            return
        status_key = export_status_key(ds, fmt)
        attempts = int((read_export_status(store, status_key) or {}).get("attempts", 1))
        last = [time.monotonic()]

        def heartbeat(step: int, total: int, message: str) -> None:
            if time.monotonic() - last[0] >= HEARTBEAT_S:
                last[0] = time.monotonic()
                write_export_status(store, status_key, status="building", attempts=attempts, done=step, total=total)

        try:
            build_export_now(s, store, ds, fmt, on_step=heartbeat)
        except Exception as exc:
            log.exception("building the %s export of dataset %s failed", fmt, dataset_id)
            write_export_status(store, status_key, status="failed", attempts=attempts,
                                error=_public_error(exc)[:500])
            return
    store.delete(status_key)  # both stores ignore a missing key


def run_dataset_build(sessions: sessionmaker[Session], store: ObjectStore, dataset_id: str) -> None:
    """``cxrsynth.build_dataset``: the zip export of an uploaded or registered dataset the API recorded as
    ``pending``, then the dataset ``ready``; ``failed`` when the build fails (the card's ``build_error``
    says why). Idempotent: a dataset that is not pending (ready, failed, deleted) is left alone, and a
    redelivered task finds the zip built. Generation datasets (``source_job_id``) are their job's."""
    with sessions() as s:
        ds = s.get(Dataset, dataset_id)
        if ds is None or ds.status != "pending" or ds.source_job_id is not None:
            log.info("dataset build %s skipped: %s", dataset_id,
                     "no such dataset" if ds is None else f"dataset is {ds.status}" if ds.status != "pending"
                     else "a generation's dataset")
            return
        try:
            build_export_now(s, store, ds, "zip")
        except Exception as exc:
            log.exception("building the zip export of dataset %s failed", dataset_id)
            s.rollback()
            ds = s.get(Dataset, dataset_id)
            if ds is not None and ds.status == "pending":
                ds.status = "failed"
                ds.card = {**(ds.card or {}), "build_error": _public_error(exc)[:500]}
                s.commit()
            return
        # Deleted meanwhile? Only a pending row still there becomes ready.
        export_key = dataset_export_key(ds, "zip")
        s.expire_all()
        ds = s.get(Dataset, dataset_id)
        if ds is None:
            store.delete(export_key)  # the delete removed the rest of its key space already
            return
        if ds.status == "pending":
            ds.status = "ready"
            s.commit()
