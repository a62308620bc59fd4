"""Dataset exports (zip, WebDataset, DICOM) built from the store, model-folder zips, signed download links.

A dataset export streams the stored manifest from a temp file and the images one at a time through the
writers of :mod:`models.release`, into a temp archive that is then stored under the dataset's own key
space (``tenants/t/datasets/id/exports/``). Datasets never change once ready, so each format is built
once and cached; exports are deterministic, so a rebuild writes the same bytes. The worker builds them
(at the end of a generation, or on request through ``cxrsynth.build_export``), the CLI builds them
inline; the API only hands out signed links.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.orm import Dataset, Generator, Job
from app.schemas.common import DownloadLink
from app.services.pagination import as_utc
from app.storage.base import ObjectStore, tenant_key
from models.callbacks import OnStep, no_progress
from models.files import file_sha256
from models.release.card import CardInputs
from models.release.manifest import (
    BASE_FIELDS,
    MANIFEST_FIELDS,
    ManifestRow,
    iter_manifest,
    manifest_columns,
    manifest_csv,
    parse_manifest,
    read_header,
)
from models.release.writers import (
    CONTENT_TYPE,
    FORMATS,
    REAL_IMAGE_FORMATS,
    SUFFIX,
    ReleaseRecord,
    ReleaseSpec,
    write_release,
)

__all__ = [
    "BASE_FIELDS",
    "MANIFEST_FIELDS",
    "ManifestRow",
    "build_dataset_export",
    "build_zip_export",
    "dataset_export_key",
    "export_content_type",
    "export_filename",
    "formats_for",
    "manifest_csv",
    "parse_manifest",
    "read_manifest",
]

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
READ_WORKERS = 8  # images read ahead in threads: S3 answers each GET with latency
_ALREADY_COMPRESSED = (".png", ".jpg", ".jpeg", ".zip", ".safetensors", ".gz")


def read_manifest(store: ObjectStore, manifest_key: str) -> list[ManifestRow]:
    """Rows of the manifest stored under ``manifest_key``."""
    return parse_manifest(store.get_bytes(manifest_key))


def dataset_root(dataset: Dataset) -> str:
    """``tenants/{t}/datasets/{id}``: where the service keeps a dataset's own objects."""
    return tenant_key(dataset.tenant_id, "datasets", dataset.id)


def formats_for(dataset: Dataset) -> tuple[str, ...]:
    """Export formats a dataset offers (``models.release.writers.EXPORT_FORMATS``): every one for synthetic
    datasets; real ones lack the synthetic-only formats (DICOM says "synthetic" in every file)."""
    return FORMATS if dataset.origin == "synthetic" else REAL_IMAGE_FORMATS


def dataset_export_key(dataset: Dataset, fmt: str = "zip") -> str:
    """Key of a dataset's export in ``fmt`` (``exports/ID.zip``, ``ID-webdataset.tar``, ``ID-dicom.zip``)."""
    return tenant_key(dataset.tenant_id, "datasets", dataset.id, "exports", f"{dataset.id}{SUFFIX[fmt]}")


def export_filename(dataset: Dataset, fmt: str = "zip") -> str:
    """The file name a download is saved under, e.g. ``My-set-1a2b3c4d-dicom.zip``."""
    return f"{safe_filename(dataset.name, default='dataset')}-{dataset.id[:8]}{SUFFIX[fmt]}"


def export_content_type(fmt: str) -> str:
    """MIME type of an export."""
    return CONTENT_TYPE[fmt]


def dataset_image_key(dataset: Dataset, file: str) -> str:
    """Object key of a manifest ``file`` of ``dataset``."""
    return f"{dataset.prefix.rstrip('/')}/{file}"


def close_stream(stream: IO[bytes]) -> None:
    """Close a stream from ``ObjectStore.open`` (and give a minio response's connection back)."""
    stream.close()
    release = getattr(stream, "release_conn", None)  # urllib3 responses from the minio client
    if callable(release):
        release()


# --------------------------------------------------------------------------------------------------
# Dataset exports
# --------------------------------------------------------------------------------------------------
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


def _label_ids(dataset: Dataset, generator_config: dict[str, Any]) -> dict[str, int]:
    labels = generator_config.get("labels")
    if isinstance(labels, dict) and labels and dataset.origin == "synthetic":
        ids = {str(k): int(v) for k, v in labels.items()}
    else:
        ids = {name: i for i, name in enumerate(sorted(dataset.label_counts or {}))}
    for name in sorted(dataset.label_counts or {}):
        ids.setdefault(name, len(ids))
    return ids


def card_inputs(dataset: Dataset, generator: Generator | None, manifest_sha256: str) -> CardInputs:
    """What the export's dataset card says, collected from the dataset row and its generator's row."""
    card = dict(dataset.card or {})
    created = as_utc(dataset.created_at).isoformat() if dataset.created_at else None
    common: dict[str, Any] = dict(dataset_id=dataset.id, name=dataset.name, origin=dataset.origin,
                                  num_images=dataset.num_images,
                                  label_counts={str(k): int(v) for k, v in (dataset.label_counts or {}).items()},
                                  manifest_sha256=manifest_sha256, created_at=created)
    if dataset.origin != "synthetic":
        source: dict[str, Any] = {k: card[k] for k in ("source", "registered_prefix", "image_format") if k in card}
        return CardInputs(**common, source=source)
    gen_info: dict[str, Any] = dict(card.get("generator") or {})
    readme = ""
    fidelity = card.get("fidelity") if isinstance(card.get("fidelity"), dict) else None
    if generator is not None:
        gen_info = {"id": generator.id, "name": generator.name, "config": generator.config or {}}
        readme = generator.card or ""
        if fidelity is None and generator.metrics:
            fidelity = {"measured_on": "the generator (not this dataset)", **generator.metrics}
    return CardInputs(**common, generator=gen_info or None, generator_readme=readme,
                      generation=card.get("generation") or {}, gate_status=dataset.gate_status or "not_run",
                      privacy=dataset.privacy, fidelity=fidelity)


def _legacy_dataset_json(dataset: Dataset) -> bytes:
    """``dataset.json`` of zip exports (kept for readers of earlier exports)."""
    meta = {"id": dataset.id, "name": dataset.name, "origin": dataset.origin, "num_images": dataset.num_images,
            "label_counts": dataset.label_counts, "card": dataset.card}
    return json.dumps(meta, indent=2, sort_keys=True, default=str).encode()


def build_dataset_export(
    store: ObjectStore, dataset: Dataset, fmt: str = "zip", *, generator: Generator | None = None,
    key: str | None = None, on_step: OnStep = no_progress, read_workers: int = READ_WORKERS,
) -> str:
    """Build ``dataset``'s export in ``fmt`` and store it under ``key`` (default :func:`dataset_export_key`);
    returns the key. Streams: memory stays flat however many images the dataset has.

    ``generator`` (the synthetic dataset's generator row) supplies the card's licences and fidelity.
    """
    if fmt not in formats_for(dataset):
        raise ValueError(f"a {dataset.origin} dataset has no {fmt!r} export (one of {', '.join(formats_for(dataset))})")
    if not dataset.manifest_key:
        raise ValueError(f"dataset {dataset.id} has no manifest yet")
    key = key or dataset_export_key(dataset, fmt)
    synthetic = dataset.origin == "synthetic"
    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        manifest_path = Path(tmp) / "manifest.csv"
        store.download_file(dataset.manifest_key, manifest_path)
        with manifest_path.open(newline="", encoding="utf-8") as f:
            header = read_header(f)
        gen_config = dict((generator.config if generator is not None else None)
                          or ((dataset.card or {}).get("generator") or {}).get("config") or {})
        spec = ReleaseSpec(card=card_inputs(dataset, generator, file_sha256(manifest_path)),
                           manifest_columns=manifest_columns(header, synthetic),
                           label_ids=_label_ids(dataset, gen_config),
                           extra_files={"dataset.json": _legacy_dataset_json(dataset)} if fmt == "zip" else {},
                           read_workers=read_workers)

        def reader(key: str) -> Callable[[], bytes]:
            return lambda: store.get_bytes(key)

        def records() -> Iterator[ReleaseRecord]:
            with manifest_path.open(newline="", encoding="utf-8") as mf:
                for row in iter_manifest(mf):
                    yield ReleaseRecord(row, reader(dataset_image_key(dataset, row.file)))

        out = Path(tmp) / f"export{SUFFIX[fmt]}"
        write_release(fmt, out, records(), spec, on_step=on_step)
        store.put_file(key, out, CONTENT_TYPE[fmt])
    return key


def build_zip_export(store: ObjectStore, dataset: Dataset, key: str | None = None,
                     generator: Generator | None = None) -> str:
    """Zip a dataset (images as in the manifest, ``manifest.csv``, ``dataset.json``, ``card.json``,
    ``README.md``) into ``key`` (default :func:`dataset_export_key`) and return the key."""
    return build_dataset_export(store, dataset, "zip", generator=generator, key=key)


# --------------------------------------------------------------------------------------------------
# Model folders (generators, encoders)
# --------------------------------------------------------------------------------------------------
def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = (zipfile.ZIP_STORED if name.lower().endswith(_ALREADY_COMPRESSED)
                          else zipfile.ZIP_DEFLATED)
    info.external_attr = 0o644 << 16
    return info


def write_members_zip(path: Path, members: Iterable[tuple[str, Callable[[], IO[bytes]]]]) -> None:
    """Write a zip at ``path`` streaming each ``(arcname, open)`` member (no member is held in memory)."""
    with zipfile.ZipFile(path, "w", allowZip64=True) as zf:
        for arcname, opener in members:
            src = opener()
            try:
                with zf.open(_zip_info(arcname), "w", force_zip64=True) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            finally:
                close_stream(src)


def build_folder_zip_from_store(store: ObjectStore, prefix: str, key: str, exclude_prefix: str | None = None) -> str:
    """Zip every object under ``prefix`` (paths relative to it) into ``key``; skips ``exclude_prefix``."""
    base = prefix.rstrip("/") + "/"
    keys = sorted(o.key for o in store.list(base)
                  if not (exclude_prefix and o.key.startswith(exclude_prefix)))
    members = [(k[len(base):], (lambda k=k: store.open(k))) for k in keys]  # type: ignore[misc]
    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        path = Path(tmp) / "export.zip"
        write_members_zip(path, members)
        store.put_file(key, path, "application/zip")
    return key


def build_folder_zip_from_disk(folder: Path, store: ObjectStore, key: str) -> str:
    """Zip a local folder (e.g. built-in weights) into ``key``; hidden files are skipped."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    members = [(p.relative_to(folder).as_posix(), (lambda p=p: p.open("rb"))) for p in files]
    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        path = Path(tmp) / "export.zip"
        write_members_zip(path, members)  # type: ignore[arg-type]
        store.put_file(key, path, "application/zip")
    return key


def folder_fingerprint(folder: Path) -> str:
    """A short hash of a folder's file names, sizes and mtimes (names a cached zip of it)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            h.update(f"{p.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Signed links
# --------------------------------------------------------------------------------------------------
def safe_filename(name: str, default: str = "download") -> str:
    """A file name of ``[A-Za-z0-9._-]`` only (for ``Content-Disposition``)."""
    cleaned = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "-", name)).strip("-.")[:100]
    return cleaned or default


def signed_download(
    store: ObjectStore, settings: Settings, key: str, filename: str, content_type: str
) -> DownloadLink:
    """A short-lived signed URL (``signed_url_ttl_s``) of ``key``, downloaded as ``filename``."""
    ttl = settings.signed_url_ttl_s
    expires_at = datetime.fromtimestamp(int(time.time()) + ttl, UTC)
    url = store.presigned_get(key, ttl, filename=filename, content_type=content_type)
    return DownloadLink(url=url, expires_at=expires_at, filename=filename)
