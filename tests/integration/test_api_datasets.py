"""Datasets over HTTP on the real stack (S3 on SeaweedFS): uploads and their validation, registration,
thumbnail paging, downloads through presigned URLs, deletion; the local-folder store's signed files."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import time
import zipfile
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from app.core.queue import CPU_QUEUE, TASK_BUILD_DATASET
from app.core.security import DownloadGrant, sign_download
from app.db.orm import Dataset
from app.db.session import get_sessionmaker
from app.storage.base import ObjectStore
from tests.integration.conftest import (
    TenantAuth,
    assert_problem,
    build_uploaded,
    image_folder_zip,
    jpeg_bytes,
    png_bytes,
    queued_tasks,
    running_client,
    upload,
    zip_bytes,
)

pytestmark = pytest.mark.integration


def _keys(store: ObjectStore, prefix: str) -> list[str]:
    return sorted(o.key for o in store.list(prefix))


def test_upload_image_folder_zip(client: TestClient, tenant: TenantAuth, store: ObjectStore,
                                 api_redis_url: str) -> None:
    data = image_folder_zip({"NORMAL": 3, "PNEUMONIA": 2}, wrap="kermany")
    # A 16-bit PNG and a colour JPEG in the same upload are normalised to 8-bit grey PNGs.
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(buf, "PNG")
    extra = zip_bytes({"NORMAL/deep.png": buf.getvalue(), "PNEUMONIA/colour.jpg": jpeg_bytes(),
                       "labels.csv": b"file,label\n", "__MACOSX/._x.png": b"junk", "NORMAL/.DS_Store": b"junk"})
    resp = upload(client, tenant, [("kermany.zip", data), ("extra.zip", extra)], build=False, name="Kermany subset")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    # The request answered once the images were stored: the export is the worker's job, not built yet.
    assert ds["name"] == "Kermany subset" and ds["origin"] == "real" and ds["status"] == "pending"
    assert ds["num_images"] == 7 and ds["label_counts"] == {"normal": 4, "pneumonia": 3}
    root = f"tenants/{tenant.id}/datasets/{ds['id']}"
    assert ds["prefix"] == f"{root}/images" and ds["manifest_key"] == f"{root}/manifest.csv"
    export_key = f"{root}/exports/{ds['id']}.zip"
    keys = _keys(store, root + "/")
    assert export_key not in keys and f"{root}/images/normal/deep.png" in keys
    assert (TASK_BUILD_DATASET, [ds["id"]]) in queued_tasks(api_redis_url, CPU_QUEUE)
    assert client.get(f"/v1/datasets/{ds['id']}", headers=tenant.headers).json() == ds
    assert_problem(client.get(f"/v1/datasets/{ds['id']}/download", headers=tenant.headers), 409, "not-ready")
    build_uploaded(client, ds["id"])  # what the worker does with the queued message
    ds["status"] = "ready"
    assert export_key in _keys(store, root + "/")
    build_uploaded(client, ds["id"])  # a redelivered message changes nothing
    rows = list(csv.DictReader(io.StringIO(store.get_bytes(ds["manifest_key"]).decode())))
    assert len(rows) == 7 and set(rows[0]) == {"file", "label", "sha256"}
    for row in rows:
        blob = store.get_bytes(f"{ds['prefix']}/{row['file']}")
        assert hashlib.sha256(blob).hexdigest() == row["sha256"]
        img = Image.open(io.BytesIO(blob))
        assert img.format == "PNG" and img.mode == "L"
    deep = np.asarray(Image.open(io.BytesIO(store.get_bytes(f"{ds['prefix']}/normal/deep.png"))))
    assert deep.max() == 255  # 16-bit white stays white (scaled, not clipped)

    got = client.get(f"/v1/datasets/{ds['id']}", headers=tenant.headers)
    assert got.status_code == 200 and got.json() == ds
    listed = client.get("/v1/datasets", params={"origin": "real"}, headers=tenant.headers).json()
    assert [d["id"] for d in listed["items"]] == [ds["id"]]


def test_upload_loose_images_need_a_label(client: TestClient, tenant: TenantAuth, unchanged: Any) -> None:
    resp = upload(client, tenant, [("a.png", png_bytes()), ("a.jpg", jpeg_bytes()), ("b c.PNG", png_bytes())],
                  label="Pneumonia")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["label_counts"] == {"pneumonia": 3} and ds["name"] == "a"
    files = [i["file"] for i in client.get(f"/v1/datasets/{ds['id']}/images", headers=tenant.headers).json()["items"]]
    assert sorted(files) == ["pneumonia/a-1.png", "pneumonia/a.png", "pneumonia/b_c.png"]
    with unchanged():
        assert_problem(upload(client, tenant, [("a.png", png_bytes())]), 422, "missing-label")


def _big_chunks(total: int) -> Any:
    boundary = "cxrboundary"
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.zip\"\r\n"
           "Content-Type: application/zip\r\n\r\n").encode()
    chunk = b"\0" * 65536
    for _ in range(total // len(chunk) + 1):
        yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


def _member(name: str, data: bytes, mode: int | None = None, compress: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as zf:
        info = zipfile.ZipInfo(name)
        info.compress_type = compress
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return buf.getvalue()


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "GIF")
    return buf.getvalue()


def _fields_only(fields: dict[str, str]) -> tuple[bytes, str]:
    body = "".join(f'--b\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items())
    return (body + "--b--\r\n").encode(), "multipart/form-data; boundary=b"


BAD_UPLOADS: list[tuple[str, list[tuple[str, bytes]], dict[str, str], int, str]] = [
    ("malformed zip", [("x.zip", b"PK\x03\x04" + b"garbage" * 50)], {}, 422, "malformed-zip"),
    ("truncated zip", [("x.zip", image_folder_zip({"normal": 2})[:-60])], {}, 422, "malformed-zip"),
    ("zip bomb ratio", [("x.zip", zip_bytes({"normal/a.png": b"\0" * 900_000}))], {}, 422, "zip-bomb"),
    ("zip bomb total", [("x.zip", zip_bytes({f"normal/{i}.png": np.random.default_rng(i).bytes(300_000)
                                              for i in range(4)}, zipfile.ZIP_STORED))], {}, 422, "zip-bomb"),
    ("too many members", [("x.zip", zip_bytes({f"normal/{i}.png": png_bytes() for i in range(51)}))], {}, 422,
     "too-many-files"),
    ("parent traversal", [("x.zip", zip_bytes({"normal/a.png": png_bytes(), "../evil.png": png_bytes()}))], {},
     422, "unsafe-path"),
    ("nested traversal", [("x.zip", zip_bytes({"normal/../../evil.png": png_bytes()}))], {}, 422, "unsafe-path"),
    ("absolute name", [("x.zip", zip_bytes({"/etc/evil.png": png_bytes()}))], {}, 422, "unsafe-path"),
    ("drive letter", [("x.zip", zip_bytes({"C:/evil.png": png_bytes()}))], {}, 422, "unsafe-path"),
    ("backslash", [("x.zip", zip_bytes({"normal\\..\\evil.png": png_bytes()}))], {}, 422, "unsafe-path"),
    ("symlink", [("x.zip", _member("normal/link.png", b"/etc/passwd", 0o120777))], {}, 422, "unsafe-path"),
    ("not an image in zip", [("x.zip", zip_bytes({"normal/a.png": b"%PDF-1.4 not a png"}))], {}, 422,
     "not-an-image"),
    ("not an image", [("scan.png", b"MZ\x90\x00 this is an executable")], {"label": "normal"}, 422, "not-an-image"),
    ("gif with png name", [("a.png", _gif())], {"label": "normal"}, 422, "not-an-image"),
    ("truncated png", [("a.png", png_bytes((64, 64))[:40])], {"label": "normal"}, 422, "not-an-image"),
    ("too many pixels", [("a.png", png_bytes((600, 500)))], {"label": "normal"}, 422, "image-too-large"),
    ("too deep", [("x.zip", zip_bytes({"a/normal/b/c.png": png_bytes(), "a/normal/d.png": png_bytes()}))], {},
     422, "bad-layout"),
    ("no label folder", [("x.zip", zip_bytes({"a.png": png_bytes()}))], {}, 422, "bad-layout"),
    ("bad label", [("x.zip", zip_bytes({"no$pe/a.png": png_bytes()}))], {}, 422, "invalid-label"),
    ("empty file", [("a.png", b"")], {"label": "normal"}, 422, "not-an-image"),
    ("no files", [], {"label": "normal"}, 422, "no-files"),
]


@pytest.mark.parametrize(("files", "fields", "status", "slug"), [b[1:] for b in BAD_UPLOADS],
                         ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads_leave_no_trace(client: TestClient, tenant: TenantAuth, unchanged: Any,
                                    files: list[tuple[str, bytes]], fields: dict[str, str], status: int,
                                    slug: str) -> None:
    with unchanged():
        if files:
            resp = upload(client, tenant, files, **fields)
        else:
            body, ctype = _fields_only(fields)
            resp = client.post("/v1/datasets", content=body, headers={**tenant.headers, "content-type": ctype})
        assert_problem(resp, status, slug)


def test_huge_upload_is_cut_off(client: TestClient, tenant: TenantAuth, unchanged: Any) -> None:
    with unchanged():
        # Declared too big: refused before reading.
        resp = upload(client, tenant, [("big.zip", b"\0" * 2_100_000)])
        assert_problem(resp, 413, "payload-too-large")
        # Streamed without a length (chunked): cut off once past the limit.
        resp = client.post("/v1/datasets", content=_big_chunks(3_000_000),
                           headers={**tenant.headers, "content-type": "multipart/form-data; boundary=cxrboundary"})
        assert_problem(resp, 413, "payload-too-large")
        resp = client.post("/v1/datasets", content=b"{}", headers={**tenant.headers,
                                                                   "content-type": "application/json"})
        assert_problem(resp, 415, "unsupported-media-type")


def test_images_pager_and_signed_urls(client: TestClient, tenant: TenantAuth) -> None:
    ds = upload(client, tenant, [("s.zip", image_folder_zip({"normal": 5, "pneumonia": 4}))]).json()
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 4}
        if cursor:
            params["cursor"] = cursor
        page = client.get(f"/v1/datasets/{ds['id']}/images", params=params, headers=tenant.headers).json()
        seen += [i["file"] for i in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == 9
    only = client.get(f"/v1/datasets/{ds['id']}/images", params={"label": "PNEUMONIA"}, headers=tenant.headers)
    items = only.json()["items"]
    assert [i["label"] for i in items] == ["pneumonia"] * 4
    thumb = httpx.get(items[0]["url"], timeout=10)  # presigned S3 URL, no API key
    assert thumb.status_code == 200 and hashlib.sha256(thumb.content).hexdigest() == items[0]["sha256"]
    assert thumb.headers["content-type"] == "image/png"
    assert_problem(client.get(f"/v1/datasets/{ds['id']}/images", params={"cursor": "WyJ4Il0"},
                              headers=tenant.headers), 422, "invalid-cursor")


def test_download_zip_through_presigned_url(client: TestClient, tenant: TenantAuth) -> None:
    ds = upload(client, tenant, [("s.zip", image_folder_zip({"normal": 2, "pneumonia": 1}))], name="My set").json()
    resp = client.get(f"/v1/datasets/{ds['id']}/download", params={"format": "zip"}, headers=tenant.headers)
    assert resp.status_code == 200
    link = resp.json()
    assert link["filename"] == f"My-set-{ds['id'][:8]}.zip" and link["expires_at"]
    got = httpx.get(link["url"], timeout=10)
    assert got.status_code == 200 and link["filename"] in got.headers["content-disposition"]
    tampered = re.sub(r"(X-Amz-Signature=)([0-9a-f])", lambda m: m.group(1) + ("0" if m.group(2) != "0" else "1"),
                      link["url"])
    assert tampered != link["url"] and httpx.get(tampered, timeout=10).status_code == 403
    with zipfile.ZipFile(io.BytesIO(got.content)) as zf:
        names = sorted(zf.namelist())
        assert names == ["README.md", "card.json", "dataset.json", "manifest.csv", "normal/img000.png",
                         "normal/img001.png", "pneumonia/img000.png"]
        manifest = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
        for row in manifest:
            assert hashlib.sha256(zf.read(row["file"])).hexdigest() == row["sha256"]
    # WebDataset is built by a worker on request (tests/integration/test_api_release.py); DICOM is synthetic-only.
    assert client.get(f"/v1/datasets/{ds['id']}/download", params={"format": "webdataset"},
                      headers=tenant.headers).status_code == 202
    assert_problem(client.get(f"/v1/datasets/{ds['id']}/download", params={"format": "dicom"},
                              headers=tenant.headers), 409, "format-not-available")
    assert_problem(client.get(f"/v1/datasets/{ds['id']}/download", params={"format": "tar"},
                              headers=tenant.headers), 422, "validation-error")


def test_register_prefix(client: TestClient, tenant: TenantAuth, store: ObjectStore, unchanged: Any,
                         new_tenant: Callable[[], TenantAuth]) -> None:
    base = f"tenants/{tenant.id}/uploads/batch1"
    store.put_bytes(f"{base}/NORMAL/a.png", png_bytes(), "image/png")
    store.put_bytes(f"{base}/PNEUMONIA/b.jpeg", jpeg_bytes(), "image/jpeg")
    store.put_bytes(f"{base}/labels.csv", b"file,label\n", "text/csv")
    resp = client.post("/v1/datasets/register", json={"name": "batch 1", "prefix": base + "/"},
                       headers=tenant.headers)
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["prefix"] == base and ds["label_counts"] == {"normal": 1, "pneumonia": 1}
    assert ds["status"] == "pending"
    assert not store.exists(f"tenants/{tenant.id}/datasets/{ds['id']}/exports/{ds['id']}.zip")
    build_uploaded(client, ds["id"])
    assert client.get(f"/v1/datasets/{ds['id']}", headers=tenant.headers).json()["status"] == "ready"
    link = client.get(f"/v1/datasets/{ds['id']}/download", headers=tenant.headers).json()
    with zipfile.ZipFile(io.BytesIO(httpx.get(link["url"], timeout=10).content)) as zf:
        assert {"NORMAL/a.png", "PNEUMONIA/b.jpeg", "manifest.csv"} <= set(zf.namelist())
    # Deleting a registered dataset removes what the service made, not the registered objects.
    assert client.delete(f"/v1/datasets/{ds['id']}", headers=tenant.headers).status_code == 204
    assert _keys(store, base + "/") == [f"{base}/NORMAL/a.png", f"{base}/PNEUMONIA/b.jpeg", f"{base}/labels.csv"]
    assert _keys(store, f"tenants/{tenant.id}/datasets/{ds['id']}/") == []

    other = new_tenant()
    store.put_bytes(f"tenants/{other.id}/uploads/x/NORMAL/a.png", png_bytes(), "image/png")
    store.put_bytes(f"{base}/bad/evil.png", b"not an image", "image/png")
    with unchanged():
        for prefix, slug in [(f"tenants/{other.id}/uploads/x", "invalid-prefix"),  # another tenant's objects
                             (f"tenants/{tenant.id}/../{other.id}/uploads/x", "invalid-prefix"),
                             (f"tenants/{tenant.id}", "invalid-prefix"), ("/etc", "invalid-prefix"),
                             (f"tenants/{tenant.id}/nothing-here", "no-files"),
                             (base, "not-an-image")]:
            assert_problem(client.post("/v1/datasets/register", json={"name": "x", "prefix": prefix},
                                       headers=tenant.headers), 422, slug)


def test_delete_real_dataset_and_synthetic_is_immutable(client: TestClient, tenant: TenantAuth,
                                                        store: ObjectStore, api_settings: Settings,
                                                        unchanged: Any) -> None:
    ds = upload(client, tenant, [("s.zip", image_folder_zip({"normal": 2}))]).json()
    root = f"tenants/{tenant.id}/datasets/{ds['id']}/"
    assert _keys(store, root)
    assert client.delete(f"/v1/datasets/{ds['id']}", headers=tenant.headers).status_code == 204
    assert _keys(store, root) == []
    assert_problem(client.get(f"/v1/datasets/{ds['id']}", headers=tenant.headers), 404)
    assert_problem(client.delete(f"/v1/datasets/{ds['id']}", headers=tenant.headers), 404)

    with get_sessionmaker(api_settings.database_url)() as s:
        syn = Dataset(tenant_id=tenant.id, name="syn", origin="synthetic", status="ready",
                      prefix=f"tenants/{tenant.id}/datasets/syn/images")
        s.add(syn)
        s.commit()
        syn_id = syn.id
    with unchanged():
        assert_problem(client.delete(f"/v1/datasets/{syn_id}", headers=tenant.headers), 409, "immutable-dataset")
        assert client.put(f"/v1/datasets/{syn_id}", json={}, headers=tenant.headers).status_code == 405

    # A dataset an active job reads cannot be deleted.
    busy = upload(client, tenant, [("s.zip", image_folder_zip({"normal": 1}))]).json()
    job = client.post("/v1/generators", json={"dataset_id": busy["id"], "name": "g"}, headers=tenant.headers).json()
    with unchanged():
        problem = assert_problem(client.delete(f"/v1/datasets/{busy['id']}", headers=tenant.headers), 409,
                                 "dataset-in-use")
        assert problem["job_id"] == job["id"]


def test_local_store_signed_files(settings_with: Callable[..., Settings], tenant: TenantAuth, tmp_path: Any) -> None:
    settings = settings_with(storage_backend="local", storage_dir=tmp_path / "objects")
    secret = settings.signing_secret.get_secret_value()
    with running_client(settings) as c:
        ds = upload(c, tenant, [("s.zip", image_folder_zip({"normal": 2}))]).json()
        link = c.get(f"/v1/datasets/{ds['id']}/download", headers=tenant.headers).json()
        assert link["url"].startswith("http://testserver/v1/files/")
        path = link["url"].removeprefix("http://testserver")
        got = c.get(path)  # no API key: the token is the credential
        assert got.status_code == 200 and got.headers["content-type"] == "application/zip"
        assert got.headers["content-disposition"] == f'attachment; filename="{link["filename"]}"'
        assert zipfile.ZipFile(io.BytesIO(got.content)).testzip() is None
        thumb = c.get(f"/v1/datasets/{ds['id']}/images", headers=tenant.headers).json()["items"][0]
        img = c.get(thumb["url"].removeprefix("http://testserver"))
        assert img.status_code == 200 and img.headers["content-type"] == "image/png"

        token = path.rsplit("/", 1)[1]
        body, mac = token.split(".")
        tampered = ("A" if body[0] != "A" else "B") + body[1:] + "." + mac
        assert_problem(c.get(f"/v1/files/{tampered}"), 403, "invalid-download-token")
        # Change a middle character of the MAC: the last base64 characters carry padding bits that
        # decoding drops, so rewriting the tail could (1 run in ~1000) leave the MAC unchanged.
        bad_mac = mac[:10] + ("A" if mac[10] != "A" else "B") + mac[11:]
        assert_problem(c.get(f"/v1/files/{body}.{bad_mac}"), 403, "invalid-download-token")
        assert_problem(c.get("/v1/files/not-a-token"), 403, "invalid-download-token")
        key = f"tenants/{tenant.id}/datasets/{ds['id']}/exports/{ds['id']}.zip"
        expired = sign_download(secret, DownloadGrant(key, int(time.time()) - 1, "x.zip", "application/zip"))
        assert_problem(c.get(f"/v1/files/{expired}"), 403, "invalid-download-token")
        forged = sign_download("another-secret", DownloadGrant(key, int(time.time()) + 60, "x.zip", "application/zip"))
        assert_problem(c.get(f"/v1/files/{forged}"), 403, "invalid-download-token")
        escape = sign_download(secret, DownloadGrant("../../etc/passwd", int(time.time()) + 60, "p", "text/plain"))
        assert_problem(c.get(f"/v1/files/{escape}"), 403, "invalid-download-token")
        gone = sign_download(secret, DownloadGrant("tenants/x/none.zip", int(time.time()) + 60, "p", "text/plain"))
        assert_problem(c.get(f"/v1/files/{gone}"), 404)


def test_upload_with_the_broker_down_leaves_no_trace(settings_with: Callable[..., Settings], tenant: TenantAuth,
                                                     unchanged: Any) -> None:
    settings = settings_with(broker_url="redis://127.0.0.1:1/0")
    with running_client(settings) as c, unchanged():
        assert_problem(upload(c, tenant, [("s.zip", image_folder_zip({"normal": 1}))]), 503, "queue-unavailable")


def test_a_failed_build_marks_the_upload_failed(client: TestClient, tenant: TenantAuth, store: ObjectStore) -> None:
    ds = upload(client, tenant, [("s.zip", image_folder_zip({"normal": 2}))], build=False).json()
    store.delete(f"{ds['prefix']}/normal/img001.png")  # an image lost before the worker ran
    build_uploaded(client, ds["id"])
    got = client.get(f"/v1/datasets/{ds['id']}", headers=tenant.headers).json()
    assert got["status"] == "failed" and "img001.png" in got["card"]["build_error"]
    assert not store.exists(f"tenants/{tenant.id}/datasets/{ds['id']}/exports/{ds['id']}.zip")
    assert_problem(client.get(f"/v1/datasets/{ds['id']}/download", headers=tenant.headers), 409, "not-ready")
    assert client.delete(f"/v1/datasets/{ds['id']}", headers=tenant.headers).status_code == 204
