"""Manifests and zip exports of datasets and model folders, streamed through a temp file.

The worker reuses :func:`build_zip_export` for synthetic datasets, so it takes only the store and the
dataset row. Zips are deterministic (fixed timestamps, manifest order), so a re-run writes the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from app.core.config import Settings
from app.db.orm import Dataset
from app.schemas.common import DownloadLink
from app.storage.base import ObjectStore, tenant_key

MANIFEST_FIELDS = ("file", "label", "sha256")
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_ALREADY_COMPRESSED = (".png", ".jpg", ".jpeg", ".zip", ".safetensors", ".gz")


@dataclass(frozen=True)
class ManifestRow:
    """One image of a dataset: ``file`` relative to the dataset prefix, its label and SHA-256."""

    file: str
    label: str
    sha256: str


def manifest_csv(rows: Iterable[ManifestRow]) -> bytes:
    """``manifest.csv`` bytes (header ``file,label,sha256``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_FIELDS)
    for r in rows:
        writer.writerow((r.file, r.label, r.sha256))
    return buf.getvalue().encode()


def parse_manifest(data: bytes) -> list[ManifestRow]:
    """Rows of a ``manifest.csv``."""
    reader = csv.DictReader(io.StringIO(data.decode("utf-8")))
    return [ManifestRow(r["file"], r["label"], r["sha256"]) for r in reader]


def read_manifest(store: ObjectStore, manifest_key: str) -> list[ManifestRow]:
    """Rows of the manifest stored under ``manifest_key``."""
    return parse_manifest(store.get_bytes(manifest_key))


def dataset_root(dataset: Dataset) -> str:
    """``tenants/{t}/datasets/{id}``: where the service keeps a dataset's own objects."""
    return tenant_key(dataset.tenant_id, "datasets", dataset.id)


def dataset_export_key(dataset: Dataset) -> str:
    """Key of the zip export of a dataset."""
    return tenant_key(dataset.tenant_id, "datasets", dataset.id, "exports", f"{dataset.id}.zip")


def image_key(dataset: Dataset, file: str) -> str:
    """Object key of a manifest ``file`` of ``dataset``."""
    return f"{dataset.prefix.rstrip('/')}/{file}"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def close_stream(stream: IO[bytes]) -> None:
    """Close a stream from ``ObjectStore.open`` (and give a minio response's connection back)."""
    stream.close()
    release = getattr(stream, "release_conn", None)  # urllib3 responses from the minio client
    if callable(release):
        release()


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = (zipfile.ZIP_STORED if name.lower().endswith(_ALREADY_COMPRESSED)
                          else zipfile.ZIP_DEFLATED)
    info.external_attr = 0o644 << 16
    return info


def write_zip(path: Path, members: Iterable[tuple[str, Callable[[], IO[bytes]]]]) -> None:
    """Write a zip at ``path`` streaming each ``(arcname, open)`` member (no member is held in memory)."""
    with zipfile.ZipFile(path, "w", allowZip64=True) as zf:
        for arcname, opener in members:
            src = opener()
            try:
                with zf.open(_zip_info(arcname), "w", force_zip64=True) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            finally:
                close_stream(src)


def build_zip_export(store: ObjectStore, dataset: Dataset, key: str | None = None) -> str:
    """Zip a dataset (``LABEL/NAME`` images as in the manifest, ``manifest.csv``, ``dataset.json``) into
    ``key`` (default :func:`dataset_export_key`) and return the key. Streams through a temp file."""
    if not dataset.manifest_key:
        raise ValueError(f"dataset {dataset.id} has no manifest yet")
    key = key or dataset_export_key(dataset)
    manifest = store.get_bytes(dataset.manifest_key)
    rows = parse_manifest(manifest)
    meta = {"id": dataset.id, "name": dataset.name, "origin": dataset.origin, "num_images": len(rows),
            "label_counts": dataset.label_counts, "card": dataset.card}

    def member(file: str) -> tuple[str, Callable[[], IO[bytes]]]:
        return file, lambda: store.open(image_key(dataset, file))

    members: list[tuple[str, Callable[[], IO[bytes]]]] = [member(r.file) for r in rows]
    members.append(("manifest.csv", lambda: io.BytesIO(manifest)))
    members.append(("dataset.json", lambda: io.BytesIO(json.dumps(meta, indent=2, sort_keys=True).encode())))
    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        path = Path(tmp) / "export.zip"
        write_zip(path, members)
        store.put_file(key, path, "application/zip")
    return key


def build_folder_zip_from_store(store: ObjectStore, prefix: str, key: str, exclude_prefix: str | None = None) -> str:
    """Zip every object under ``prefix`` (paths relative to it) into ``key``; skips ``exclude_prefix``."""
    base = prefix.rstrip("/") + "/"
    keys = sorted(o.key for o in store.list(base)
                  if not (exclude_prefix and o.key.startswith(exclude_prefix)))
    members = [(k[len(base):], (lambda k=k: store.open(k))) for k in keys]  # type: ignore[misc]
    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        path = Path(tmp) / "export.zip"
        write_zip(path, members)
        store.put_file(key, path, "application/zip")
    return key


def build_folder_zip_from_disk(folder: Path, store: ObjectStore, key: str) -> str:
    """Zip a local folder (e.g. built-in weights) into ``key``; hidden files are skipped."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    members = [(p.relative_to(folder).as_posix(), (lambda p=p: p.open("rb"))) for p in files]
    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        path = Path(tmp) / "export.zip"
        write_zip(path, members)  # type: ignore[arg-type]
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
