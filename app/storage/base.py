"""The storage protocol both backends implement, and key-layout helpers.

Key layout: ``tenants/{tenant}/{datasets|generators|encoders}/{id}/...``. Keys are built only by
:func:`tenant_key`, so every object is tenant-scoped by construction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from app.core.config import Settings

ResourceKind = Literal["datasets", "generators", "encoders", "uploads", "exports"]


class ObjectNotFound(KeyError):
    """No object under that key."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


def tenant_key(tenant_id: str, kind: ResourceKind, resource_id: str, *parts: str) -> str:
    """``tenants/{tenant}/{kind}/{id}/{parts...}``; rejects path tricks in any part."""
    for p in (tenant_id, resource_id, *parts):
        if not p or p.startswith("/") or ".." in p.split("/") or "\\" in p:
            raise ValueError(f"unsafe object key part: {p!r}")
    return "/".join(("tenants", tenant_id, kind, resource_id, *parts))


@runtime_checkable
class ObjectStore(Protocol):
    """What the service needs from object storage. Implementations: S3 (minio) and a local folder."""

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None: ...

    def put_stream(self, key: str, stream: IO[bytes], content_type: str = "application/octet-stream") -> int:
        """Upload a stream of unknown length (multipart on S3); returns the bytes written."""
        ...

    def get_bytes(self, key: str) -> bytes: ...

    def download_file(self, key: str, path: Path) -> None: ...

    def open(self, key: str) -> IO[bytes]:
        """A readable stream of the object (caller closes it)."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def presigned_get(self, key: str, expires_s: int, filename: str, content_type: str) -> str:
        """A URL anyone holding it may GET until it expires, served with ``Content-Disposition``."""
        ...

    def ping(self) -> None:
        """Raise if the backend is unreachable (readiness probe)."""
        ...


def build_store(settings: Settings, retry_for_s: float = 0.0) -> ObjectStore:
    """The backend the settings select; ``retry_for_s``: how long S3 calls retry an unreachable server
    (workers wait out an outage; 0, the API's choice, keeps the client's short default)."""
    if settings.storage_backend == "s3":
        from app.storage.s3 import S3Store

        return S3Store.from_settings(settings, retry_for_s)
    from app.storage.local import LocalStore

    assert settings.storage_dir is not None
    return LocalStore(
        settings.storage_dir,
        secret=settings.signing_secret.get_secret_value(),
        base_url=settings.public_base_url,
    )
