"""Jobs over HTTP on the real stack: creation (202, params, Redis message), validation, idempotency,
the in-flight limit, cancel, cursor paging and the event stream."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.core.config import Settings
from app.core.queue import CPU_QUEUE, TASK_DELIVER_WEBHOOK, TASK_START_JOB
from app.db.orm import Dataset, Job, JobEvent, utcnow
from app.db.session import get_sessionmaker
from app.schemas.jobs import GenerationParams, GeneratorTrainingParams
from tests.integration.conftest import TenantAuth, assert_problem, queued_tasks, running_client

pytestmark = pytest.mark.integration


def _generate(client: TestClient, auth: TenantAuth, body: dict[str, Any] | None = None, **headers: str) -> Any:
    return client.post("/v1/generations", json=body if body is not None else {"n": 4},
                       headers={**auth.headers, **headers})


def _set_job(settings: Settings, job_id: str, **values: Any) -> None:
    with get_sessionmaker(settings.database_url)() as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))
        s.commit()


def test_generation_is_accepted_recorded_and_enqueued(client: TestClient, tenant: TenantAuth,
                                                      api_settings: Settings, api_redis_url: str) -> None:
    resp = _generate(client, tenant, {"counts": {"PNEUMONIA": 3, "normal": 2}, "sampler": "ddim",
                                      "num_inference_steps": 7, "guidance_scale": 1.5, "name": "synthetic-a"})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["kind"] == "generation" and job["status"] == "queued" and job["result"] is None
    assert job["progress"] == {"fraction": 0.0, "message": "", "step": 0, "total": 0}
    params = GenerationParams.model_validate(job["params"])
    assert params.counts == {"normal": 2, "pneumonia": 3}  # canonical names, generator label order
    assert list(params.counts) == ["normal", "pneumonia"]
    assert params.label_ids == {"normal": 0, "pneumonia": 1} and params.n == 5
    assert (params.sampler, params.num_inference_steps, params.guidance_scale) == ("ddim", 7, 1.5)
    assert 0 <= params.seed < 2**32 and params.name == "synthetic-a" and params.resolution == 32
    # The message really is in Redis, on the cpu queue, for the committed job.
    assert (TASK_START_JOB, [job["id"]]) in queued_tasks(api_redis_url, CPU_QUEUE)
    got = client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers)
    assert got.status_code == 200 and got.json() == job


def test_generation_defaults(client: TestClient, tenant: TenantAuth) -> None:
    one = _generate(client, tenant, {"n": 5}).json()["params"]
    assert one["counts"] == {"normal": 3, "pneumonia": 2}  # n alone: split evenly over the labels
    assert one["sampler"] == "dpmsolver++" and one["num_inference_steps"] == 20 and one["guidance_scale"] == 2.0
    two = _generate(client, tenant, {"n": 5}).json()["params"]
    assert one["seed"] != two["seed"]  # random by default, recorded
    labelled = _generate(client, tenant, {"n": 3, "label": "Pneumonia", "seed": 7}).json()["params"]
    assert labelled["counts"] == {"pneumonia": 3} and labelled["seed"] == 7


@pytest.mark.parametrize(("body", "slug"), [
    ({"n": 0}, "validation-error"),
    ({"n": -3}, "validation-error"),
    ({"n": 101}, "too-many-images"),
    ({"counts": {"normal": 60, "pneumonia": 41}}, "too-many-images"),
    ({"n": "four"}, "validation-error"),
    ({"n": 2.5}, "validation-error"),
    ({"n": [1]}, "validation-error"),
    ({}, "validation-error"),
    ({"n": 2, "label": "covid"}, "unknown-label"),
    ({"counts": {"covid": 2}}, "unknown-label"),
    ({"counts": {"normal": 0}}, "validation-error"),
    ({"counts": {"normal": 1}, "n": 1}, "validation-error"),
    ({"n": 2, "sampler": "euler"}, "validation-error"),
    ({"n": 2, "num_inference_steps": 0}, "validation-error"),
    ({"n": 2, "num_inference_steps": 5000}, "validation-error"),
    ({"n": 2, "guidance_scale": -1}, "validation-error"),
    ({"n": 2, "guidance_scale": 1000}, "validation-error"),
    ({"n": 2, "seed": -1}, "validation-error"),
    ({"n": 2, "webhook_url": "ftp://example.org/hook"}, "validation-error"),
    ({"n": 2, "webhook_url": "not a url"}, "validation-error"),
    ({"n": 2, "surprise": True}, "validation-error"),
])
def test_bad_generation_requests_change_nothing(client: TestClient, tenant: TenantAuth, unchanged: Any,
                                                body: dict[str, Any], slug: str) -> None:
    with unchanged():
        problem = assert_problem(_generate(client, tenant, body), 422, slug)
    if slug == "validation-error":
        assert problem["errors"] and all({"loc", "msg", "type"} <= set(e) for e in problem["errors"])


def test_malformed_json_and_unknown_generator(client: TestClient, tenant: TenantAuth, unchanged: Any) -> None:
    with unchanged():
        resp = client.post("/v1/generations", content=b"{not json", headers={**tenant.headers,
                                                                             "content-type": "application/json"})
        assert_problem(resp, 422, "validation-error")
        assert_problem(_generate(client, tenant, {"n": 2, "generator_id": "0" * 32}), 404, "not-found")
        assert_problem(client.get("/v1/jobs/" + "f" * 32, headers=tenant.headers), 404, "not-found")
        assert_problem(client.post("/v1/jobs/nope/cancel", headers=tenant.headers), 404, "not-found")


def test_webhook_url_is_stored(client: TestClient, tenant: TenantAuth) -> None:
    job = _generate(client, tenant, {"n": 1, "webhook_url": "https://hooks.example.org/cxr?x=1"}).json()
    assert job["webhook_url"] == "https://hooks.example.org/cxr?x=1"


def test_idempotency_key(client: TestClient, tenant: TenantAuth, new_tenant: Callable[[], TenantAuth],
                         api_redis_url: str, unchanged: Any) -> None:
    first = _generate(client, tenant, {"n": 3, "label": "normal"}, **{"Idempotency-Key": "order-17"})
    assert first.status_code == 202
    again = _generate(client, tenant, {"label": "normal", "n": 3}, **{"Idempotency-Key": "order-17"})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()  # same job, same recorded seed
    starts = [a for t, a in queued_tasks(api_redis_url, CPU_QUEUE) if t == TASK_START_JOB]
    assert starts.count([first.json()["id"]]) == 1  # enqueued once
    with unchanged():
        other = _generate(client, tenant, {"n": 4, "label": "normal"}, **{"Idempotency-Key": "order-17"})
        problem = assert_problem(other, 409, "idempotency-key-reused")
        assert problem["job_id"] == first.json()["id"]
    # Keys are per tenant: another tenant's identical key makes its own job.
    stranger = new_tenant()
    theirs = _generate(client, stranger, {"n": 3, "label": "normal"}, **{"Idempotency-Key": "order-17"})
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]
    with unchanged():
        bad_key = _generate(client, tenant, {"n": 1}, **{"Idempotency-Key": "x" * 201})
        assert_problem(bad_key, 422, "validation-error")


def test_jobs_in_flight_limit_answers_429(settings_with: Callable[..., Settings], tenant: TenantAuth,
                                          api_settings: Settings, store: Any) -> None:
    from tests.integration.conftest import snapshot

    with running_client(settings_with(max_jobs_in_flight_per_tenant=2)) as c:
        ids = [_generate(c, tenant, {"n": 1}, **{"Idempotency-Key": "first"}).json()["id"],
               _generate(c, tenant, {"n": 1}).json()["id"]]
        before = snapshot(api_settings, store)
        resp = _generate(c, tenant, {"n": 1})
        assert_problem(resp, 429, "too-many-jobs")
        assert int(resp.headers["retry-after"]) > 0
        # A replayed request is not a new job: never 429.
        replay = _generate(c, tenant, {"n": 1}, **{"Idempotency-Key": "first"})
        assert replay.status_code == 200 and replay.json()["id"] == ids[0]
        assert snapshot(api_settings, store) == before
        # Once a job finishes there is room again.
        _set_job(api_settings, ids[0], status="succeeded", finished_at=utcnow())
        assert _generate(c, tenant, {"n": 1}).status_code == 202


def test_cancel(client: TestClient, tenant: TenantAuth, api_settings: Settings, api_redis_url: str,
                unchanged: Any) -> None:
    queued = _generate(client, tenant, {"n": 2, "webhook_url": "http://127.0.0.1:9/hook"}).json()
    resp = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=tenant.headers)
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "canceled" and body["finished_at"] is not None and body["cancel_requested"]
    # The worker never finishes a job canceled while queued, so the API asks for its webhook.
    assert (TASK_DELIVER_WEBHOOK, [queued["id"]]) in queued_tasks(api_redis_url, CPU_QUEUE)
    with unchanged():
        assert_problem(client.post(f"/v1/jobs/{queued['id']}/cancel", headers=tenant.headers), 409, "job-finished")

    running = _generate(client, tenant, {"n": 2}).json()
    _set_job(api_settings, running["id"], status="running", started_at=utcnow())
    resp = client.post(f"/v1/jobs/{running['id']}/cancel", headers=tenant.headers)
    assert resp.status_code == 200
    assert resp.json()["status"] == "running" and resp.json()["cancel_requested"] is True

    for terminal in ("succeeded", "failed"):
        job = _generate(client, tenant, {"n": 1}).json()
        _set_job(api_settings, job["id"], status=terminal, finished_at=utcnow())
        with unchanged():
            problem = assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers), 409)
            assert problem["job_status"] == terminal


def test_cursor_paging_newest_first_without_gaps(client: TestClient, tenant: TenantAuth,
                                                 api_settings: Settings) -> None:
    made = [_generate(client, tenant, {"n": 1}).json()["id"] for _ in range(7)]
    # Equal timestamps must still page stably: give three jobs the very same created_at.
    same = utcnow() + timedelta(seconds=5)
    for job_id in made[2:5]:
        _set_job(api_settings, job_id, created_at=same)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, "kind": "generation"}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/jobs", params=params, headers=tenant.headers)
        assert page.status_code == 200
        # A job created between pages (older cursor position unaffected) must not cause duplicates.
        if len(seen) == 2:
            made.append(_generate(client, tenant, {"n": 1}).json()["id"])
        seen += [j["id"] for j in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 7  # no duplicates, no gaps (the late job is newer than the cursor)
    assert set(seen) == set(made[:7])
    with get_sessionmaker(api_settings.database_url)() as s:
        created = {j: s.get(Job, j).created_at for j in seen}  # type: ignore[union-attr]
    ordered = sorted(seen, key=lambda j: (created[j], j), reverse=True)
    assert seen == ordered
    # Filters and bad paging parameters.
    assert client.get("/v1/jobs", params={"status": "succeeded"}, headers=tenant.headers).json()["items"] == []
    assert_problem(client.get("/v1/jobs", params={"cursor": "garbage!"}, headers=tenant.headers), 422,
                   "invalid-cursor")
    assert_problem(client.get("/v1/jobs", params={"limit": 0}, headers=tenant.headers), 422)
    assert_problem(client.get("/v1/jobs", params={"limit": 21}, headers=tenant.headers), 422, "invalid-limit")
    assert_problem(client.get("/v1/jobs", params={"status": "sleeping"}, headers=tenant.headers), 422)


def _add_event(settings: Settings, job_id: str, message: str) -> None:
    with get_sessionmaker(settings.database_url)() as s:
        s.add(JobEvent(job_id=job_id, message=message, step=1, total=2))
        s.commit()


def _sse_events(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = fields.get(name, "") + value
        if "event" in fields:
            events.append(fields)
    return events


def test_events_stream_until_terminal(client: TestClient, tenant: TenantAuth, api_settings: Settings) -> None:
    job = _generate(client, tenant, {"n": 2}).json()
    _set_job(api_settings, job["id"], status="running", started_at=utcnow())

    def worker() -> None:  # a worker writing progress, then finishing, while the client listens
        time.sleep(0.6)
        _add_event(api_settings, job["id"], "step 1 of 2")
        time.sleep(0.6)
        _add_event(api_settings, job["id"], "done")
        _set_job(api_settings, job["id"], status="succeeded", finished_at=utcnow(), progress_step=2,
                 progress_total=2, result={"dataset_id": "x", "num_images": 2})

    thread = threading.Thread(target=worker)
    thread.start()
    t0 = time.monotonic()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=tenant.headers) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        text = "".join(resp.iter_text())
    thread.join()
    assert time.monotonic() - t0 < 10
    events = _sse_events(text)
    progress = [e for e in events if e["event"] == "progress"]
    assert [json.loads(e["data"])["message"] for e in progress] == ["generation job queued", "step 1 of 2", "done"]
    assert [int(e["id"]) for e in progress] == sorted(int(e["id"]) for e in progress)
    end = events[-1]
    assert end["event"] == "end" and json.loads(end["data"])["status"] == "succeeded"
    assert json.loads(end["data"])["progress"]["fraction"] == 1.0

    # Resume after the first event: Last-Event-ID skips what was seen; ?format=json lists plainly.
    first_id = progress[0]["id"]
    resumed = client.get(f"/v1/jobs/{job['id']}/events", headers={**tenant.headers, "Last-Event-ID": first_id})
    assert [json.loads(e["data"])["message"] for e in _sse_events(resumed.text) if e["event"] == "progress"] == \
        ["step 1 of 2", "done"]
    listed = client.get(f"/v1/jobs/{job['id']}/events", params={"format": "json", "after": first_id},
                        headers=tenant.headers)
    assert listed.status_code == 200 and [e["message"] for e in listed.json()] == ["step 1 of 2", "done"]
    assert_problem(client.get(f"/v1/jobs/{job['id']}/events", params={"format": "xml"}, headers=tenant.headers), 422)


def test_generator_training_job(client: TestClient, tenant: TenantAuth, api_settings: Settings,
                                api_redis_url: str, unchanged: Any) -> None:
    from tests.integration.conftest import image_folder_zip, upload

    ds = upload(client, tenant, [("set.zip", image_folder_zip({"NORMAL": 2, "PNEUMONIA": 2}))]).json()
    resp = client.post("/v1/generators", json={"dataset_id": ds["id"], "name": "my-gen", "resolution": 32,
                                               "steps": 50, "seed": 3}, headers=tenant.headers)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    params = GeneratorTrainingParams.model_validate(job["params"])
    assert job["kind"] == "generator_training"
    assert params.labels == {"normal": 0, "pneumonia": 1} and params.steps == 50 and params.seed == 3
    assert params.dataset_prefix == ds["prefix"] and params.manifest_key == ds["manifest_key"]
    assert (TASK_START_JOB, [job["id"]]) in queued_tasks(api_redis_url, CPU_QUEUE)
    with unchanged():
        for body, status in [({"dataset_id": ds["id"], "name": "g", "resolution": 48}, 422),
                             ({"dataset_id": ds["id"], "name": "g", "steps": 0}, 422),
                             ({"dataset_id": ds["id"]}, 422),
                             ({"dataset_id": "0" * 32, "name": "g"}, 404)]:
            assert_problem(client.post("/v1/generators", json=body, headers=tenant.headers), status)
        # A dataset still being made cannot be trained on.
        with get_sessionmaker(api_settings.database_url)() as s:
            s.execute(update(Dataset).where(Dataset.id == ds["id"]).values(status="pending"))
            s.commit()
        assert_problem(client.post("/v1/generators", json={"dataset_id": ds["id"], "name": "g"},
                                   headers=tenant.headers), 409, "not-ready")
        with get_sessionmaker(api_settings.database_url)() as s:
            s.execute(update(Dataset).where(Dataset.id == ds["id"]).values(status="ready"))
            s.commit()


def test_broker_down_leaves_no_job(settings_with: Callable[..., Settings], tenant: TenantAuth,
                                   unchanged: Any) -> None:
    settings = settings_with(broker_url="redis://127.0.0.1:1/0")
    with running_client(settings) as c, unchanged():
        resp = _generate(c, tenant, {"n": 1})
        assert_problem(resp, 503, "queue-unavailable")


def test_in_flight_limit_holds_under_concurrency(settings_with: Callable[..., Settings], tenant: TenantAuth) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from app.core.problems import TooManyJobs
    from app.schemas.jobs import GenerationRequest
    from app.services.generations import create_generation

    settings = settings_with(max_jobs_in_flight_per_tenant=3)
    sessions = get_sessionmaker(settings.database_url)
    barrier = threading.Barrier(8)

    def submit(_: int) -> str:
        with sessions() as s:
            barrier.wait()
            try:
                create_generation(s, settings, tenant.id, GenerationRequest.model_validate({"n": 1}), enqueue=False)
                return "created"
            except TooManyJobs:
                return "429"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(submit, range(8)))
    assert sorted(outcomes) == ["429"] * 5 + ["created"] * 3
