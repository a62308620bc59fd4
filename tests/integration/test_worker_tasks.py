"""Worker task code against the real stack (Postgres + S3 on SeaweedFS), run inline.

Covers the generation contract: image i depends only on (seed, i), so shard size, redelivery and the
number of workers do not change a single byte; cancellation; the retry cap on worker loss; webhooks
delivered, signed and retried against a real local HTTP receiver.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import func, select

from app.core.config import Settings
from app.core.queue import TASK_START_JOB
from app.db.orm import Dataset, Generator, Job, JobShard, Tenant, WebhookDelivery
from app.db.session import get_sessionmaker, migrate
from app.services.tenants import create_tenant
from tests.integration.conftest import run_inline
from worker.dispatch import InlineDispatcher
from worker.runtime import WorkerContext
from worker.tasks.jobs import task_registry

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(settings_factory: Any, tmp_path: Path, tiny_generator: Path) -> Iterator[dict[str, Any]]:
    settings: Settings = settings_factory(tmp_path, stack="real", shard_size=3, webhook_backoff_s=0.05)
    migrate(settings.database_url)
    sessions = get_sessionmaker(settings.database_url)
    meta = json.loads((tiny_generator / "cxrsynth.json").read_text())
    with sessions() as s:
        tenant, _ = create_tenant(s, f"hospital-{tmp_path.name}")
        gen = Generator(tenant_id=tenant.id, name="tiny", builtin_path=str(tiny_generator), config=meta)
        s.add(gen)
        s.commit()
        yield {"settings": settings, "sessions": sessions, "tenant": tenant, "generator": gen}


def make_job(stack: dict[str, Any], n: int, seed: int = 11, webhook_url: str | None = None,
             sampler: str = "ddim", steps: int = 4) -> str:
    labels = stack["generator"].config["labels"]
    names = sorted(labels, key=labels.get)
    counts = {name: n // len(names) + (1 if i < n % len(names) else 0) for i, name in enumerate(names)}
    params = {"generator_id": stack["generator"].id, "n": n, "counts": counts, "label_ids": labels,
              "sampler": sampler, "num_inference_steps": steps, "guidance_scale": 1.5, "seed": seed,
              "resolution": stack["generator"].config["resolution"], "name": "synthetic"}
    with stack["sessions"]() as s:
        job = Job(tenant_id=stack["tenant"].id, kind="generation", params=params, webhook_url=webhook_url)
        s.add(job)
        s.commit()
        return job.id


def manifest(ctx: WorkerContext, sessions: Any, job_id: str) -> list[dict[str, str]]:
    with sessions() as s:
        job = s.get(Job, job_id)
        ds = s.get(Dataset, job.result["dataset_id"])
        assert ds.manifest_key
        return list(csv.DictReader(io.StringIO(ctx.store.get_bytes(ds.manifest_key).decode())))


def test_generation_same_bytes_whatever_the_sharding(stack: dict[str, Any]) -> None:
    settings: Settings = stack["settings"]
    a = make_job(stack, n=7)
    ctx = run_inline(settings, a)  # shards of 3: [0,3) [3,6) [6,7)
    b = make_job(stack, n=7)
    run_inline(settings.model_copy(update={"shard_size": 7}), b)  # one shard
    with stack["sessions"]() as s:
        for jid in (a, b):
            job = s.get(Job, jid)
            assert job.status == "succeeded", job.error
            assert job.result["num_images"] == 7
        assert s.scalar(select(func.count()).select_from(JobShard).where(JobShard.job_id == a)) == 3
    rows_a, rows_b = manifest(ctx, stack["sessions"], a), manifest(ctx, stack["sessions"], b)
    assert [(r["index"], r["label"], r["sha256"]) for r in rows_a] == [
        (r["index"], r["label"], r["sha256"]) for r in rows_b]
    assert len({r["sha256"] for r in rows_a}) == 7  # seven different images
    # the zip export holds the same images and the manifest
    import zipfile

    with stack["sessions"]() as s:
        ds = s.get(Dataset, s.get(Job, a).result["dataset_id"])
        assert ds.status == "ready" and ds.num_images == 7 and ds.origin == "synthetic"
        # total_bytes: the images' bytes, as for uploads (it stayed 0 for generated datasets before)
        assert ds.total_bytes == sum(ctx.store.size(f"{ds.prefix}/{r['file']}") for r in rows_a) > 0
        export = [o.key for o in ctx.store.list(ds.prefix.rsplit("/", 1)[0] + "/exports/")]
    assert len(export) == 1
    with zipfile.ZipFile(io.BytesIO(ctx.store.get_bytes(export[0]))) as zf:
        pngs = [n for n in zf.namelist() if n.endswith(".png")]
        assert len(pngs) == 7
        assert any(n.endswith("manifest.csv") for n in zf.namelist())


def test_redelivered_shard_changes_nothing(stack: dict[str, Any]) -> None:
    settings: Settings = stack["settings"]
    job_id = make_job(stack, n=4)
    ctx = run_inline(settings, job_id)
    before = manifest(ctx, stack["sessions"], job_id)
    # A late duplicate delivery of every task (broker redelivery after a lost ack).
    registry = task_registry(ctx)
    registry["cxrsynth.generation_shard"](job_id, 0)
    registry["cxrsynth.finalize_job"](job_id)
    registry[TASK_START_JOB](job_id)
    assert manifest(ctx, stack["sessions"], job_id) == before
    with stack["sessions"]() as s:
        ds = s.get(Dataset, s.get(Job, job_id).result["dataset_id"])
        assert len(list(ctx.store.list(ds.prefix + "/"))) == 4


def test_cancel_stops_between_steps_and_keeps_no_images(stack: dict[str, Any]) -> None:
    settings: Settings = stack["settings"]
    job_id = make_job(stack, n=6)
    ctx = WorkerContext(settings, InlineDispatcher({}))
    dispatcher = InlineDispatcher(task_registry(ctx))
    ctx.dispatcher = dispatcher
    dispatcher.send(TASK_START_JOB, job_id)
    # run the planning task only, then ask for cancellation as the API would
    name, args = dispatcher.pending.popleft()
    dispatcher.registry[name](*args)
    with stack["sessions"]() as s:
        s.get(Job, job_id).cancel_requested = True
        s.commit()
    dispatcher.drain()
    with stack["sessions"]() as s:
        job = s.get(Job, job_id)
        assert job.status == "canceled" and job.finished_at is not None
        ds = s.get(Dataset, job.result["dataset_id"])
        assert ds.status == "canceled"
        assert list(ctx.store.list(ds.prefix + "/")) == []


def test_worker_lost_too_often_fails_the_job(stack: dict[str, Any]) -> None:
    settings: Settings = stack["settings"].model_copy(update={"max_task_attempts": 2})
    job_id = make_job(stack, n=3)
    ctx = WorkerContext(settings, InlineDispatcher({}))
    registry = task_registry(ctx)
    ctx.dispatcher = InlineDispatcher({})  # collect, do not run
    registry[TASK_START_JOB](job_id)
    with stack["sessions"]() as s:  # two deliveries died mid-way (the worker was killed)
        shard = s.get(JobShard, (job_id, 0))
        shard.status, shard.attempts = "running", 2
        s.commit()
    registry["cxrsynth.generation_shard"](job_id, 0)
    with stack["sessions"]() as s:
        job = s.get(Job, job_id)
        assert job.status == "failed"
        assert job.error["title"] == "worker lost"


class _Receiver(BaseHTTPRequestHandler):
    calls: ClassVar[list[dict[str, Any]]] = []
    fail_first = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).calls.append({"headers": dict(self.headers), "body": body})
        failing = len(type(self).calls) <= type(self).fail_first
        self.send_response(500 if failing else 204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[_Receiver]]]:
    handler = type("Receiver", (_Receiver,), {"calls": [], "fail_first": 2})
    server = HTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", handler
    server.shutdown()


def test_webhook_signed_and_retried(stack: dict[str, Any], receiver: tuple[str, type[_Receiver]]) -> None:
    url, handler = receiver
    job_id = make_job(stack, n=2, webhook_url=url)
    run_inline(stack["settings"], job_id)
    assert len(handler.calls) == 3  # two 500s, then delivered
    call = handler.calls[-1]
    h = {k.lower(): v for k, v in call["headers"].items()}
    secret = stack["tenant"].webhook_secret
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + call["body"]
    expected = "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
    assert h["webhook-signature"] == expected
    payload = json.loads(call["body"])
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job_id
    with stack["sessions"]() as s:
        d = s.scalar(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id))
        assert d.status == "delivered" and d.attempts == 3 and d.last_status_code == 204
        assert s.get(Tenant, stack["tenant"].id) is not None


def test_run_job_of_an_unknown_kind_fails_loudly(stack: dict[str, Any]) -> None:
    """A run message for a kind this worker has no runner for (e.g. a newer API's) fails that job; it
    never falls through to another kind's code (it used to run generator training)."""
    from app.core.queue import TASK_RUN_JOB
    from worker.tasks.jobs import SINGLE_TASK_RUNNERS

    assert set(SINGLE_TASK_RUNNERS) == {"generator_training", "pretraining", "evaluation"}
    job_id = make_job(stack, 2)
    with stack["sessions"]() as s:
        job = s.get(Job, job_id)
        job.kind = "segmentation_training"  # no such kind (the column is a plain string)
        s.commit()
    ctx = WorkerContext(stack["settings"], InlineDispatcher({}))
    ctx.dispatcher = dispatcher = InlineDispatcher(task_registry(ctx))
    dispatcher.send(TASK_RUN_JOB, job_id)
    dispatcher.drain()
    with stack["sessions"]() as s:
        job = s.get(Job, job_id)
        assert job.status == "failed" and "segmentation_training" in json.dumps(job.error)
        owned = select(func.count()).select_from(Generator).where(Generator.tenant_id == stack["tenant"].id)
        assert s.scalar(owned) == 1  # nothing was trained
