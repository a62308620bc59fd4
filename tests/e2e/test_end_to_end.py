"""End to end with real processes: API (uvicorn) + Celery workers + Postgres + Redis + SeaweedFS, and
the embedded mode (``cxrsynth serve`` / ``cxrsynth generate`` with SQLite, a local folder and the
filesystem broker)."""

from __future__ import annotations

import csv
import io
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.client import ApiError, CxrsynthClient
from tests.e2e.conftest import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def create_tenant(svc: Any, name: str) -> str:
    res = svc.cli("tenants", "create", name)
    assert res.returncode == 0, res.stderr
    key = res.stdout.strip().splitlines()[-1]
    assert key.startswith("cxr_")
    return key


def check_zip(path: Path, n: int, size: int) -> list[dict[str, str]]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pngs = [x for x in names if x.endswith(".png")]
        assert len(pngs) == n, names
        for name in pngs:
            with Image.open(io.BytesIO(zf.read(name))) as im:
                assert im.mode == "L" and im.size == (size, size)
        manifest_name = next(x for x in names if x.endswith("manifest.csv"))
        rows = list(csv.DictReader(io.StringIO(zf.read(manifest_name).decode())))
    assert len(rows) == n
    assert sorted(int(r["index"]) for r in rows) == list(range(n))
    return rows


def test_real_stack_generation_download_and_isolation(settings_factory: Any, services_factory: Any,
                                                      tiny_generator: Path, tmp_path: Path) -> None:
    settings = settings_factory(tmp_path, stack="real", default_generator_dir=tiny_generator, shard_size=4)
    svc = services_factory(settings)
    base = svc.api()
    svc.worker("w1")
    svc.worker("w2")  # two workers share the shards
    key_a, key_b = create_tenant(svc, "hospital-a"), create_tenant(svc, "hospital-b")
    with CxrsynthClient(base, key_a) as a, CxrsynthClient(base, key_b) as b:
        job = a.create_generation(n=10, sampler="ddim", num_inference_steps=5, seed=42, idempotency_key="k1")
        assert job.status.value == "queued"
        again = a.create_generation(n=10, sampler="ddim", num_inference_steps=5, seed=42, idempotency_key="k1")
        assert again.id == job.id
        with pytest.raises(ApiError) as err:
            b.get_job(job.id)
        assert err.value.status == 404
        done = a.wait(job.id, poll_s=0.5, timeout_s=300)
        assert done.status.value == "succeeded", (done.error, svc.logs_tail())
        assert done.progress.fraction == 1.0 and done.result is not None
        dataset_id = done.result["dataset_id"]
        with pytest.raises(ApiError) as err:
            b.dataset_download_link(dataset_id)
        assert err.value.status == 404
        link = a.dataset_download_link(dataset_id)
        assert "127.0.0.1" in link.url
        out = a.download_dataset(dataset_id, tmp_path / "synthetic.zip")
        rows = check_zip(out, 10, 32)
        assert {r["label"] for r in rows} == {"normal", "pneumonia"}
        events = httpx.get(f"{base}/v1/jobs/{job.id}/events", params={"format": "json"},
                           headers={"Authorization": f"Bearer {key_a}"}).json()
        assert any("succeeded" in e["message"] for e in (events["items"] if isinstance(events, dict) else events))


def test_worker_killed_mid_job_finishes_with_exactly_n_images(settings_factory: Any, services_factory: Any,
                                                               tiny_generator: Path, tmp_path: Path) -> None:
    settings = settings_factory(tmp_path, stack="real", default_generator_dir=tiny_generator, shard_size=2)
    svc = services_factory(settings)
    base = svc.api()
    first = svc.worker("victim")
    key = create_tenant(svc, "hospital-k")
    with CxrsynthClient(base, key) as c:
        # Three shards of 2 images, 40 steps each: the kill lands inside the first shard.
        job = c.create_generation(n=6, sampler="ddim", num_inference_steps=40, seed=5)
        wait_for(lambda: c.get_job(job.id).progress.step > 0 or c.get_job(job.id).status.value == "running",
                 120, "the job to start", svc)
        first.kill9()
        assert c.get_job(job.id).status.value == "running"
        # The unacked message comes back once the (short, for the test) visibility timeout passes.
        svc.worker("rescuer", visibility_timeout_s=3)
        done = c.wait(job.id, poll_s=1, timeout_s=400)
        assert done.status.value == "succeeded", (done.error, svc.logs_tail())
        assert done.result and done.result["num_images"] == 6
        check_zip(c.download_dataset(done.result["dataset_id"], tmp_path / "k.zip"), 6, 32)


def test_embedded_generate_writes_pngs_and_manifest(settings_factory: Any, services_factory: Any,
                                                    tiny_generator: Path, tmp_path: Path) -> None:
    settings = settings_factory(tmp_path, stack="embedded")
    svc = services_factory(settings)
    out = tmp_path / "out"
    res = svc.cli("generate", "--n", "6", "--out", str(out), "--generator", str(tiny_generator),
                  "--sampler", "ddim", "--steps", "4", "--seed", "1")
    assert res.returncode == 0, res.stderr
    pngs = sorted(p for p in out.rglob("*.png") if p.parent != out)  # label folders; the top holds the report
    assert len(pngs) == 6
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert len(rows) == 6 and all((out / r["file"]).is_file() for r in rows)
    assert (out / "privacy_report.json").is_file() and (out / "privacy_report.png").is_file()
    # bad input: a clear message and a non-zero exit, nothing written
    bad = svc.cli("generate", "--n", "0", "--out", str(tmp_path / "bad"), "--generator", str(tiny_generator))
    assert bad.returncode != 0 and "n" in bad.stderr
    assert not (tmp_path / "bad").exists()
    unknown = svc.cli("generate", "--n", "2", "--label", "fracture", "--out", str(tmp_path / "bad2"),
                      "--generator", str(tiny_generator))
    assert unknown.returncode != 0 and "fracture" in unknown.stderr


def test_embedded_serve_job_survives_restart(settings_factory: Any, services_factory: Any,
                                             tiny_generator: Path, tmp_path: Path) -> None:
    import sys

    from tests.conftest import free_port
    from tests.e2e.conftest import Proc

    settings = settings_factory(tmp_path, stack="embedded", default_generator_dir=tiny_generator, shard_size=2)
    svc = services_factory(settings)
    key = create_tenant(svc, "hospital-e")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = svc.env(public_base_url=base)

    def start() -> Proc:
        proc = Proc([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env,
                    tmp_path / f"serve-{time.monotonic_ns()}.log")
        svc.procs.append(proc)
        wait_for(lambda: _up(base), 60, "serve to answer", svc)
        return proc

    serve = start()
    with CxrsynthClient(base, key) as c:
        job = c.create_generation(n=6, sampler="ddim", num_inference_steps=40, seed=9)
        wait_for(lambda: c.get_job(job.id).status.value == "running", 120, "the job to start", svc)
    serve.kill9()
    start()
    with CxrsynthClient(base, key) as c:
        done = c.wait(job.id, poll_s=1, timeout_s=420)
        assert done.status.value == "succeeded", (done.error, svc.logs_tail())
        check_zip(c.download_dataset(done.result["dataset_id"], tmp_path / "e.zip"), 6, 32)


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
