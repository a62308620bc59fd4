"""Authentication on every endpoint, and tenant isolation: another tenant's ids answer 404 exactly like
unknown ids on every endpoint that takes an id, and lists never show them."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.db.orm import Encoder, Generator, new_id
from app.db.session import get_sessionmaker
from app.services.tenants import create_api_key, revoke_api_key
from app.storage.base import ObjectStore, tenant_key
from tests.integration.conftest import TINY_GENERATOR_META, TenantAuth, assert_problem, image_folder_zip, upload

pytestmark = pytest.mark.integration

PUBLIC = {"/healthz", "/readyz", "/metrics", "/v1/files/{token}"}


def _authenticated_operations(client: TestClient) -> list[tuple[str, str]]:
    spec = client.get("/openapi.json").json()
    ops = []
    for path, methods in spec["paths"].items():
        if path in PUBLIC:
            continue
        for method in methods:
            ops.append((method.upper(), path.replace("{", "").replace("}", "")))
    return ops


def test_every_v1_operation_requires_a_valid_key(client: TestClient, tenant: TenantAuth,
                                                 api_settings: Settings, unchanged: Any) -> None:
    ops = _authenticated_operations(client)
    assert len(ops) >= 20 and all(path.startswith("/v1/") for _, path in ops)
    with get_sessionmaker(api_settings.database_url)() as s:
        revoked, revoked_key = create_api_key(s, tenant.id, "to revoke")
        revoke_api_key(s, revoked.id, tenant_id=tenant.id)
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer cxr_not-a-real-key"},
        {"Authorization": f"Basic {tenant.key}"},
        {"X-API-Key": "nope"},
        {"Authorization": f"Bearer {revoked_key}"},
        {"X-API-Key": revoked_key},
    ]
    with unchanged():
        for method, path in ops:
            for headers in bad_headers:
                resp = client.request(method, path, headers=headers, json={"n": 1})
                problem = assert_problem(resp, 401, "unauthorized")
                assert resp.headers["www-authenticate"].startswith("Bearer"), (method, path)
                assert "cxr_" not in problem["detail"].replace("cxr_...", "")
    # Both header forms work with a live key.
    assert client.get("/v1/jobs", headers={"X-API-Key": tenant.key}).status_code == 200
    assert client.get("/v1/jobs", headers=tenant.headers).status_code == 200
    # Public endpoints need no key.
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path


@pytest.fixture
def owned(client: TestClient, new_tenant: Callable[[], TenantAuth], api_settings: Settings,
          store: ObjectStore) -> dict[str, Any]:
    """Tenant A with one of everything: a dataset, a generation job, a generator, an encoder."""
    a = new_tenant()
    ds = upload(client, a, [("a.zip", image_folder_zip({"normal": 2, "pneumonia": 1}))]).json()
    job = client.post("/v1/generations", json={"n": 2}, headers=a.headers).json()
    gen_id, enc_id = new_id(), new_id()
    gen_prefix = tenant_key(a.id, "generators", gen_id)
    store.put_bytes(f"{gen_prefix}/cxrsynth.json", json.dumps(TINY_GENERATOR_META).encode(), "application/json")
    store.put_bytes(f"{gen_prefix}/diffusion_pytorch_model.safetensors", b"\0" * 16)
    with get_sessionmaker(api_settings.database_url)() as s:
        s.add(Generator(id=gen_id, tenant_id=a.id, name="a-gen", prefix=gen_prefix, config=TINY_GENERATOR_META))
        s.add(Encoder(id=enc_id, tenant_id=a.id, name="a-enc", prefix=tenant_key(a.id, "encoders", enc_id)))
        s.commit()
    return {"tenant": a, "dataset": ds["id"], "job": job["id"], "generator": gen_id, "encoder": enc_id}


def _id_requests(ids: dict[str, str]) -> list[tuple[str, str, dict[str, Any] | None]]:
    d, j, g, e = ids["dataset"], ids["job"], ids["generator"], ids["encoder"]
    return [
        ("GET", f"/v1/jobs/{j}", None),
        ("POST", f"/v1/jobs/{j}/cancel", None),
        ("GET", f"/v1/jobs/{j}/events", None),
        ("GET", f"/v1/jobs/{j}/events?format=json", None),
        ("GET", f"/v1/datasets/{d}", None),
        ("GET", f"/v1/datasets/{d}/images", None),
        ("GET", f"/v1/datasets/{d}/download?format=zip", None),
        ("GET", f"/v1/datasets/{d}/download?format=webdataset", None),
        ("DELETE", f"/v1/datasets/{d}", None),
        ("GET", f"/v1/generators/{g}", None),
        ("GET", f"/v1/generators/{g}/download", None),
        ("GET", f"/v1/encoders/{e}", None),
        ("GET", f"/v1/encoders/{e}/download", None),
        ("POST", "/v1/generations", {"n": 1, "generator_id": g}),
        ("POST", "/v1/generators", {"dataset_id": d, "name": "stolen"}),
    ]


def test_other_tenants_ids_answer_404_like_unknown_ids(client: TestClient, owned: dict[str, Any],
                                                       new_tenant: Callable[[], TenantAuth], unchanged: Any) -> None:
    b = new_tenant()
    unknown = {k: "0" * 32 for k in ("dataset", "job", "generator", "encoder")}
    with unchanged():
        for (method, path, body), (_, unknown_path, unknown_body) in zip(
                _id_requests(owned), _id_requests(unknown), strict=True):
            theirs = client.request(method, path, json=body, headers=b.headers)
            problem = assert_problem(theirs, 404, "not-found")
            missing = assert_problem(client.request(method, unknown_path, json=unknown_body, headers=b.headers), 404)
            assert problem["title"] == missing["title"] and problem["type"] == missing["type"], path
    # Lists never show A's resources; built-ins are shared.
    for path, key in [("/v1/jobs", "job"), ("/v1/datasets", "dataset"), ("/v1/generators", "generator"),
                      ("/v1/encoders", "encoder")]:
        visible_to_b = [i["id"] for i in client.get(path, headers=b.headers).json()["items"]]
        visible_to_a = [i["id"] for i in client.get(path, headers=owned["tenant"].headers).json()["items"]]
        assert owned[key] in visible_to_a and owned[key] not in visible_to_b, path
    gens_b = client.get("/v1/generators", headers=b.headers).json()["items"]
    assert gens_b and all(g["builtin"] for g in gens_b)


def test_owner_reaches_everything(client: TestClient, owned: dict[str, Any]) -> None:
    a: TenantAuth = owned["tenant"]
    for method, path, body in _id_requests(owned):
        if method == "DELETE" or path.endswith("cancel") or "webdataset" in path or path.endswith("/events"):
            continue  # destructive, tested elsewhere, or a stream that waits for the job
        resp = client.request(method, path, json=body, headers=a.headers)
        assert resp.status_code in (200, 202, 409), (path, resp.text)  # encoder without files: 409 not-ready
    link = client.get(f"/v1/generators/{owned['generator']}/download", headers=a.headers).json()
    got = httpx.get(link["url"], timeout=10)
    with zipfile.ZipFile(io.BytesIO(got.content)) as zf:
        assert sorted(zf.namelist()) == ["cxrsynth.json", "diffusion_pytorch_model.safetensors"]


def test_key_cache_revocation_is_immediate_here_and_bounded_elsewhere(
        api_settings: Settings, settings_with: Callable[..., Settings], tenant: TenantAuth) -> None:
    """A valid key's lookup is reused for ``auth_cache_ttl_s`` seconds. A key revoked through the service in
    this process stops working at once; one revoked behind the process's back (another process, e.g. the CLI:
    here a direct UPDATE) keeps working until the entry expires and not after; an unknown key is never kept."""
    import time

    from sqlalchemy import update

    from app.db.orm import ApiKey
    from app.main import create_app

    ttl = 1.0
    settings = settings_with(auth_cache_ttl_s=ttl)
    sessions = get_sessionmaker(api_settings.database_url)
    with sessions() as s:
        here, here_key = create_api_key(s, tenant.id, "revoked here")
        there, there_key = create_api_key(s, tenant.id, "revoked elsewhere")
    with TestClient(create_app(settings)) as c:
        def status(key: str) -> int:
            return c.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code

        assert status(here_key) == 200 and status(there_key) == 200  # both cached now
        with sessions() as s:
            revoke_api_key(s, here.id, tenant_id=tenant.id)
            s.execute(update(ApiKey).where(ApiKey.id == there.id).values(revoked_at=ApiKey.created_at))
            s.commit()
        revoked_at = time.monotonic()
        assert status(here_key) == 401
        if time.monotonic() - revoked_at < ttl * 0.8:
            assert status(there_key) == 200  # still inside the cache's lifetime
        time.sleep(ttl + 0.2)
        assert status(there_key) == 401
        assert status(tenant.key) == 200  # the tenant's other key is untouched
    with TestClient(create_app(settings_with(auth_cache_ttl_s=0))) as c:
        with sessions() as s:
            fresh, fresh_key = create_api_key(s, tenant.id, "no cache")
        assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {fresh_key}"}).status_code == 200
        with sessions() as s:
            s.execute(update(ApiKey).where(ApiKey.id == fresh.id).values(revoked_at=ApiKey.created_at))
            s.commit()
        assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {fresh_key}"}).status_code == 401
