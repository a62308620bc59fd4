"""Generators and encoders (built-in rows, reading, zip downloads), health probes, metrics, and the
problem+json shape of unexpected errors."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.core.config import Settings
from app.core.queue import CPU_QUEUE, GPU_QUEUE
from app.db.orm import Generator, Job, JobStatus, utcnow
from app.db.session import get_sessionmaker
from tests.integration.conftest import TenantAuth, assert_problem, running_client

pytestmark = pytest.mark.integration


def test_builtin_generator_and_encoder(client: TestClient, tenant: TenantAuth, api_weights_dir: Path) -> None:
    gens = client.get("/v1/generators", headers=tenant.headers).json()["items"]
    builtin = next(g for g in gens if g["name"] == "generator-api-tiny")
    meta = json.loads((api_weights_dir / "generator-api-tiny" / "cxrsynth.json").read_text())
    assert builtin["builtin"] is True and builtin["status"] == "ready" and builtin["config"] == meta
    assert builtin["labels"] == {"normal": 0, "pneumonia": 1} and builtin["resolution"] == 32
    assert builtin["card"] == (api_weights_dir / "generator-api-tiny" / "README.md").read_text()
    got = client.get(f"/v1/generators/{builtin['id']}", headers=tenant.headers)
    assert got.status_code == 200 and got.json() == builtin

    link = client.get(f"/v1/generators/{builtin['id']}/download", headers=tenant.headers).json()
    assert link["filename"] == "generator-api-tiny.zip"
    resp = httpx.get(link["url"], timeout=30)
    assert resp.status_code == 200 and "generator-api-tiny.zip" in resp.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(resp.content)) as zf:
        names = set(zf.namelist())
        assert {"cxrsynth.json", "config.json", "README.md"} <= names
        assert json.loads(zf.read("cxrsynth.json")) == meta
    # The zip is built once and reused.
    again = client.get(f"/v1/generators/{builtin['id']}/download", headers=tenant.headers).json()
    assert again["url"].split("?")[0] == link["url"].split("?")[0]

    encs = client.get("/v1/encoders", headers=tenant.headers).json()["items"]
    enc = next(e for e in encs if e["name"] == "encoder-api-tiny")
    assert enc["builtin"] and enc["config"] == {"backbone": "resnet18", "embedding_dim": 512}
    assert client.get(f"/v1/encoders/{enc['id']}", headers=tenant.headers).json() == enc
    elink = client.get(f"/v1/encoders/{enc['id']}/download", headers=tenant.headers).json()
    with zipfile.ZipFile(io.BytesIO(httpx.get(elink["url"], timeout=30).content)) as zf:
        assert sorted(zf.namelist()) == ["README.md", "config.json", "model.safetensors"]
    assert_problem(client.get("/v1/generators/" + "0" * 32, headers=tenant.headers), 404)
    assert_problem(client.get("/v1/encoders/nope/download", headers=tenant.headers), 404)


def test_builtin_rows_follow_the_folder(settings_with: Callable[..., Settings], tenant: TenantAuth,
                                        api_settings: Settings, tmp_path: Path, unchanged: Any) -> None:
    # No cxrsynth.json in the default folder: no default generator, generation without id is 409.
    empty = tmp_path / "generator-missing"
    empty.mkdir()
    with running_client(settings_with(default_generator_dir=empty)) as c:
        names = [g["name"] for g in c.get("/v1/generators", headers=tenant.headers).json()["items"]]
        assert "generator-missing" not in names
        with unchanged():
            assert_problem(c.post("/v1/generations", json={"n": 1}, headers=tenant.headers), 409,
                           "no-default-generator")
    # Restarting with the usual folder upserts the same row (same id), not a second one.
    with running_client(api_settings):
        with get_sessionmaker(api_settings.database_url)() as s:
            rows = list(s.scalars(select(Generator).where(Generator.name == "generator-api-tiny",
                                                          Generator.tenant_id.is_(None))))
        assert len(rows) == 1 and rows[0].status == "ready"


def test_every_shipped_generator_is_a_builtin(settings_with: Callable[..., Settings], tenant: TenantAuth,
                                             api_weights_dir: Path, tmp_path: Path) -> None:
    """The default and the other ``generator-*`` folders beside it (e.g. the 64 px one next to the 224 px
    default) are served; only the default answers requests without ``generator_id``."""
    weights = tmp_path / "weights"
    for name in ("generator-site-224", "generator-site-64"):
        shutil.copytree(api_weights_dir / "generator-api-tiny", weights / name)
    (weights / "generator-notes").mkdir()  # no cxrsynth.json: not a generator
    with running_client(settings_with(default_generator_dir=weights / "generator-site-224")) as c:
        gens = {g["name"]: g for g in c.get("/v1/generators", headers=tenant.headers).json()["items"]}
        assert {"generator-site-224", "generator-site-64"} <= set(gens) and "generator-notes" not in gens
        assert gens["generator-site-64"]["builtin"] and gens["generator-site-64"]["status"] == "ready"
        job = c.post("/v1/generations", json={"n": 1}, headers=tenant.headers).json()
        assert job["params"]["generator_id"] == gens["generator-site-224"]["id"], job
        other = c.post("/v1/generations", json={"n": 1, "generator_id": gens["generator-site-64"]["id"]},
                       headers=tenant.headers)
        assert other.status_code == 202, other.text


def test_healthz_and_readyz(client: TestClient, settings_with: Callable[..., Settings]) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok", "storage": "ok"}}

    broken = settings_with(broker_url="redis://127.0.0.1:1/0", s3_bucket="no-such-bucket-for-readyz")
    with running_client(broken) as c:
        assert c.get("/healthz").status_code == 200  # alive, not ready
        problem = assert_problem(c.get("/readyz"), 503, "not-ready")
        assert problem["checks"]["database"] == "ok"
        assert problem["checks"]["broker"].startswith("error")
        assert "broker" in problem["detail"]


def _samples(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        if series == name or (series.startswith(name + "{") and series.endswith("}")):
            out[series[len(name):]] = float(value)
    return out


def test_metrics(client: TestClient, tenant: TenantAuth, api_settings: Settings, api_redis_url: str) -> None:
    before = client.get("/metrics").text
    jobs_before = _samples(before, "cxrsynth_jobs")
    images_before = _samples(before, "cxrsynth_images_generated_total")[""]

    job = client.post("/v1/generations", json={"n": 3}, headers=tenant.headers).json()
    done = client.post("/v1/generations", json={"n": 2}, headers=tenant.headers).json()
    with get_sessionmaker(api_settings.database_url)() as s:
        row = s.get(Job, done["id"])
        assert row is not None
        row.status, row.finished_at = JobStatus.succeeded.value, utcnow()
        row.result = {"dataset_id": "d", "num_images": 2}
        s.commit()
    client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers)

    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    jobs = _samples(text, "cxrsynth_jobs")
    queued = '{kind="generation",status="queued"}'
    succeeded = '{kind="generation",status="succeeded"}'
    assert jobs[queued] == jobs_before[queued] + 1 and jobs[succeeded] == jobs_before[succeeded] + 1
    assert '{kind="pretraining",status="running"}' in jobs  # every combination, zeros included
    assert _samples(text, "cxrsynth_images_generated_total")[""] == images_before + 2
    depth = _samples(text, "cxrsynth_queue_depth")
    r = redis.Redis.from_url(api_redis_url)
    assert depth['{queue="cpu"}'] == r.llen(CPU_QUEUE) and depth['{queue="gpu"}'] == r.llen(GPU_QUEUE)
    latency = _samples(text, "cxrsynth_http_request_duration_seconds_count")
    assert latency['{method="GET",route="/v1/jobs/{job_id}",status="200"}'] >= 1  # route template, not the id
    assert latency['{method="POST",route="/v1/generations",status="202"}'] >= 2
    assert not any(job["id"] in key for key in latency)


def test_unexpected_errors_are_problems_without_internals(api_settings: Settings) -> None:
    from app.main import create_app

    app = create_app(api_settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    with TestClient(app, raise_server_exceptions=False) as c:
        problem = assert_problem(c.get("/boom"), 500, "internal-error")
        assert "hunter2" not in json.dumps(problem) and "RuntimeError" not in json.dumps(problem)
        assert_problem(c.get("/v1/nothing-here"), 404)
        assert_problem(c.delete("/healthz"), 405)
