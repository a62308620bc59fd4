"""S3 object store through the ``minio`` client (path-style, explicit region, multipart for streams)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO, cast
from urllib.parse import quote

import certifi
import urllib3
from minio import Minio
from minio.error import S3Error
from urllib3.util import Retry, Timeout

from app.storage.base import ObjectInfo, ObjectNotFound

if TYPE_CHECKING:
    from app.core.config import Settings

PART_SIZE = 16 * 1024 * 1024
RETRY_BACKOFF_S = 0.5  # urllib3: the n-th retry waits RETRY_BACKOFF_S * 2**(n-1) s (the first one none)...
RETRY_BACKOFF_MAX_S = 8.0  # ...at most this long


def retry_count_for(budget_s: float) -> int:
    """How many urllib3 retries, with the backoff above, add up to at least ``budget_s`` of waiting."""
    waited, n = 0.0, 0
    while waited < budget_s:
        n += 1
        waited += 0.0 if n <= 1 else min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_S * 2 ** (n - 1))
    return n


def patient_http_client(retry_for_s: float, secure: bool) -> urllib3.PoolManager:
    """minio's default HTTP client (5 min timeouts, 10 connections, the same CA bundle) whose retries of a
    refused connection, a broken one (idempotent requests) or a 5xx answer span about ``retry_for_s``
    seconds instead of minio's ~6 s, so a worker rides out an S3 restart or outage."""
    timeout = 5 * 60
    total = retry_count_for(retry_for_s)
    return urllib3.PoolManager(
        timeout=Timeout(connect=timeout, read=timeout), maxsize=10,
        cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=Retry(total=total, backoff_factor=RETRY_BACKOFF_S, backoff_max=RETRY_BACKOFF_MAX_S,
                      status_forcelist=[500, 502, 503, 504]),
    )


class S3Store:
    """Objects in one bucket; presigned URLs can use a public endpoint distinct from the internal one."""

    def __init__(self, client: Minio, bucket: str, presign_client: Minio | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self._presign = presign_client or client

    @classmethod
    def from_settings(cls, s: Settings, retry_for_s: float = 0.0) -> S3Store:
        """The store of the settings; ``retry_for_s > 0`` (workers) retries unreachable storage for about
        that long (:func:`patient_http_client`), 0 keeps minio's short retries (the API answers fast)."""
        http = patient_http_client(retry_for_s, s.s3_secure) if retry_for_s > 0 else None

        def make(endpoint: str, http_client: urllib3.PoolManager | None = None) -> Minio:
            # An explicit region avoids a bucket-location round trip (and lets presigning work offline).
            return Minio(endpoint, access_key=s.s3_access_key, secret_key=s.s3_secret_key.get_secret_value(),
                         secure=s.s3_secure, region=s.s3_region, http_client=http_client)

        client = make(s.s3_endpoint, http)
        presign = make(s.s3_public_endpoint) if s.s3_public_endpoint else None
        return cls(client, s.s3_bucket, presign)

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        self.client.fput_object(self.bucket, key, str(path), content_type=content_type, part_size=PART_SIZE)

    def put_stream(self, key: str, stream: IO[bytes], content_type: str = "application/octet-stream") -> int:
        self.client.put_object(self.bucket, key, cast(BinaryIO, stream), length=-1, part_size=PART_SIZE,
                               content_type=content_type)
        return self.size(key)

    def _missing(self, exc: S3Error) -> bool:
        return exc.code in ("NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound")

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def download_file(self, key: str, path: Path) -> None:
        try:
            self.client.fget_object(self.bucket, key, str(path))
        except S3Error as exc:
            if self._missing(exc):
                raise ObjectNotFound(key) from exc
            raise

    def open(self, key: str) -> IO[bytes]:
        try:
            return self.client.get_object(self.bucket, key)  # type: ignore[return-value]
        except S3Error as exc:
            if self._missing(exc):
                raise ObjectNotFound(key) from exc
            raise

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
            return True
        except S3Error as exc:
            if self._missing(exc):
                return False
            raise

    def size(self, key: str) -> int:
        try:
            return int(self.client.stat_object(self.bucket, key).size or 0)
        except S3Error as exc:
            if self._missing(exc):
                raise ObjectNotFound(key) from exc
            raise

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
            if obj.object_name is not None:
                yield ObjectInfo(obj.object_name, int(obj.size or 0))

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)

    def delete_prefix(self, prefix: str) -> int:
        from minio.deleteobjects import DeleteObject

        keys = [DeleteObject(o.key) for o in self.list(prefix)]
        errors = list(self.client.remove_objects(self.bucket, keys))
        if errors:
            raise RuntimeError(f"could not delete {len(errors)} objects under {prefix}: {errors[0]}")
        return len(keys)

    def presigned_get(self, key: str, expires_s: int, filename: str, content_type: str) -> str:
        disposition = f"attachment; filename*=UTF-8''{quote(filename)}"
        return self._presign.presigned_get_object(
            self.bucket, key, expires=timedelta(seconds=expires_s),
            response_headers={"response-content-disposition": disposition,
                              "response-content-type": content_type},
        )

    def ping(self) -> None:
        self.client.bucket_exists(self.bucket)
