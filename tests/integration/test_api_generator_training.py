"""Generator-training jobs through the worker on the real stack (Postgres, S3 on SeaweedFS; the worker's
task code runs inline): POST /v1/generators -> trained -> the generator is ready, downloadable, loadable
with the diffusion pipeline and usable for a generation job; another tenant sees none of it; a cancel or a
failure ends the job and its generator row without leaving checkpoints or leaking worker paths."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from tests.integration.conftest import (
    TenantAuth,
    assert_model_job_canceled,
    assert_problem,
    cancel_once_running,
    run_inline,
    upload,
    zip_bytes,
)

pytestmark = pytest.mark.integration
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def kermany_zip(shared_data: Path) -> bytes:
    """Eight real Kermany images per label, at 48 px, under their original file names (patient ids)."""
    root = shared_data / "kermany-pneumonia"
    if not root.is_dir():
        pytest.skip("kermany-pneumonia missing from the shared data")
    members = {}
    for label in ("NORMAL", "PNEUMONIA"):
        for f in sorted((root / label).iterdir())[:8]:
            buf = io.BytesIO()
            with Image.open(f) as im:
                im.convert("L").resize((48, 48)).save(buf, format="PNG")
            members[f"{label.lower()}/{f.stem}.png"] = buf.getvalue()
    return zip_bytes(members)


def _dataset(client: TestClient, auth: TenantAuth, data: bytes) -> str:
    resp = upload(client, auth, [("real.zip", data)], name="real")
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _train(client: TestClient, auth: TenantAuth, ds_id: str, **extra: Any) -> str:
    resp = client.post("/v1/generators", json={"dataset_id": ds_id, "name": "site-gen", "resolution": 32,
                                               "steps": 2, "batch_size": 4, "seed": 5, **extra},
                       headers=auth.headers)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def test_trained_generator_is_downloadable_and_generates(
    client: TestClient, api_settings: Settings, new_tenant: Any, kermany_zip: bytes, unchanged: Any,
    tmp_path: Path,
) -> None:
    from models.diffusion import CXRDiffusionPipeline

    a, b = new_tenant(), new_tenant()
    ds_id = _dataset(client, a, kermany_zip)
    job_id = _train(client, a, ds_id)
    run_inline(api_settings, job_id)
    job = client.get(f"/v1/jobs/{job_id}", headers=a.headers).json()
    assert job["status"] == "succeeded", job["error"]
    gen_id = job["result"]["generator_id"]
    assert job["result"]["steps"] == 2 and job["result"]["links"] == {
        "generator": f"/v1/generators/{gen_id}", "download": f"/v1/generators/{gen_id}/download"}
    events = client.get(f"/v1/jobs/{job_id}/events", params={"format": "json"}, headers=a.headers).json()
    assert events[-1]["message"] == f"generator {gen_id} ready"

    gen = client.get(f"/v1/generators/{gen_id}", headers=a.headers).json()
    assert gen["status"] == "ready" and gen["source_job_id"] == job_id
    # The zip holds a complete generator folder: weights, scheduler, metadata and the memorisation gate,
    # calibrated without same-patient pairs (the upload kept Kermany's file names, hence patient ids).
    link = client.get(f"/v1/generators/{gen_id}/download", headers=a.headers).json()
    with zipfile.ZipFile(io.BytesIO(httpx.get(link["url"], timeout=30).content)) as zf:
        names = set(zf.namelist())
        assert {"cxrsynth.json", "config.json", "scheduler_config.json", "diffusion_pytorch_model.safetensors",
                "privacy_index.safetensors", "privacy_calibration.json", "README.md"} <= names
        zf.extractall(tmp_path / "gen")
    meta = json.loads((tmp_path / "gen" / "cxrsynth.json").read_text())
    assert meta["training_data"]["num_images"] == 16 and meta["training_data"]["counts"] == {
        "normal": 8, "pneumonia": 8}
    calibration = json.loads((tmp_path / "gen" / "privacy_calibration.json").read_text())
    assert "same patient" in calibration["reference"]["excluded_pairs"]
    pipe = CXRDiffusionPipeline.from_pretrained(tmp_path / "gen", device="cpu")
    assert pipe(labels=["pneumonia"], num_inference_steps=2, seed=0).images.shape == (1, 32, 32)

    # The tenant generates with it; the dataset records which generator made it.
    resp = client.post("/v1/generations", json={"generator_id": gen_id, "n": 2, "num_inference_steps": 2,
                                                "seed": 3}, headers=a.headers)
    assert resp.status_code == 202, resp.text
    run_inline(api_settings, resp.json()["id"])
    gen_job = client.get(f"/v1/jobs/{resp.json()['id']}", headers=a.headers).json()
    assert gen_job["status"] == "succeeded", gen_job["error"]
    synthetic = client.get(f"/v1/datasets/{gen_job['result']['dataset_id']}", headers=a.headers).json()
    assert synthetic["num_images"] == 2 and synthetic["card"]["generator"]["id"] == gen_id
    assert synthetic["gate_status"] in ("passed", "failed")  # the trained generator's own gate ran

    # Another tenant sees nothing of it and cannot use it.
    with unchanged():
        for path in (f"/v1/generators/{gen_id}", f"/v1/generators/{gen_id}/download", f"/v1/jobs/{job_id}"):
            assert_problem(client.get(path, headers=b.headers), 404)
        assert gen_id not in [g["id"] for g in client.get("/v1/generators", headers=b.headers).json()["items"]]
        assert_problem(client.post("/v1/generations", json={"generator_id": gen_id, "n": 1},
                                   headers=b.headers), 404)
        assert_problem(client.post("/v1/generators", json={"dataset_id": ds_id, "name": "x"},
                                   headers=b.headers), 404)


def test_cancel_and_failure_end_the_job_and_its_generator(
    client: TestClient, api_settings: Settings, tenant: TenantAuth, kermany_zip: bytes, store: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.tasks import training

    ds_id = _dataset(client, tenant, kermany_zip)
    # A cancel request that arrives once the job runs: training stops at the next step.
    cancel_once_running(monkeypatch, training)
    job_id = _train(client, tenant, ds_id, steps=20)
    run_inline(api_settings, job_id)
    monkeypatch.undo()
    assert_model_job_canceled(client, tenant, api_settings, job_id, "generator")

    # The dataset's images vanish from the store after the job was accepted: a clear failure that names
    # the dataset, not the worker's temporary folder.
    job_id = _train(client, tenant, ds_id)
    prefix = client.get(f"/v1/datasets/{ds_id}", headers=tenant.headers).json()["prefix"]
    store.delete_prefix(prefix + "/")
    run_inline(api_settings, job_id)
    job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "failed" and job["error"]["title"] == "generator training failed"
    assert job["error"]["detail"] == f"ValueError: dataset {ds_id} has no images in the store"
    gen = client.get(f"/v1/generators/{job['result']['generator_id']}", headers=tenant.headers).json()
    assert gen["status"] == "failed"
    assert not (api_settings.data_dir / "checkpoints" / job_id).exists()


# ----------------------------------------------------------------------------- latent generators (224 / 256 px)


def _kermany_zip(shared_data: Path, per_label: int, size: int | None = None) -> bytes:
    root = shared_data / "kermany-pneumonia"
    if not root.is_dir():
        pytest.skip("kermany-pneumonia missing from the shared data")
    members = {}
    for label in ("NORMAL", "PNEUMONIA"):
        for i, f in enumerate(sorted((root / label).iterdir())[:per_label]):
            buf = io.BytesIO()
            with Image.open(f) as im:
                grey = im.convert("L")
                side = size if size is not None else (224 if i % 2 else 256)
                grey.resize((side, side)).save(buf, format="PNG")
            members[f"{label.lower()}/{f.stem}.png"] = buf.getvalue()
    return zip_bytes(members)


def test_latent_generator_job_trains_both_stages_and_generates_224_px(
    client: TestClient, api_settings: Settings, tenant: TenantAuth, shared_data: Path, tmp_path: Path,
) -> None:
    from models.diffusion import CXRDiffusionPipeline

    ds_id = _dataset(client, tenant, _kermany_zip(shared_data, 6, size=224))
    assert client.get(f"/v1/datasets/{ds_id}", headers=tenant.headers).json()["card"]["image_sizes"] == {
        "224x224": 12}
    job_id = _train(client, tenant, ds_id, resolution=224, steps=2, autoencoder_steps=3)
    queued = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
    assert queued["params"]["kind"] == "latent" and queued["params"]["autoencoder_steps"] == 3
    run_inline(api_settings, job_id)
    job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["total"] == 5  # 3 autoencoder + 2 diffusion steps
    gen_id = job["result"]["generator_id"]
    gen = client.get(f"/v1/generators/{gen_id}", headers=tenant.headers).json()
    assert gen["kind"] == "latent" and gen["resolution"] == 224
    assert gen["config"]["latent"]["resolution"] == 56 and gen["config"]["autoencoder"]["steps"] == 3
    link = client.get(f"/v1/generators/{gen_id}/download", headers=tenant.headers).json()
    with zipfile.ZipFile(io.BytesIO(httpx.get(link["url"], timeout=30).content)) as zf:
        names = set(zf.namelist())
        assert {"cxrsynth.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                "vae/autoencoder.json", "privacy_index.safetensors", "README.md"} <= names
        zf.extractall(tmp_path / "gen")
    assert CXRDiffusionPipeline.from_pretrained(tmp_path / "gen", device="cpu").resolution == 224

    resp = client.post("/v1/generations", json={"generator_id": gen_id, "n": 2, "num_inference_steps": 2,
                                                "seed": 1}, headers=tenant.headers)
    assert resp.status_code == 202, resp.text
    run_inline(api_settings, resp.json()["id"])
    gen_job = client.get(f"/v1/jobs/{resp.json()['id']}", headers=tenant.headers).json()
    assert gen_job["status"] == "succeeded", gen_job["error"]
    dataset = client.get(f"/v1/datasets/{gen_job['result']['dataset_id']}", headers=tenant.headers).json()
    assert dataset["num_images"] == 2 and dataset["gate_status"] in ("passed", "failed", "not_run")
    zlink = client.get(f"/v1/datasets/{dataset['id']}/download", params={"format": "zip"},
                       headers=tenant.headers)
    if zlink.status_code == 200:  # a failed gate answers 409 (tested elsewhere); the size is what matters here
        with zipfile.ZipFile(io.BytesIO(httpx.get(zlink.json()["url"], timeout=30).content)) as zf:
            png = next(n for n in zf.namelist() if n.endswith(".png"))
            assert Image.open(io.BytesIO(zf.read(png))).size == (224, 224)


def test_latent_generator_requests_with_bad_input_get_4xx_and_store_nothing(
    client: TestClient, tenant: TenantAuth, shared_data: Path, kermany_zip: bytes, unchanged: Any,
) -> None:
    small = _dataset(client, tenant, kermany_zip)  # 48 px images
    mixed = _dataset(client, tenant, _kermany_zip(shared_data, 2))  # 224 and 256 px images
    base = {"name": "g", "steps": 2}
    with unchanged():
        for body, status, needle in (
            ({"dataset_id": small, "resolution": 100}, 422, "not trainable"),
            ({"dataset_id": small, "resolution": 64, "autoencoder_steps": 5}, 422, "latent generators"),
            ({"dataset_id": small, "resolution": 224}, 422, "smaller than the 224 px"),
            ({"dataset_id": mixed, "resolution": 224}, 422, "mixes 2 sizes"),
        ):
            resp = client.post("/v1/generators", json={**base, **body}, headers=tenant.headers)
            problem = assert_problem(resp, status)
            assert needle in json.dumps(problem), problem
