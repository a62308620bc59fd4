"""Both object stores (local folder and S3 on SeaweedFS) through the same tests."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
from pydantic import SecretStr

from app.core.config import Settings
from app.core.security import InvalidToken, verify_download
from app.storage import ObjectInfo, ObjectNotFound, ObjectStore, build_store
from app.storage.base import tenant_key
from app.storage.local import LocalStore
from app.storage.s3 import PART_SIZE, S3Store

pytestmark = pytest.mark.integration

SECRET = "test-signing-secret"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """Each backend as the service builds it (``build_store``), empty."""
    if request.param == "s3":
        settings: Settings = request.getfixturevalue("s3_settings")
    else:
        settings = Settings(_env_file=None, data_dir=tmp_path / "cxrsynth",  # type: ignore[call-arg]
                            signing_secret=SecretStr(SECRET))
    return build_store(settings)


class PatternStream(io.RawIOBase):
    """A non-seekable stream of ``size`` deterministic bytes whose length the reader cannot know."""

    def __init__(self, size: int) -> None:
        self.remaining = size
        self.sha256 = hashlib.sha256()
        self._block = hashlib.sha256(b"cxrsynth").digest() * 4096  # 128 KiB

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.remaining, len(self._block))
        buffer[:n] = self._block[:n]
        self.sha256.update(self._block[:n])
        self.remaining -= n
        return n


def test_put_get_exists_size_delete(store: ObjectStore, tmp_path: Path) -> None:
    key = tenant_key("t1", "datasets", "d1", "images", "a.png")
    assert not store.exists(key)
    store.put_bytes(key, b"\x89PNG fake", "image/png")
    assert store.exists(key)
    assert store.size(key) == 9
    assert store.get_bytes(key) == b"\x89PNG fake"
    with store.open(key) as f:
        assert f.read() == b"\x89PNG fake"
    store.put_bytes(key, b"replaced")  # overwrite
    assert store.get_bytes(key) == b"replaced"

    src = tmp_path / "src.bin"
    src.write_bytes(b"from a file")
    store.put_file("tenants/t1/encoders/e1/weights.bin", src)
    dest = tmp_path / "dest.bin"
    store.download_file("tenants/t1/encoders/e1/weights.bin", dest)
    assert dest.read_bytes() == b"from a file"

    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting a missing object is not an error


def test_missing_object(store: ObjectStore, tmp_path: Path) -> None:
    for call in (store.get_bytes, store.size, store.open,
                 lambda k: store.download_file(k, tmp_path / "x")):
        with pytest.raises(ObjectNotFound):
            call("tenants/t1/datasets/none/nothing.png")


def test_list_and_delete_prefix(store: ObjectStore) -> None:
    keys = [f"tenants/t1/datasets/d1/{label}/{i}.png" for label in ("NORMAL", "PNEUMONIA") for i in range(3)]
    for k in keys:
        store.put_bytes(k, k.encode())
    other = "tenants/t1/datasets/d10/x.png"  # shares the string prefix "d1" but not the folder
    store.put_bytes(other, b"other")
    store.put_bytes("tenants/t2/datasets/d1/y.png", b"t2")

    listed = list(store.list("tenants/t1/datasets/d1/"))
    assert sorted(o.key for o in listed) == sorted(keys)
    assert all(isinstance(o, ObjectInfo) and o.size == len(o.key) for o in listed)
    assert [o.key for o in store.list("tenants/t1/datasets/d1/NORMAL/")] == sorted(keys[:3])
    assert list(store.list("tenants/t9/")) == []

    assert store.delete_prefix("tenants/t1/datasets/d1/") == 6
    assert list(store.list("tenants/t1/datasets/d1/")) == []
    assert store.exists(other)
    assert store.exists("tenants/t2/datasets/d1/y.png")
    assert store.delete_prefix("tenants/t1/datasets/d1/") == 0


def test_put_stream_of_unknown_length(store: ObjectStore) -> None:
    """40 MB from a non-seekable stream: more than two S3 parts, so S3 must do a multipart upload."""
    size = 40 * 1024 * 1024
    assert size > 2 * PART_SIZE
    stream = PatternStream(size)
    key = "tenants/t1/exports/x1/release.zip"
    assert store.put_stream(key, io.BufferedReader(stream), "application/zip") == size
    assert store.size(key) == size
    digest = hashlib.sha256()
    with store.open(key) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == stream.sha256.hexdigest()
    if isinstance(store, S3Store):
        etag = store.client.stat_object(store.bucket, key).etag or ""
        assert etag.endswith("-3"), f"expected a 3-part multipart ETag, got {etag!r}"


def _filename_of(disposition: str) -> str:
    assert disposition.startswith("attachment;"), disposition
    return unquote(disposition.split("filename*=UTF-8''", 1)[1])


def test_presigned_get(store: ObjectStore) -> None:
    key = "tenants/t1/datasets/d1/release.zip"
    store.put_bytes(key, b"zip bytes", "application/zip")
    url = store.presigned_get(key, 60, "synthetic cxr é.zip", "application/zip")
    if isinstance(store, LocalStore):
        # Served by the API's GET /v1/files/{token}; here: the token grants exactly this download.
        grant = verify_download(SECRET, url.rsplit("/", 1)[1])
        assert (grant.key, grant.filename, grant.content_type) == (key, "synthetic cxr é.zip",
                                                                   "application/zip")
        assert url.startswith("http://127.0.0.1:8000/v1/files/")
        return
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert response.content == b"zip bytes"
    assert response.headers["content-type"] == "application/zip"
    assert _filename_of(response.headers["content-disposition"]) == "synthetic cxr é.zip"


def test_expired_presigned_url_is_refused(store: ObjectStore) -> None:
    key = "tenants/t1/datasets/d1/secret.png"
    store.put_bytes(key, b"x", "image/png")
    url = store.presigned_get(key, 1, "secret.png", "image/png")
    if isinstance(store, LocalStore):
        token = url.rsplit("/", 1)[1]
        verify_download(SECRET, token)  # valid now
        with pytest.raises(InvalidToken, match="expired"):
            verify_download(SECRET, token, now=time.time() + 5)
        return
    time.sleep(2.5)
    response = httpx.get(url, timeout=10)
    assert response.status_code == 403
    assert response.content != b"x"


def test_ping(store: ObjectStore) -> None:
    store.ping()


@pytest.fixture
def local_store(tmp_path: Path) -> Iterator[LocalStore]:
    yield LocalStore(tmp_path / "objects", secret=SECRET, base_url="http://testserver")


@pytest.mark.parametrize("key", ["../escape.txt", "a/../../escape.txt", "/etc/passwd", "a/../.."])
def test_local_store_refuses_path_traversal(local_store: LocalStore, key: str) -> None:
    for call in (lambda: local_store.put_bytes(key, b"x"), lambda: local_store.get_bytes(key),
                 lambda: local_store.delete(key), lambda: local_store.exists(key)):
        with pytest.raises(ValueError, match="escapes"):
            call()
    assert not (local_store.root.parent / "escape.txt").exists()


@pytest.mark.parametrize("part", ["..", "/abs", "a\\b", ""])
def test_tenant_key_refuses_unsafe_parts(part: str) -> None:
    with pytest.raises(ValueError):
        tenant_key("t1", "datasets", "d1", part)


def test_local_writes_are_atomic(local_store: LocalStore) -> None:
    """A failed stream leaves neither the object nor a temp file."""

    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            raise OSError("client went away")

    with pytest.raises(OSError):
        local_store.put_stream("tenants/t1/uploads/u1/a.zip", io.BufferedReader(Broken()))
    assert not local_store.exists("tenants/t1/uploads/u1/a.zip")
    assert list(local_store.root.rglob("*.tmp*")) == [] and list(local_store.root.rglob(".tmp-*")) == []


def test_list_is_a_plain_string_prefix_on_both_stores(store: ObjectStore) -> None:
    """``list("a/d1")`` also matches ``a/d10/...`` (S3 semantics); ``list("a/d1/")`` does not."""
    for key in ("p/d1/x.png", "p/d10/y.png", "p/d2/z.png"):
        store.put_bytes(key, b"1")
    assert sorted(o.key for o in store.list("p/d1")) == ["p/d1/x.png", "p/d10/y.png"]
    assert [o.key for o in store.list("p/d1/")] == ["p/d1/x.png"]
    assert sorted(o.key for o in store.list("p/")) == ["p/d1/x.png", "p/d10/y.png", "p/d2/z.png"]
