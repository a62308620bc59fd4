"""Pretraining and evaluation jobs on the real stack (Postgres, S3 on SeaweedFS; the API enqueues on Redis
and the worker's task code runs inline): create -> succeeded -> encoder downloadable and loadable with plain
timm -> evaluated; another tenant sees none of it; bad requests are 4xx problems that change nothing."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from app.db.orm import Encoder, Job
from app.db.session import get_sessionmaker
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


def _png(path: Path, size: int = 48) -> bytes:
    buf = io.BytesIO()
    with Image.open(path) as im:
        im.convert("L").resize((size, size)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def zips(shared_data: Path) -> dict[str, bytes]:
    """Zips of small real slices: two Kermany ImageFolders and two lung-seg folders (images/ + masks/)."""
    kermany, lungs = shared_data / "kermany-pneumonia", shared_data / "lung-seg"
    if not kermany.is_dir() or not lungs.is_dir():
        pytest.skip("kermany-pneumonia or lung-seg missing from the shared data")

    def cls(start: int, n: int) -> bytes:
        return zip_bytes({f"{lab.lower()}/{f.stem}.png": _png(f) for lab in ("NORMAL", "PNEUMONIA")
                          for f in sorted((kermany / lab).iterdir())[start : start + n]})

    def seg(start: int, n: int) -> bytes:
        members = {}
        for f in sorted((lungs / "images").iterdir())[start : start + n]:
            members[f"images/{f.name}"] = _png(f)
            members[f"masks/{f.name}"] = _png(lungs / "masks" / f.name)
        return zip_bytes(members)

    return {"train": cls(0, 10), "test": cls(200, 5), "seg_train": seg(0, 10), "seg_test": seg(400, 4)}


def _dataset(client: TestClient, auth: TenantAuth, data: bytes, name: str) -> str:
    resp = upload(client, auth, [(f"{name}.zip", data)], name=name)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _post_and_run(client: TestClient, settings: Settings, auth: TenantAuth, path: str, body: dict[str, Any]) -> Any:
    resp = client.post(path, json=body, headers=auth.headers)
    assert resp.status_code == 202, resp.text
    run_inline(settings, resp.json()["id"])
    job = client.get(f"/v1/jobs/{resp.json()['id']}", headers=auth.headers).json()
    assert job["status"] == "succeeded", job["error"]
    return job


def test_pretrain_download_evaluate_and_tenancy(
    client: TestClient, api_settings: Settings, new_tenant: Callable[[], TenantAuth], zips: dict[str, bytes],
    unchanged: Any, tmp_path: Path,
) -> None:
    from models.ssl import load_encoder

    a, b = new_tenant(), new_tenant()
    ds = {name: _dataset(client, a, data, name) for name, data in zips.items()}

    job = _post_and_run(client, api_settings, a, "/v1/pretrainings", {
        "dataset_ids": [ds["train"], ds["seg_train"]], "name": "enc-a", "resolution": 32, "steps": 2,
        "batch_size": 4, "seed": 1})
    params = job["params"]
    assert params["num_images"] == 30 and params["steps"] == 2 and params["epochs"] is None  # masks excluded
    assert [d["layout"] for d in params["datasets"]] == ["imagefolder", "segmentation"]
    enc_id = job["result"]["encoder_id"]
    assert job["result"]["steps"] == 2 and job["result"]["links"]["download"] == f"/v1/encoders/{enc_id}/download"

    enc = client.get(f"/v1/encoders/{enc_id}", headers=a.headers).json()
    assert enc["status"] == "ready" and not enc["builtin"] and enc["source_job_id"] == job["id"]
    assert enc["config"]["architecture"] == "resnet18" and enc["config"]["pretraining"]["data"]["num_images"] == 30
    assert "timm.create_model" in enc["card"]
    link = client.get(f"/v1/encoders/{enc_id}/download", headers=a.headers).json()
    with zipfile.ZipFile(io.BytesIO(httpx.get(link["url"], timeout=30).content)) as zf:
        assert sorted(zf.namelist()) == ["README.md", "config.json", "model.safetensors"]
        zf.extractall(tmp_path / "enc")
    model = load_encoder(tmp_path / "enc")  # plain timm.create_model + strict load_state_dict
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 512)

    # Another tenant sees nothing of it and cannot use it.
    with unchanged():
        for path in (f"/v1/encoders/{enc_id}", f"/v1/encoders/{enc_id}/download", f"/v1/jobs/{job['id']}"):
            assert_problem(client.get(path, headers=b.headers), 404)
        assert enc_id not in [e["id"] for e in client.get("/v1/encoders", headers=b.headers).json()["items"]]
        assert_problem(client.post("/v1/evaluations", json={"encoder_id": enc_id, "train_dataset_id": ds["train"],
                                                            "test_dataset_id": ds["test"]}, headers=b.headers), 404)
        assert_problem(client.post("/v1/pretrainings", json={"dataset_ids": [ds["train"]], "name": "x"},
                                   headers=b.headers), 404)

    cls = _post_and_run(client, api_settings, a, "/v1/evaluations", {
        "encoder_id": enc_id, "train_dataset_id": ds["train"], "test_dataset_id": ds["test"]})
    assert cls["params"]["mode"] == "linear" and cls["result"]["encoder"] == enc_id
    metrics = cls["result"]["metrics"]
    assert set(metrics) == {"auc", "f1", "accuracy", "sensitivity", "specificity"}
    assert all(m["low"] <= m["value"] <= m["high"] for m in metrics.values())
    report = cls["result"]["report"]
    assert report["split"]["test"] == 10 and report["train_data"] == f"dataset {ds['train']}"
    assert report["encoder"]["source"] == f"encoder {enc_id}" and "/tmp" not in json.dumps(report)
    recorded = client.get(f"/v1/encoders/{enc_id}", headers=a.headers).json()["metrics"]["evaluations"]
    assert recorded[f"classification/linear/1/{ds['test']}"]["metrics"]["auc"]["value"] == metrics["auc"]["value"]

    seg = _post_and_run(client, api_settings, a, "/v1/evaluations", {
        "encoder_id": "scratch", "train_dataset_id": ds["seg_train"], "test_dataset_id": ds["seg_test"],
        "task": "segmentation", "epochs": 1, "resolution": 32})
    assert seg["params"]["mode"] == "finetune" and seg["params"]["encoder"] == "scratch:resnet18"
    assert 0.0 <= seg["result"]["metrics"]["dice"]["value"] <= 1.0
    assert seg["result"]["report"]["split"]["test"] == 4


def test_bad_requests_are_problems_and_change_nothing(
    client: TestClient, api_settings: Settings, tenant: TenantAuth, zips: dict[str, bytes], unchanged: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("app.services.ssl_jobs.MAX_PRETRAINING_STEPS", 100)
    ds = {name: _dataset(client, tenant, zips[name], name) for name in ("train", "seg_train", "seg_test")}
    ds["other_labels"] = _dataset(client, tenant, zip_bytes({
        f"{lab}/{i}.png": _gray_png(10 * i + 5) for lab in ("cat", "dog") for i in range(2)}), "other_labels")
    builtin = next(e for e in client.get("/v1/encoders", headers=tenant.headers).json()["items"] if e["builtin"])
    with get_sessionmaker(api_settings.database_url)() as s:
        training = Encoder(tenant_id=tenant.id, name="still-training", status="training")
        s.add(training)
        s.commit()
        training_id = training.id
    pre = {"dataset_ids": [ds["train"]], "name": "enc"}
    ev = {"encoder_id": "scratch", "train_dataset_id": ds["train"], "test_dataset_id": ds["other_labels"]}
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/v1/pretrainings", {"bogus": 1}, 422, "validation-error"),
        ("/v1/pretrainings", {**pre, "steps": 2, "epochs": 1}, 422, "validation-error"),
        ("/v1/pretrainings", {**pre, "resolution": 40}, 422, "validation-error"),
        ("/v1/pretrainings", {**pre, "backbone": "vgg16"}, 422, "validation-error"),
        ("/v1/pretrainings", {**pre, "dataset_ids": []}, 422, "validation-error"),
        ("/v1/pretrainings", {**pre, "dataset_ids": [ds["train"], ds["train"]]}, 422, "validation-error"),
        ("/v1/pretrainings", {**pre, "epochs": 11, "batch_size": 2}, 422, "too-many-steps"),  # 110 > 100
        ("/v1/pretrainings", {**pre, "dataset_ids": ["0" * 32]}, 404, "not-found"),
        ("/v1/evaluations", {"bogus": 1}, 422, "validation-error"),
        ("/v1/evaluations", {**ev, "label_fraction": 0}, 422, "validation-error"),
        ("/v1/evaluations", {**ev, "test_dataset_id": ds["train"]}, 422, "same-dataset"),
        ("/v1/evaluations", ev, 422, "label-mismatch"),
        ("/v1/evaluations", {**ev, "encoder_id": "scratch:vgg16"}, 422, "unknown-backbone"),
        ("/v1/evaluations", {**ev, "encoder_id": "0" * 32}, 404, "not-found"),
        ("/v1/evaluations", {**ev, "encoder_id": builtin["id"]}, 422, "not-evaluable"),
        ("/v1/evaluations", {**ev, "encoder_id": training_id}, 409, "not-ready"),
        ("/v1/evaluations", {**ev, "test_dataset_id": ds["seg_test"]}, 422, "wrong-dataset-layout"),
        ("/v1/evaluations", {**ev, "train_dataset_id": ds["seg_train"], "test_dataset_id": ds["seg_test"]}, 422,
         "wrong-dataset-layout"),
        ("/v1/evaluations", {**ev, "task": "segmentation", "test_dataset_id": ds["seg_test"]}, 422,
         "wrong-dataset-layout"),
    ]
    with unchanged():
        for path, body, status, slug in cases:
            assert_problem(client.post(path, json=body, headers=tenant.headers), status, slug)
    # epochs become steps over every image of every dataset
    resp = client.post("/v1/pretrainings", json={**pre, "dataset_ids": [ds["train"], ds["seg_train"]], "epochs": 3,
                                                 "batch_size": 8}, headers=tenant.headers)
    assert resp.status_code == 202, resp.text
    assert resp.json()["params"]["steps"] == 12 and resp.json()["params"]["epochs"] == 3  # ceil(3 * 30 / 8)
    assert client.post(f"/v1/jobs/{resp.json()['id']}/cancel", headers=tenant.headers).json()["status"] == "canceled"
    with get_sessionmaker(api_settings.database_url)() as s:
        row = s.get(Job, resp.json()["id"])
        assert row is not None and row.kind == "pretraining"


def _gray_png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), value).save(buf, format="PNG")
    return buf.getvalue()


def test_cancel_mid_run_and_failure_are_reported(
    client: TestClient, api_settings: Settings, tenant: TenantAuth, zips: dict[str, bytes], store: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.tasks import ssl as ssl_tasks

    ds = {name: _dataset(client, tenant, zips[name], name) for name in ("train", "test")}
    # A cancel request that arrives once the job runs: the worker stops at the next step.
    cancel_once_running(monkeypatch, ssl_tasks)
    resp = client.post("/v1/pretrainings", json={"dataset_ids": [ds["train"]], "name": "enc", "resolution": 32,
                                                 "steps": 3, "batch_size": 4}, headers=tenant.headers)
    run_inline(api_settings, resp.json()["id"])
    monkeypatch.undo()
    assert_model_job_canceled(client, tenant, api_settings, resp.json()["id"], "encoder")

    # The test images vanish from the store after the job was accepted: a clear failure, no worker paths.
    resp = client.post("/v1/evaluations", json={"encoder_id": "scratch", "train_dataset_id": ds["train"],
                                                "test_dataset_id": ds["test"], "resolution": 32},
                       headers=tenant.headers)
    prefix = resp.json()["params"]["test_dataset"]["prefix"]
    store.delete_prefix(prefix + "/")
    run_inline(api_settings, resp.json()["id"])
    job = client.get(f"/v1/jobs/{resp.json()['id']}", headers=tenant.headers).json()
    assert job["status"] == "failed" and job["error"]["title"] == "evaluation failed"
    assert job["error"]["detail"] == f"ValueError: the test dataset {ds['test']} has no images in the store"


def test_cli_pretrain_through_the_api(client: TestClient, api_settings: Settings, tenant: TenantAuth,
                                      zips: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cxrsynth pretrain --dataset-id ID --api URL --key KEY``: job created, waited for, encoder unpacked."""
    from typer.testing import CliRunner

    from app import client as client_module
    from app.cli import app

    ds = _dataset(client, tenant, zips["train"], "train")

    class ToTestClient(httpx.BaseTransport):
        """Hands each request of the real client to the test app (TestClient speaks another httpx)."""

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            r = client.request(request.method, str(request.url), headers=dict(request.headers),
                               content=request.read())
            return httpx.Response(r.status_code, headers=dict(r.headers), content=r.content)

    class ThroughTestClient(client_module.CxrsynthClient):
        """The real client talking to the test app; ``wait`` first lets the worker code run the job."""

        def __init__(self, base_url: str, api_key: str, timeout: float = 30.0, transport: Any = None) -> None:
            super().__init__(base_url, api_key, timeout, transport=ToTestClient())

        def wait(self, job_id: str, *args: Any, **kwargs: Any) -> Any:
            run_inline(api_settings, job_id)
            return super().wait(job_id, *args, **kwargs)

    monkeypatch.setattr(client_module, "CxrsynthClient", ThroughTestClient)
    out = tmp_path / "enc"
    result = CliRunner().invoke(app, ["pretrain", "--dataset-id", ds, "--out", str(out), "--steps", "1",
                                      "--resolution", "32", "--batch-size", "4", "--method", "simclr", "--fp16",
                                      "--api", "http://testserver", "--key", tenant.key])
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "simclr" and cfg["weights_dtype"] == "float16" and cfg["pretraining"]["steps"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
