"""Training jobs that ask for ``gpus: 2`` on the real stack (Postgres, SeaweedFS; the worker's task code runs
inline) with a worker whose multi-GPU devices are ``cpu:2``: two gloo ranks under torchrun. The job succeeds
and says so; a rank killed mid-run makes the job resume from its checkpoint on the next delivery; a worker
without the devices fails the job clearly; requests the ranks cannot share are 422 and change nothing."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from tests.integration.conftest import TenantAuth, assert_problem, run_inline, upload, zip_bytes

pytestmark = pytest.mark.integration


def _dataset(client: TestClient, auth: TenantAuth, n: int = 16) -> str:
    rng = np.random.default_rng(1)
    members = {}
    for i in range(n):
        buf = io.BytesIO()
        low = rng.integers(0, 255, (8, 8), dtype=np.uint8)
        Image.fromarray(low).resize((40, 40), Image.Resampling.BILINEAR).save(buf, format="PNG")
        members[f"{'normal' if i % 2 else 'pneumonia'}/im{i:02d}.png"] = buf.getvalue()
    resp = upload(client, auth, [("ranks.zip", zip_bytes(members))], name="ranks")
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _events(client: TestClient, auth: TenantAuth, job_id: str) -> list[str]:
    resp = client.get(f"/v1/jobs/{job_id}/events?format=json", headers=auth.headers)
    assert resp.status_code == 200, resp.text
    return [e["message"] for e in resp.json()]


def _kill_rank_1_once(data_dir: Path, stop: threading.Event, killed: list[int]) -> None:
    """Watch for rank 1 of a torchrun run under ``data_dir``; SIGKILL it once rank 0 reported step 2."""
    while not stop.is_set() and not killed:
        for progress in data_dir.glob("checkpoints/*/torchrun/progress.json"):
            try:
                step = json.loads(progress.read_text())["step"]
            except (OSError, ValueError, KeyError):
                continue
            if step < 2:
                continue
            for proc in Path("/proc").iterdir():
                try:
                    cmd = (proc / "cmdline").read_bytes()
                    env = (proc / "environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"models.launch" in cmd and str(progress.parent).encode() in cmd and b"RANK=1" in env:
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed.append(int(proc.name))
                    return
        time.sleep(0.05)


def test_pretraining_on_two_ranks_survives_a_killed_rank(client: TestClient, api_settings: Settings,
                                                         tenant: TenantAuth) -> None:
    settings = api_settings.model_copy(update={"worker_gpus": "cpu:2"})
    ds = _dataset(client, tenant)
    resp = client.post("/v1/pretrainings", json={"dataset_ids": [ds], "name": "enc-ddp", "resolution": 32,
                                                 "steps": 40, "batch_size": 4, "seed": 3, "gpus": 2},
                       headers=tenant.headers)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    assert resp.json()["params"]["gpus"] == 2
    stop, killed = threading.Event(), list[int]()
    watcher = threading.Thread(target=_kill_rank_1_once, args=(settings.data_dir, stop, killed), daemon=True)
    watcher.start()
    try:
        run_inline(settings, job_id)
    finally:
        stop.set()
        watcher.join()
    job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["steps"] == 40
    messages = _events(client, tenant, job_id)
    assert any("training on 2 ranks" in m for m in messages)
    # steps=40 checkpoints only at the end (every 100 steps), so the second delivery starts again
    assert killed and any("torchrun exit" in m and "running it again from the start" in m for m in messages)
    enc = client.get(f"/v1/encoders/{job['result']['encoder_id']}", headers=tenant.headers).json()
    assert enc["status"] == "ready" and enc["config"]["pretraining"]["steps"] == 40


def test_a_worker_without_the_devices_fails_the_job_clearly(client: TestClient, api_settings: Settings,
                                                             tenant: TenantAuth) -> None:
    ds = _dataset(client, tenant, n=4)
    resp = client.post("/v1/pretrainings", json={"dataset_ids": [ds], "name": "enc", "resolution": 32, "steps": 2,
                                                 "batch_size": 4, "gpus": 4}, headers=tenant.headers)
    run_inline(api_settings.model_copy(update={"worker_gpus": "cpu:2"}), resp.json()["id"])
    job: dict[str, Any] = client.get(f"/v1/jobs/{resp.json()['id']}", headers=tenant.headers).json()
    assert job["status"] == "failed" and job["error"]["title"] == "not enough GPUs on this worker"
    assert "asks for 4 GPUs" in job["error"]["detail"] and "cxrsynth worker --gpus" in job["error"]["detail"]


def test_ranks_that_cannot_share_the_batch_are_422(client: TestClient, tenant: TenantAuth, unchanged: Any) -> None:
    ds = _dataset(client, tenant, n=4)
    with unchanged():
        for body in ({"batch_size": 6, "gpus": 4}, {"gpus": 0}, {"gpus": 65}):
            resp = client.post("/v1/pretrainings", json={"dataset_ids": [ds], "name": "x", **body},
                               headers=tenant.headers)
            assert_problem(resp, 422)
        resp = client.post("/v1/generators", json={"dataset_id": ds, "name": "g", "batch_size": 6,
                                                            "gpus": 4}, headers=tenant.headers)
        assert_problem(resp, 422)
        assert "multiple of gpus" in resp.text
