"""Fixtures of the API integration tests (``test_api_*.py``): the app on the real stack.

Postgres (``postgres_url``), S3 on SeaweedFS (``seaweed``) and Redis come from ``tests/conftest.py``.
The API tests enqueue real Celery messages and leave them unconsumed, so they use their own Redis
database beside the shared one (flushed before and after) and never feed another test's worker.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from app.core.config import Settings
from app.db import orm
from app.db.session import get_sessionmaker
from app.main import create_app
from app.services.tenants import create_tenant
from app.storage.base import ObjectStore, build_store
from tests.support import DATA_DIR, S3Server, s3_settings_for
from worker.dispatch import InlineDispatcher
from worker.runtime import WorkerContext

API_LIMITS: dict[str, Any] = {
    "public_base_url": "http://testserver",
    "max_images_per_job": 100,
    "max_jobs_in_flight_per_tenant": 1000,
    "max_upload_bytes": 2_000_000,
    "max_upload_files": 50,
    "max_uncompressed_bytes": 1_000_000,
    "max_image_pixels": 512 * 512,
    "max_compression_ratio": 50.0,
    "page_size_max": 20,
    "signed_url_ttl_s": 120,
}
TINY_GENERATOR_META = {"format": "cxrsynth-generator/1", "resolution": 32, "channels": 1,
                       "labels": {"normal": 0, "pneumonia": 1}, "null_class_id": 2, "conditional": True}
TABLES = (orm.Tenant, orm.ApiKey, orm.Job, orm.JobEvent, orm.JobShard, orm.Dataset, orm.Generator, orm.Encoder,
          orm.WebhookDelivery)


@pytest.fixture(scope="session")
def api_redis_url(redis_url: str) -> Iterator[str]:
    """A Redis database of the API tests only (a second lease, so their queue stays apart)."""
    from tests.support import RedisLease

    lease = RedisLease()
    url = lease.acquire()
    yield url
    lease.release()


def _write_fake_generator(out: Path) -> None:
    """The files of a generator folder with a real ``cxrsynth.json`` (weights are never read by the API)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "cxrsynth.json").write_text(json.dumps(TINY_GENERATOR_META))
    (out / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 32}))
    (out / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    (out / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    (out / "README.md").write_text("# tiny test generator\n")


@pytest.fixture(scope="session")
def api_weights_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A weights folder: ``generator-api-tiny/`` (the default generator) and ``encoder-api-tiny/``.

    The generator is a copy of the session's ``tiny_generator`` (trained on PneumoniaMNIST) when the data
    is there, else a folder written by hand: the API only reads ``cxrsynth.json`` and zips the folder, it
    never runs a model. The copy has its own name, so its built-in row never collides with the one the
    worker and end-to-end tests register for ``generator-tiny`` in the same database.
    """
    root = tmp_path_factory.mktemp("weights")
    gen = root / "generator-api-tiny"
    if (DATA_DIR / "pneumoniamnist" / "pneumoniamnist_28.npz").is_file():
        shutil.copytree(request.getfixturevalue("tiny_generator"), gen)
    else:
        _write_fake_generator(gen)
    enc = root / "encoder-api-tiny"
    enc.mkdir()
    (enc / "config.json").write_text(json.dumps({"backbone": "resnet18", "embedding_dim": 512}))
    (enc / "model.safetensors").write_bytes(b"\0" * 32)
    (enc / "README.md").write_text("# tiny test encoder\n")
    return root


@pytest.fixture(scope="session")
def api_settings(
    seaweed: S3Server, postgres_url: str, api_redis_url: str, api_weights_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Settings:
    """Settings of the real stack (Postgres, Redis, S3) with small limits the tests can reach."""
    return s3_settings_for(seaweed, tmp_path_factory.mktemp("api-data"), database_url=postgres_url,
                           broker_url=api_redis_url, default_generator_dir=api_weights_dir / "generator-api-tiny",
                           **API_LIMITS)


@contextmanager
def running_client(settings: Settings, **client_kwargs: Any) -> Iterator[TestClient]:
    """A TestClient of ``create_app(settings)`` with its lifespan (migrations, built-in rows) run."""
    with TestClient(create_app(settings), **client_kwargs) as client:
        yield client


def run_inline(settings: Settings, job_id: str) -> WorkerContext:
    """What a worker does with the job's start message (and every task it sends on), in this process."""
    from app.core.queue import TASK_START_JOB
    from worker.tasks.jobs import task_registry

    ctx = WorkerContext(settings, InlineDispatcher({}))
    dispatcher = InlineDispatcher(task_registry(ctx))
    ctx.dispatcher = dispatcher
    dispatcher.send(TASK_START_JOB, job_id)
    dispatcher.drain()
    return ctx


def cancel_once_running(monkeypatch: pytest.MonkeyPatch, task_module: Any) -> None:
    """Make a task module's ``mark_running`` also set ``cancel_requested``: a cancel request that arrives
    just after the job started, so the run stops at its next step (``monkeypatch.undo()`` ends it)."""
    original = task_module.mark_running

    def running_then_canceled(s: Any, job: Any) -> None:
        original(s, job)
        job.cancel_requested = True

    monkeypatch.setattr(task_module, "mark_running", running_then_canceled)


def assert_model_job_canceled(client: TestClient, auth: TenantAuth, settings: Settings, job_id: str,
                              kind: str) -> None:
    """A canceled generator-training or pretraining job: the job and its ``kind`` row (``generator`` or
    ``encoder``) canceled, no download, and no checkpoints left behind."""
    job = client.get(f"/v1/jobs/{job_id}", headers=auth.headers).json()
    assert job["status"] == "canceled", job
    row = client.get(f"/v1/{kind}s/{job['result'][f'{kind}_id']}", headers=auth.headers).json()
    assert row["status"] == "canceled"
    assert_problem(client.get(f"/v1/{kind}s/{row['id']}/download", headers=auth.headers), 409, "not-ready")
    assert not (settings.data_dir / "checkpoints" / job_id).exists()


@pytest.fixture(scope="session")
def client(api_settings: Settings) -> Iterator[TestClient]:
    """The API on the real stack, shared by the API tests."""
    with running_client(api_settings) as c:
        yield c


@pytest.fixture(scope="session")
def store(api_settings: Settings) -> ObjectStore:
    """The API's object store (S3 on SeaweedFS)."""
    return build_store(api_settings)


@pytest.fixture
def settings_with(api_settings: Settings) -> Callable[..., Settings]:
    """``settings_with(**overrides)``: the API settings with some values changed (same DB, broker, bucket)."""

    def make(**overrides: Any) -> Settings:
        values = {**api_settings.model_dump(), **overrides}
        values["s3_secret_key"] = api_settings.s3_secret_key.get_secret_value()
        values["signing_secret"] = api_settings.signing_secret.get_secret_value()
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@dataclass
class TenantAuth:
    """A tenant made for a test, with its API key and the headers that carry it."""

    id: str
    name: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def new_tenant(api_settings: Settings, client: TestClient, request: pytest.FixtureRequest) -> Callable[[], TenantAuth]:
    """``new_tenant() -> TenantAuth``: a fresh tenant (unique name) through the service function."""
    counter = iter(range(1000))

    def make() -> TenantAuth:
        name = f"{request.node.name[:120]}-{next(counter)}-{secrets.token_hex(4)}"
        with get_sessionmaker(api_settings.database_url)() as s:
            tenant, key = create_tenant(s, name)
        return TenantAuth(tenant.id, tenant.name, key)

    return make


@pytest.fixture
def tenant(new_tenant: Callable[[], TenantAuth]) -> TenantAuth:
    """One fresh tenant."""
    return new_tenant()


def snapshot(settings: Settings, store: ObjectStore) -> dict[str, Any]:
    """Row count of every table and the sorted list of object keys: equal before and after = no trace."""
    with get_sessionmaker(settings.database_url)() as s:
        counts = {m.__tablename__: s.scalar(select(func.count()).select_from(m)) for m in TABLES}
    return {"rows": counts, "objects": sorted(o.key for o in store.list(""))}


@pytest.fixture
def unchanged(api_settings: Settings, store: ObjectStore) -> Callable[[], Any]:
    """``with unchanged(): ...`` asserts the block leaves every table and the bucket as they were."""

    @contextmanager
    def check() -> Iterator[None]:
        before = snapshot(api_settings, store)
        yield
        assert snapshot(api_settings, store) == before

    return check


def queued_tasks(redis_url: str, queue: str) -> list[tuple[str, list[Any]]]:
    """``(task name, args)`` of the Celery messages waiting in ``queue`` (a Redis list)."""
    client = redis.Redis.from_url(redis_url)
    out = []
    for raw in client.lrange(queue, 0, -1):
        msg = json.loads(raw)
        body = json.loads(base64.b64decode(msg["body"])) if msg.get("properties", {}).get(
            "body_encoding") == "base64" else json.loads(msg["body"])
        out.append((msg["headers"]["task"], list(body[0])))
    client.close()
    return out


def png_bytes(size: tuple[int, int] = (16, 16), mode: str = "L", value: int = 128) -> bytes:
    """A small valid PNG."""
    buf = io.BytesIO()
    Image.new(mode, size, value if mode in ("L", "I;16") else (value, value, value)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(size: tuple[int, int] = (16, 16)) -> bytes:
    """A small valid colour JPEG."""
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 100, 50)).save(buf, "JPEG")
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of ``{name: bytes}`` (names written as given, unsafe ones included)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def image_folder_zip(per_label: dict[str, int], wrap: str | None = None) -> bytes:
    """A zip of an ImageFolder with ``per_label[label]`` PNGs per label (optionally in a wrapping folder)."""
    members = {}
    for label, n in per_label.items():
        for i in range(n):
            name = f"{label}/img{i:03d}.png"
            members[f"{wrap}/{name}" if wrap else name] = png_bytes(value=(i * 37) % 256)
    return zip_bytes(members)


def upload(client: TestClient, auth: TenantAuth, files: list[tuple[str, bytes]], build: bool = True,
           **fields: str) -> Any:
    """POST /v1/datasets with ``files`` as ``file`` parts and ``fields`` as form fields. The API answers with
    the dataset ``pending`` and enqueues its build; with ``build`` (default) the test then does what the
    worker does with that message (``cxrsynth.build_dataset``), so the dataset is ready afterwards. The
    response (status ``pending``) is returned as the API sent it."""
    parts = [("file", (name, data, "application/octet-stream")) for name, data in files]
    resp = client.post("/v1/datasets", files=parts, data=fields, headers=auth.headers)
    if build and resp.status_code == 201:
        build_uploaded(client, resp.json()["id"])
    return resp


def build_uploaded(client: TestClient, dataset_id: str) -> None:
    """What a worker does with the ``cxrsynth.build_dataset`` message of an upload or a registration, in
    this process, with the app's own settings and store."""
    from worker.exports import run_dataset_build

    app: Any = client.app
    run_dataset_build(get_sessionmaker(app.state.settings.database_url), app.state.store, dataset_id)


def assert_problem(resp: Any, status: int, slug: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem with ``status`` (and ``type`` ending in ``slug``)."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["instance"]
    assert body["type"].startswith("https://cxrsynth.dev/problems/")
    if slug is not None:
        assert body["type"].endswith("/" + slug), body
    return body
