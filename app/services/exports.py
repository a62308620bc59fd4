"""Dataset export names and formats, model-folder zips, signed download links.

Dataset exports (zip, WebDataset, DICOM) are *built* by the worker (``worker/exports.py`` through
:mod:`models.release`): at the end of a generation, after an upload or a registration
(``cxrsynth.build_dataset``), or on request (``cxrsynth.build_export``). The API only validates, records,
enqueues and hands out signed links; this module holds what it needs for that: which formats a dataset
offers, the keys (``app.storage.layout``), file names and MIME types, and the signed links.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from app.core.config import Settings
from app.db.orm import Dataset
from app.schemas.common import DownloadLink
from app.storage.base import ObjectStore
from app.storage.layout import dataset_export_key, dataset_image_key, dataset_root
from models.release.dataset import formats_for_origin
from models.release.manifest import (
    BASE_FIELDS,
    MANIFEST_FIELDS,
    ManifestRow,
    manifest_csv,
    parse_manifest,
)
from models.release.writers import CONTENT_TYPE, SUFFIX

__all__ = [
    "BASE_FIELDS",
    "MANIFEST_FIELDS",
    "ManifestRow",
    "dataset_export_key",
    "dataset_image_key",
    "dataset_root",
    "export_content_type",
    "export_filename",
    "formats_for",
    "manifest_csv",
    "parse_manifest",
    "read_manifest",
]

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_ALREADY_COMPRESSED = (".png", ".jpg", ".jpeg", ".zip", ".safetensors", ".gz")


def read_manifest(store: ObjectStore, manifest_key: str) -> list[ManifestRow]:
    """Rows of the manifest stored under ``manifest_key``."""
    return parse_manifest(store.get_bytes(manifest_key))


def formats_for(dataset: Dataset) -> tuple[str, ...]:
    """Export formats a dataset offers (``models.release.writers.EXPORT_FORMATS``): every one for synthetic
    datasets; real ones lack the synthetic-only formats (DICOM says "synthetic" in every file)."""
    return formats_for_origin(dataset.origin)


def export_filename(dataset: Dataset, fmt: str = "zip") -> str:
    """The file name a download is saved under, e.g. ``My-set-1a2b3c4d-dicom.zip``."""
    return f"{safe_filename(dataset.name, default='dataset')}-{dataset.id[:8]}{SUFFIX[fmt]}"


def export_content_type(fmt: str) -> str:
    """MIME type of an export."""
    return CONTENT_TYPE[fmt]


def close_stream(stream: IO[bytes]) -> None:
    """Close a stream from ``ObjectStore.open`` (and give a minio response's connection back)."""
    stream.close()
    release = getattr(stream, "release_conn", None)  # urllib3 responses from the minio client
    if callable(release):
        release()


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
