"""Local-folder object store for the embedded mode; signed URLs are served by ``GET /v1/files/{token}``."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from app.core.security import DownloadGrant, sign_download
from app.storage.base import ObjectInfo, ObjectNotFound


class LocalStore:
    """Objects are files under ``root``; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path, secret: str, base_url: str) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._secret = secret
        self._base_url = base_url.rstrip("/")

    def path_of(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root not in p.parents:
            raise ValueError(f"key escapes the store: {key!r}")
        return p

    def _atomic_write(self, key: str, write: IO[bytes] | bytes | Path) -> int:
        dest = self.path_of(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(write, bytes):
                    out.write(write)
                elif isinstance(write, Path):
                    with write.open("rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                else:
                    shutil.copyfileobj(write, out, 1 << 20)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest.stat().st_size

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._atomic_write(key, data)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        self._atomic_write(key, Path(path))

    def put_stream(self, key: str, stream: IO[bytes], content_type: str = "application/octet-stream") -> int:
        return self._atomic_write(key, stream)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path_of(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc

    def download_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self.path_of(key), path)
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc

    def open(self, key: str) -> IO[bytes]:
        try:
            return self.path_of(key).open("rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc

    def exists(self, key: str) -> bool:
        return self.path_of(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self.path_of(key).stat().st_size
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Same semantics as S3: a plain string prefix ("a/d1" also matches "a/d10/x"), so walk from the
        # folder that holds the prefix's last component.
        if not prefix:
            start = self.root
        elif prefix.endswith("/"):
            start = self.path_of(prefix.rstrip("/")) if prefix.strip("/") else self.root
        else:
            start = self.path_of(prefix).parent
        if not start.is_dir():
            return
        for dirpath, _dirs, files in sorted(os.walk(start)):
            for name in sorted(files):
                if name.startswith(".tmp-"):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield ObjectInfo(key, full.stat().st_size)

    def delete(self, key: str) -> None:
        self.path_of(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        keys = [o.key for o in self.list(prefix)]
        for k in keys:
            self.delete(k)
        return len(keys)

    def presigned_get(self, key: str, expires_s: int, filename: str, content_type: str) -> str:
        grant = DownloadGrant(key=key, expires=int(time.time()) + expires_s, filename=filename,
                              content_type=content_type)
        return f"{self._base_url}/v1/files/{sign_download(self._secret, grant)}"

    def ping(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise OSError(f"object folder not writable: {self.root}")
