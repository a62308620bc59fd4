"""S3 object store through the ``minio`` client (path-style, explicit region, multipart for streams)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO, cast
from urllib.parse import quote

from minio import Minio
from minio.error import S3Error

from app.storage.base import ObjectInfo, ObjectNotFound

if TYPE_CHECKING:
    from app.core.config import Settings

PART_SIZE = 16 * 1024 * 1024


class S3Store:
    """Objects in one bucket; presigned URLs can use a public endpoint distinct from the internal one."""

    def __init__(self, client: Minio, bucket: str, presign_client: Minio | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self._presign = presign_client or client

    @classmethod
    def from_settings(cls, s: Settings) -> S3Store:
        def make(endpoint: str) -> Minio:
            # An explicit region avoids a bucket-location round trip (and lets presigning work offline).
            return Minio(endpoint, access_key=s.s3_access_key, secret_key=s.s3_secret_key.get_secret_value(),
                         secure=s.s3_secure, region=s.s3_region)

        client = make(s.s3_endpoint)
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
