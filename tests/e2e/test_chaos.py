"""Chaos tests (issue 13, "Chaos, at-least-once, nothing lost"): a generation job submitted through the
HTTP API to a real uvicorn process and run by a real Celery worker process survives a broker restart, a
database restart, an S3 outage and a ``kill -9`` of its worker in finalize.

Each test ends with the same checks (:func:`assert_exactly_the_baseline`): the job succeeded with exactly N
images; the tenant's objects in S3 are exactly those the dataset row and its manifest name (no duplicate
dataset, no orphan or half-written object); and every image has the bytes of an undisturbed run with the
same seed (one baseline job per module).

The faults hit dedicated Redis, Postgres and SeaweedFS processes started for this module
(``tests/e2e/chaos_support.py``), never the machine's shared services. Redis runs with its append-only
file on, as in ``docker-compose.yml``: a broker restart keeps the queued and unacknowledged messages.
What the worker does about each fault (bounded connect, request and publish retries, re-running an
idempotent step a lost connection broke) is in ``worker/runtime.py`` and ``worker/dispatch.py``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import secrets
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.client import CxrsynthClient
from app.core.config import Settings
from app.db.orm import Dataset, Job
from app.db.session import get_sessionmaker
from app.storage.s3 import S3Store
from tests.e2e.chaos_support import PostgresProcess, RedisProcess, RestartableSeaweed
from tests.e2e.conftest import Proc, Services, wait_for
from tests.support import s3_settings_for, service_unavailable, weed_binary

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]

N_IMAGES = 6
SHARD_SIZE = 2  # three shards: a fault that lands in the first one leaves work after it
STEPS = 20
SEED = 1313
# The issue asks for 30 s (the restart adds ~6 s more): far past minio's own ~6 s of retries, so only the
# worker's bounded storage retry budget (worker.runtime.SERVICE_OUTAGE_S) carries a shard across it.
S3_OUTAGE_S = 30.0
# How soon a message whose worker died is delivered again (production: above the longest job).
VISIBILITY_TIMEOUT_S = 8
# Redis and Postgres stay down this long in a restart: a real restart takes seconds (the append-only file
# is loaded, the database checkpoints and recovers), and a window wider than one progress write (1 s)
# makes sure the worker touches the stopped service.
RESTART_DOWN_S = 5.0
JOB_TIMEOUT_S = 150.0
FINALIZE_PAUSE_LOG = "CXRSYNTH_TEST_PAUSE_IN=finalize: pausing"


@dataclass
class ChaosStack:
    """The module's dedicated services, the settings every process gets, the API and the current worker."""

    redis: RedisProcess
    postgres: PostgresProcess
    weed: RestartableSeaweed
    settings: Settings
    svc: Services
    base: str
    worker: Proc

    def new_worker(self, name: str, **extra: Any) -> Proc:
        """Stop the current worker (if alive) and start ``name``; it becomes the module's worker."""
        self.worker.stop()
        self.worker = self.svc.worker(name, **extra)
        return self.worker

    def tenant(self, name: str) -> str:
        """A new tenant's API key (through the CLI, as an operator would)."""
        res = self.svc.cli("tenants", "create", name)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().splitlines()[-1]

    def store(self) -> S3Store:
        return S3Store.from_settings(self.settings)


@pytest.fixture(scope="module")
def chaos(tiny_generator: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosStack]:
    """Dedicated Redis, Postgres and SeaweedFS, one API process and one worker process, for the module;
    everything started is stopped at the end (also when a later start fails)."""
    binary = weed_binary()
    if not RedisProcess.available() or not PostgresProcess.available() or binary is None:
        service_unavailable("chaos tests need redis-server, Postgres' initdb/pg_ctl and SeaweedFS `weed`")
    tmp = tmp_path_factory.mktemp("chaos")
    with ExitStack() as started:
        redis = RedisProcess(tmp / "redis")
        started.callback(redis.stop)
        redis.start()
        postgres = PostgresProcess()
        started.callback(postgres.destroy)
        postgres.init()
        postgres.start()
        weed = RestartableSeaweed(binary, tmp / "seaweed", "cxrsynth-chaos", secrets.token_hex(16))
        started.callback(weed.stop)
        weed.start()
        settings = s3_settings_for(
            weed.server, tmp / "cxrsynth", database_url=postgres.create_database("cxrsynth_chaos"),
            broker_url=redis.url, default_generator_dir=tiny_generator, shard_size=SHARD_SIZE,
            visibility_timeout_s=VISIBILITY_TIMEOUT_S)
        (tmp / "logs").mkdir()
        svc = Services(settings, tmp / "logs")
        started.callback(svc.stop)
        base = svc.api()
        yield ChaosStack(redis, postgres, weed, settings, svc, base, svc.worker("w1"))


def submit(chaos: ChaosStack, tenant: str) -> tuple[CxrsynthClient, str]:
    """A client of a new tenant and the id of its generation job (the module's fixed request)."""
    if not chaos.worker.alive():  # an earlier test broke it: that test fails, this one gets a fresh worker
        chaos.new_worker(f"w{len(chaos.svc.procs)}")
    client = CxrsynthClient(chaos.base, chaos.tenant(tenant))
    job = client.create_generation(n=N_IMAGES, sampler="ddim", num_inference_steps=STEPS, seed=SEED)
    return client, job.id


def wait_running(client: CxrsynthClient, job_id: str, chaos: ChaosStack) -> None:
    """Until a shard of the job is being generated."""
    wait_for(lambda: client.get_job(job_id).status.value == "running", 120, "the job to start", chaos.svc, every=0.2)


def finish(client: CxrsynthClient, chaos: ChaosStack, job_id: str) -> Any:
    """The job once it ended; asserts it succeeded."""
    done = client.wait(job_id, poll_s=0.5, timeout_s=JOB_TIMEOUT_S)
    assert done.status.value == "succeeded", (done.error, chaos.svc.logs_tail())
    return done


def _manifest(store: S3Store, key: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(store.get_bytes(key).decode())))


def stored_dataset(chaos: ChaosStack, job_id: str) -> dict[str, str]:
    """Checks the objects a finished job left in S3 and returns ``{file: sha256}`` of its images.

    Exactly one dataset for the job; under the tenant's prefix exactly: the N images the manifest names
    (each with the SHA-256 the manifest says), their N privacy-gate records (when the gate ran), the privacy
    report (JSON + PNG), the manifest, the card and the zip export (holding the same N images).
    """
    with get_sessionmaker(chaos.settings.database_url)() as s:
        job = s.get(Job, job_id)
        assert job is not None
        datasets = list(s.scalars(select(Dataset).where(Dataset.tenant_id == job.tenant_id)))
    assert len(datasets) == 1, [d.id for d in datasets]
    ds = datasets[0]
    assert ds.status == "ready" and ds.num_images == N_IMAGES and ds.source_job_id == job_id
    store = chaos.store()
    objects = {o.key for o in store.list(f"tenants/{job.tenant_id}/")}
    rows = _manifest(store, ds.manifest_key or "")
    assert sorted(int(r["index"]) for r in rows) == list(range(N_IMAGES))
    images = {f"{ds.prefix}/{r['file']}": r["sha256"] for r in rows}
    root = ds.prefix.rsplit("/", 1)[0]
    expected = {*images, f"{root}/manifest.csv", f"{root}/card.json", f"{root}/exports/{ds.id}.zip"}
    if ds.gate_status != "not_run":
        expected |= {f"{root}/privacy/records/{i:07d}.json" for i in range(N_IMAGES)}
        expected |= {f"{root}/privacy/report.json", f"{root}/privacy/report.png"}
    assert objects == expected, {"orphans": sorted(objects - expected), "missing": sorted(expected - objects)}
    for key, sha in images.items():
        assert hashlib.sha256(store.get_bytes(key)).hexdigest() == sha, key
    with zipfile.ZipFile(io.BytesIO(store.get_bytes(f"{root}/exports/{ds.id}.zip"))) as zf:
        zipped = {hashlib.sha256(zf.read(n)).hexdigest() for n in zf.namelist() if n.endswith(".png")}
    assert zipped == set(images.values())
    return {r["file"]: r["sha256"] for r in rows}


def assert_exactly_the_baseline(chaos: ChaosStack, client: CxrsynthClient, job_id: str,
                                baseline: dict[str, str]) -> None:
    """The job succeeded with N images, nothing duplicated or orphaned, the baseline's bytes."""
    done = finish(client, chaos, job_id)
    assert done.result is not None and done.result["num_images"] == N_IMAGES
    assert stored_dataset(chaos, job_id) == baseline


@pytest.fixture(scope="module")
def baseline(chaos: ChaosStack) -> dict[str, str]:
    """``{file: sha256}`` of an undisturbed run of the module's request (same seed as every test)."""
    client, job_id = submit(chaos, "chaos-baseline")
    with client:
        finish(client, chaos, job_id)
        files = stored_dataset(chaos, job_id)
    assert len(files) == N_IMAGES
    return files


@pytest.mark.parametrize("service", ["redis", "postgres"])
def test_service_restart_mid_job(chaos: ChaosStack, baseline: dict[str, str], service: str) -> None:
    """Redis (the broker; its append-only file keeps queued and unacknowledged messages) or Postgres (fast
    shutdown: every open connection is ended) restarts while a shard runs: the worker reconnects (and the
    API's pool, through pre-ping), no message is lost, and the job ends as if nothing happened."""
    client, job_id = submit(chaos, f"chaos-{service}")
    with client:
        wait_running(client, job_id, chaos)
        getattr(chaos, service).restart(RESTART_DOWN_S)
        assert client.get_job(job_id).status.value == "running"
        assert_exactly_the_baseline(chaos, client, job_id, baseline)


def test_s3_outage_mid_job(chaos: ChaosStack, baseline: dict[str, str]) -> None:
    """SeaweedFS (S3) stops for ``S3_OUTAGE_S`` while a shard runs, then comes back with its data: the
    shard waits for storage (bounded retries) instead of failing the job, and nothing is half-written."""
    client, job_id = submit(chaos, "chaos-s3")
    with client:
        wait_running(client, job_id, chaos)
        chaos.weed.stop()
        try:
            time.sleep(S3_OUTAGE_S)
            assert client.get_job(job_id).status.value == "running"
        finally:
            chaos.weed.start()
        assert_exactly_the_baseline(chaos, client, job_id, baseline)


def test_worker_killed_in_finalize(chaos: ChaosStack, baseline: dict[str, str]) -> None:
    """``kill -9`` of the worker inside finalize, after it wrote the manifest and card but before the job
    succeeded (held there by the worker's ``CXRSYNTH_TEST_PAUSE_IN=finalize`` hook). The unacknowledged
    finalize message goes to the next worker, whose finalize rewrites the same keys: same dataset, no
    orphan, same bytes."""
    victim = chaos.new_worker("victim", test_pause_in="finalize")
    client, job_id = submit(chaos, "chaos-kill")
    with client:
        wait_for(lambda: FINALIZE_PAUSE_LOG in victim.tail(20000), JOB_TIMEOUT_S, "finalize to start", chaos.svc,
                 every=0.2)
        victim.kill9()
        assert client.get_job(job_id).status.value == "running"
        with get_sessionmaker(chaos.settings.database_url)() as s:
            ds = s.scalar(select(Dataset).where(Dataset.source_job_id == job_id))
        assert ds is not None and ds.status == "pending"  # killed half-way: manifest stored, dataset not ready
        assert chaos.store().exists(f"{ds.prefix.rsplit('/', 1)[0]}/manifest.csv")
        # The finalize message was delivered before the pause: once the visibility timeout has passed, the
        # next worker's first sweep of unacknowledged messages gives it back (later sweeps are ~100 s apart).
        time.sleep(VISIBILITY_TIMEOUT_S)
        chaos.new_worker("rescuer")
        assert_exactly_the_baseline(chaos, client, job_id, baseline)
