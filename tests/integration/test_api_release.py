"""Releasing datasets over HTTP on the real stack (Postgres, Redis, S3 on SeaweedFS): the privacy gate on
downloads, the admin's recorded override, exports built on request by the worker task, and the errors a
client can meet (foreign tenant, unknown format, expired link, failed gate)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from app.core.config import Settings
from app.core.queue import CPU_QUEUE, TASK_BUILD_EXPORT
from app.db.orm import Dataset, Job, JobEvent
from app.db.session import get_sessionmaker
from app.services import releases
from app.storage.base import ObjectStore, build_store
from tests.integration.conftest import (
    TenantAuth,
    assert_problem,
    image_folder_zip,
    queued_tasks,
    running_client,
    upload,
)
from worker import exports as worker_exports
from worker.exports import build_dataset_export, run_export_task

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "admin-token-for-the-release-tests"
REASON = "reviewed every flagged image; none is a copy"


def _png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    pixels = np.clip(np.linspace(30, 220, 32)[:, None] + rng.normal(0, 10, (32, 32)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, "PNG")
    return buf.getvalue()


def make_synthetic(settings: Settings, store: ObjectStore, tenant: TenantAuth, gate_status: str, n: int = 4,
                   with_zip: bool = True) -> str:
    """A finished synthetic dataset as a generation leaves it: images, the worker's manifest, a source job,
    and (``with_zip``) the zip export that finalize builds."""
    with get_sessionmaker(settings.database_url)() as s:
        job = Job(tenant_id=tenant.id, kind="generation", status="succeeded",
                  params={"n": n, "seed": 7, "sampler": "ddim"})
        s.add(job)
        s.flush()
        ds = Dataset(tenant_id=tenant.id, name="synthetic set", origin="synthetic", status="pending", prefix="",
                     source_job_id=job.id)
        s.add(ds)
        s.flush()
        root = f"tenants/{tenant.id}/datasets/{ds.id}"
        ds.prefix = f"{root}/images"
        lines = ["file,label,sha256,index,seed,sampler,steps,guidance,generator_id"]
        counts: dict[str, int] = {}
        for i in range(n):
            label = ("normal", "pneumonia")[i % 2]
            data = _png(i)
            store.put_bytes(f"{ds.prefix}/{label}/{i:07d}.png", data, "image/png")
            lines.append(f"{label}/{i:07d}.png,{label},{hashlib.sha256(data).hexdigest()},{i},{100 + i},ddim,4,,")
            counts[label] = counts.get(label, 0) + 1
        store.put_bytes(f"{root}/manifest.csv", ("\n".join(lines) + "\n").encode(), "text/csv")
        ds.manifest_key, ds.num_images, ds.label_counts = f"{root}/manifest.csv", n, counts
        ds.card = {"generation": {"n": n, "seed": 7, "sampler": "ddim"}, "num_images": n}
        ds.gate_status = gate_status
        ds.privacy = {"max_nn_pixel_similarity": 0.97 if gate_status == "failed" else 0.61}
        if with_zip:
            build_dataset_export(store, ds, "zip")
        ds.status = "ready"
        s.commit()
        return ds.id


@pytest.fixture
def admin_client(settings_with: Callable[..., Settings]) -> Any:
    with running_client(settings_with(admin_token=ADMIN_TOKEN)) as c:
        yield c


def _admin(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _download(client: TestClient, auth: TenantAuth, ds_id: str, fmt: str = "zip") -> Any:
    return client.get(f"/v1/datasets/{ds_id}/download", params={"format": fmt}, headers=auth.headers)


def _export_tasks(redis_url: str, dataset_ids: tuple[str, ...] | None = None) -> list[list[Any]]:
    """Queued export builds (of ``dataset_ids`` only, when given: the queue is shared by the session's tests)."""
    tasks = [args for name, args in queued_tasks(redis_url, CPU_QUEUE) if name == TASK_BUILD_EXPORT]
    return tasks if dataset_ids is None else [args for args in tasks if args[0] in dataset_ids]


def test_gate_blocks_downloads_until_an_admin_override_is_recorded(
    client: TestClient, admin_client: TestClient, tenant: TenantAuth, store: ObjectStore, api_settings: Settings,
    api_redis_url: str, unchanged: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    failed = make_synthetic(api_settings, store, tenant, "failed")
    not_run = make_synthetic(api_settings, store, tenant, "not_run")
    with unchanged():
        for ds_id, status in ((failed, "failed"), (not_run, "not_run")):
            for fmt in ("zip", "webdataset", "dicom"):
                problem = assert_problem(_download(client, tenant, ds_id, fmt), 409, "privacy-gate")
                assert problem["gate_status"] == status and "admin" in problem["detail"]
            assert_problem(client.get(f"/v1/datasets/{ds_id}/images", headers=tenant.headers), 409, "privacy-gate")
        # Admin endpoints: disabled without a token setting, 401 without the right token, validated bodies.
        body = {"actor": "dr.admin@example.org", "reason": REASON}
        disabled = assert_problem(client.post(f"/v1/admin/datasets/{failed}/gate-override", json=body,
                                              headers=_admin()), 401, "unauthorized")
        assert "disabled" in disabled["detail"]
        for headers in ({}, _admin("wrong"), tenant.headers):
            assert_problem(admin_client.post(f"/v1/admin/datasets/{failed}/gate-override", json=body,
                                             headers=headers), 401)
        for bad in ({"actor": "x"}, {"actor": "x", "reason": "short"}, {**body, "extra": 1}):
            assert_problem(admin_client.post(f"/v1/admin/datasets/{failed}/gate-override", json=bad,
                                             headers=_admin()), 422, "validation-error")
        assert_problem(admin_client.post(f"/v1/admin/datasets/{'0' * 32}/gate-override", json=body,
                                         headers=_admin()), 404)
    real = upload(client, tenant, [("r.zip", image_folder_zip({"normal": 1}))]).json()["id"]
    assert_problem(admin_client.post(f"/v1/admin/datasets/{real}/gate-override", json=body, headers=_admin()),
                   409, "gate-not-applicable")
    assert _export_tasks(api_redis_url, (failed, not_run, real)) == []  # nothing built for a gated dataset

    review = admin_client.get(f"/v1/admin/datasets/{failed}", headers=_admin()).json()
    assert review["tenant_id"] == tenant.id and review["privacy"] == {"max_nn_pixel_similarity": 0.97}
    with caplog.at_level(logging.WARNING, logger="cxrsynth.audit"):
        resp = admin_client.post(f"/v1/admin/datasets/{failed}/gate-override", json=body, headers=_admin())
    assert resp.status_code == 200, resp.text
    record = resp.json()["gate_override"]
    assert record["by"] == "dr.admin@example.org" and record["reason"] == REASON and record["gate_status"] == "failed"
    assert record["at"] and any(failed in r.getMessage() and REASON in r.getMessage() for r in caplog.records)
    with get_sessionmaker(api_settings.database_url)() as s:
        ds = s.get(Dataset, failed)
        assert ds is not None and ds.gate_override == record and ds.gate_status == "failed"  # the result stays
        events = list(s.scalars(select(JobEvent.message).where(JobEvent.job_id == ds.source_job_id)))
        assert any("overridden by dr.admin@example.org" in e and REASON in e for e in events)
    assert_problem(admin_client.post(f"/v1/admin/datasets/{failed}/gate-override", json=body, headers=_admin()),
                   409, "already-overridden")

    # The tenant sees the override and may now download; the card still says the gate failed.
    assert client.get(f"/v1/datasets/{failed}", headers=tenant.headers).json()["gate_override"] == record
    link = _download(client, tenant, failed).json()
    with zipfile.ZipFile(io.BytesIO(httpx.get(link["url"], timeout=10).content)) as zf:
        card = json.loads(zf.read("card.json"))
        assert card["privacy"]["gate_status"] == "failed" and len([n for n in zf.namelist() if n.endswith(".png")]) == 4
    assert client.get(f"/v1/datasets/{failed}/images", headers=tenant.headers).status_code == 200

    # Revoking is recorded too, and closes the gate again.
    revoke = admin_client.delete(f"/v1/admin/datasets/{failed}/gate-override",
                                 params={"actor": "dr.admin@example.org", "reason": "second reviewer disagrees"},
                                 headers=_admin())
    assert revoke.status_code == 200 and revoke.json()["gate_override"] is None
    assert_problem(_download(client, tenant, failed), 409, "privacy-gate")
    with get_sessionmaker(api_settings.database_url)() as s:
        ds = s.get(Dataset, failed)
        assert ds is not None
        assert any("revoked" in e for e in s.scalars(select(JobEvent.message).where(
            JobEvent.job_id == ds.source_job_id)))


def test_passed_gate_downloads_and_cannot_be_overridden(client: TestClient, admin_client: TestClient,
                                                        tenant: TenantAuth, store: ObjectStore,
                                                        api_settings: Settings) -> None:
    ds_id = make_synthetic(api_settings, store, tenant, "passed")
    resp = _download(client, tenant, ds_id)
    assert resp.status_code == 200, resp.text
    link = resp.json()
    assert link["filename"] == f"synthetic-set-{ds_id[:8]}.zip" and link["expires_at"]
    got = httpx.get(link["url"], timeout=10)
    assert got.status_code == 200 and link["filename"] in got.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(got.content)) as zf:
        rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
        assert len(rows) == 4 and all(hashlib.sha256(zf.read(r["file"])).hexdigest() == r["sha256"] for r in rows)
        assert {"seed", "nn_pixel_similarity", "replaced"} <= set(rows[0])
        assert "not for diagnosis" in zf.read("README.md").decode()
    assert_problem(admin_client.post(f"/v1/admin/datasets/{ds_id}/gate-override",
                                     json={"actor": "a", "reason": REASON}, headers=_admin()), 409, "gate-passed")


def test_foreign_tenant_and_unknown_format_change_nothing(client: TestClient, tenant: TenantAuth,
                                                          new_tenant: Callable[[], TenantAuth], store: ObjectStore,
                                                          api_settings: Settings, api_redis_url: str,
                                                          unchanged: Any) -> None:
    ds_id = make_synthetic(api_settings, store, tenant, "passed")
    other = new_tenant()
    with unchanged():
        for fmt in ("zip", "webdataset", "dicom"):
            mine = assert_problem(_download(client, other, ds_id, fmt), 404, "not-found")
            unknown = assert_problem(_download(client, other, "0" * 32, fmt), 404, "not-found")
            assert mine["detail"].replace(ds_id, "X") == unknown["detail"].replace("0" * 32, "X")
        for fmt in ("tar", "png", "", "ZIP"):
            problem = assert_problem(_download(client, tenant, ds_id, fmt), 422, "validation-error")
            assert problem["errors"][0]["loc"] == ["query", "format"]
    assert _export_tasks(api_redis_url, (ds_id,)) == []


def test_exports_built_on_request_then_served(client: TestClient, tenant: TenantAuth, store: ObjectStore,
                                              api_settings: Settings, api_redis_url: str, tmp_path: Path) -> None:
    import webdataset as wds

    ds_id = make_synthetic(api_settings, store, tenant, "passed", n=5, with_zip=False)
    sessions = get_sessionmaker(api_settings.database_url)
    for fmt in ("webdataset", "dicom", "zip"):
        first = _download(client, tenant, ds_id, fmt)
        assert first.status_code == 202, first.text
        assert first.headers["retry-after"] == str(first.json()["retry_after_s"])
        assert first.json()["status"] == "building" and first.json()["format"] == fmt
        again = _download(client, tenant, ds_id, fmt)
        assert again.status_code == 202 and again.json()["attempt"] == 1
        assert _export_tasks(api_redis_url).count([ds_id, fmt]) == 1  # enqueued once, not per request
        run_export_task(sessions, store, ds_id, fmt)  # what the worker does with the message
        resp = _download(client, tenant, ds_id, fmt)
        assert resp.status_code == 200, resp.text
        link = resp.json()
        got = httpx.get(link["url"], timeout=10)
        assert got.status_code == 200
        path = tmp_path / link["filename"]
        path.write_bytes(got.content)
        if fmt == "webdataset":
            assert link["filename"].endswith("-webdataset.tar")
            with tarfile.open(path) as tf:
                tf.extractall(tmp_path / "wds", filter="data")
            manifest = list(csv.DictReader((tmp_path / "wds" / "manifest.csv").open()))
            samples = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "wds" / "shards").glob("*.tar")),
                                          shardshuffle=False))
            assert [hashlib.sha256(s["png"]).hexdigest() for s in samples] == [m["sha256"] for m in manifest]
            assert len(samples) == 5
        elif fmt == "dicom":
            assert link["filename"].endswith("-dicom.zip")
            with zipfile.ZipFile(path) as zf:
                manifest = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
                for m in manifest:
                    ds = pydicom.dcmread(io.BytesIO(zf.read(m["dicom_file"])))
                    assert ds.SOPInstanceUID == m["sop_instance_uid"] and str(ds.PatientName) == "SYNTHETIC^CXRSYNTH"
            assert len(manifest) == 5
        else:
            assert zipfile.ZipFile(path).testzip() is None
    keys = sorted(o.key.rsplit("/", 1)[1] for o in store.list(f"tenants/{tenant.id}/datasets/{ds_id}/exports/"))
    assert keys == sorted([f"{ds_id}.zip", f"{ds_id}-webdataset.tar", f"{ds_id}-dicom.zip"])  # statuses cleared

    # A real dataset: WebDataset on request, never DICOM.
    real = upload(client, tenant, [("r.zip", image_folder_zip({"normal": 2}))]).json()["id"]
    assert _download(client, tenant, real, "webdataset").status_code == 202
    problem = assert_problem(_download(client, tenant, real, "dicom"), 409, "format-not-available")
    assert problem["available"] == ["zip", "webdataset"]
    # A build with no sign of life for STALE_AFTER_S (message lost, worker gone) is sent again.
    status_key = f"tenants/{tenant.id}/datasets/{real}/exports/webdataset.status.json"
    store.put_bytes(status_key, json.dumps({"status": "building", "attempts": 1,
                                            "updated": time.time() - releases.STALE_AFTER_S - 60}).encode())
    assert _export_tasks(api_redis_url).count([real, "webdataset"]) == 1
    resend = _download(client, tenant, real, "webdataset")
    assert resend.status_code == 202 and resend.json()["attempt"] == 1  # not counted as a failure
    assert _export_tasks(api_redis_url).count([real, "webdataset"]) == 2


def test_a_running_build_reports_progress(client: TestClient, tenant: TenantAuth, store: ObjectStore,
                                          api_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    ds_id = make_synthetic(api_settings, store, tenant, "passed", n=130, with_zip=False)
    assert _download(client, tenant, ds_id, "webdataset").status_code == 202
    monkeypatch.setattr(worker_exports, "HEARTBEAT_S", 0.0)
    seen: list[dict[str, Any]] = []
    original = store.put_bytes

    def spy(key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        if key.endswith("webdataset.status.json"):
            seen.append(json.loads(data))
        original(key, data, content_type)

    monkeypatch.setattr(store, "put_bytes", spy)
    run_export_task(get_sessionmaker(api_settings.database_url), store, ds_id, "webdataset")
    assert [s["done"] for s in seen] == [64, 128, 130] and all(s["total"] == 130 for s in seen)
    assert _download(client, tenant, ds_id, "webdataset").status_code == 200


def test_a_failing_build_is_retried_then_reported(client: TestClient, tenant: TenantAuth, store: ObjectStore,
                                                  api_settings: Settings) -> None:
    ds_id = make_synthetic(api_settings, store, tenant, "passed", n=3, with_zip=False)
    with get_sessionmaker(api_settings.database_url)() as s:
        ds = s.get(Dataset, ds_id)
        assert ds is not None
        store.delete(f"{ds.prefix}/pneumonia/0000001.png")  # an image lost from the store
    sessions = get_sessionmaker(api_settings.database_url)
    for attempt in range(1, api_settings.max_task_attempts + 1):
        resp = _download(client, tenant, ds_id, "dicom")
        assert resp.status_code == 202 and resp.json()["attempt"] == attempt
        run_export_task(sessions, store, ds_id, "dicom")
    problem = assert_problem(_download(client, tenant, ds_id, "dicom"), 500, "export-failed")
    assert "failed 3 times" in problem["detail"] and "0000001.png" in problem["detail"]


def _sleep_past(expires_at: str, margin_s: float = 1.5) -> None:
    """Sleep until ``margin_s`` after a link's ``expires_at`` (ISO 8601 from the API)."""
    from datetime import datetime

    time.sleep(max(0.0, datetime.fromisoformat(expires_at).timestamp() + margin_s - time.time()))


def test_expired_links_are_refused(settings_with: Callable[..., Settings], tenant: TenantAuth,
                                   tmp_path: Path) -> None:
    # Presigned S3 URL: S3 itself refuses it after the TTL. The TTL is 3 s, not 1: SigV4's X-Amz-Date is
    # whole seconds (truncated), so a 1 s link can be valid for only a few milliseconds (the old flake).
    s3_settings = settings_with(signed_url_ttl_s=3)
    store = build_store(s3_settings)
    ds_id = make_synthetic(s3_settings, store, tenant, "passed")
    with running_client(s3_settings) as c:
        link = _download(c, tenant, ds_id).json()
        assert httpx.get(link["url"], timeout=10).status_code == 200
        _sleep_past(link["expires_at"])
        assert httpx.get(link["url"], timeout=10).status_code == 403
    # Local store: our own signed token, refused with a problem that says it expired.
    local = settings_with(storage_backend="local", storage_dir=tmp_path / "objects", signed_url_ttl_s=3)
    local_ds = make_synthetic(local, build_store(local), tenant, "passed")
    with running_client(local) as c:
        link = _download(c, tenant, local_ds).json()
        path = link["url"].removeprefix("http://testserver")
        assert c.get(path).status_code == 200
        _sleep_past(link["expires_at"])
        problem = assert_problem(c.get(path), 403, "invalid-download-token")
        assert "expired" in problem["detail"]
