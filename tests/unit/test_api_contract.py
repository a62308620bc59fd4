"""API building blocks without services: problem+json rendering, request schemas, cursors, request
hashes, generator label parsing, deterministic zip exports."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from app.core.problems import Conflict, InvalidInput, TooManyJobs, install_problem_handlers
from app.db.orm import Dataset
from app.schemas.jobs import GenerationRequest, GeneratorTrainingRequest
from app.services.exports import ManifestRow, manifest_csv, parse_manifest, safe_filename
from app.services.generations import _split_evenly
from app.services.jobs import request_hash
from app.services.model_assets import builtin_id, generator_labels
from app.services.pagination import check_limit, decode_cursor, encode_cursor
from app.storage.local import LocalStore
from worker.exports import build_zip_export


class _Body(BaseModel):
    n: int


def _app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/items")
    def create(body: _Body) -> dict[str, int]:
        if body.n == 409:
            raise Conflict("already there", slug="exists", item=7)
        if body.n == 429:
            raise TooManyJobs("slow down", headers={"Retry-After": "30"})
        if body.n == 418:
            raise HTTPException(418, "teapot")
        if body.n == 500:
            raise ValueError("internal detail")
        return {"n": body.n}

    return app


def test_problem_rendering() -> None:
    with TestClient(_app(), raise_server_exceptions=False) as c:
        r = c.post("/items", json={"n": 409})
        assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json"
        assert r.json() == {"type": "https://cxrsynth.dev/problems/exists", "title": "Conflict", "status": 409,
                            "detail": "already there", "instance": "/items", "item": 7}
        r = c.post("/items", json={"n": 429})
        assert r.status_code == 429 and r.headers["retry-after"] == "30"
        r = c.post("/items", json={"n": "x"})
        body = r.json()
        assert r.status_code == 422 and body["type"].endswith("/validation-error")
        assert body["errors"][0]["loc"] == ["body", "n"] and "input" not in body["errors"][0]
        r = c.post("/items", json={"n": 418})
        assert r.status_code == 418 and r.json()["detail"] == "teapot" and r.json()["title"] == "I'm a Teapot"
        r = c.post("/items", json={"n": 500})
        assert r.status_code == 500 and "internal detail" not in r.text
        assert r.json()["type"].endswith("/internal-error")
        r = c.get("/missing")
        assert r.status_code == 404 and r.json()["type"].endswith("/not-found")


@pytest.mark.parametrize("body", [
    {"n": 0}, {}, {"counts": {}}, {"counts": {"a": 0}}, {"counts": {"a": -1, "b": 3}}, {"counts": {"a": 1}, "n": 1},
    {"counts": {"a": 1}, "label": "a"}, {"n": 1, "sampler": "heun"}, {"n": 1, "guidance_scale": -0.1},
    {"n": 1, "webhook_url": "file:///etc/passwd"}, {"n": 1, "webhook_url": "javascript:alert(1)"},
    {"n": 1, "seed": 2**32}, {"n": 1, "extra": 1},
])
def test_generation_request_rejects(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        GenerationRequest.model_validate(body)


def test_generation_request_accepts() -> None:
    req = GenerationRequest.model_validate({"counts": {"normal": 0, "pneumonia": 2},
                                            "webhook_url": "https://h.example/x"})
    assert req.webhook_url == "https://h.example/x" and req.sampler == "dpmsolver++"
    assert GeneratorTrainingRequest.model_validate({"dataset_id": "d", "name": "g"}).resolution == 64
    latent = GeneratorTrainingRequest.model_validate({"dataset_id": "d", "name": "g", "resolution": 256})
    assert latent.kind == "latent" and latent.autoencoder_steps is None
    for bad in ({"resolution": 100}, {"resolution": 64, "autoencoder_steps": 10}, {"resolution": 224,
                                                                                 "autoencoder_steps": 0}):
        with pytest.raises(ValidationError):
            GeneratorTrainingRequest.model_validate({"dataset_id": "d", "name": "g", **bad})


def test_openapi_resolution_enum_is_the_generator_kind_registry() -> None:
    from app.main import create_app
    from models.generator_kinds import TRAINABLE_RESOLUTIONS

    schema = create_app().openapi()["components"]["schemas"]["GeneratorTrainingRequest"]
    assert schema["properties"]["resolution"]["enum"] == list(TRAINABLE_RESOLUTIONS)


def test_request_hash_is_canonical() -> None:
    a = GenerationRequest.model_validate({"n": 2, "label": "normal"})
    b = GenerationRequest.model_validate({"label": "normal", "n": 2, "sampler": "dpmsolver++"})
    c = GenerationRequest.model_validate({"label": "normal", "n": 3})
    assert request_hash("generation", a) == request_hash("generation", b) != request_hash("generation", c)
    assert request_hash("generation", a) != request_hash("generator_training", a)


def test_cursors_and_limits() -> None:
    assert decode_cursor(encode_cursor("2026-01-01T00:00:00+00:00", "abc")) == ["2026-01-01T00:00:00+00:00", "abc"]
    for bad in ("!!!", "e30", "bm90IGpzb24"):  # not base64, a dict, not JSON
        with pytest.raises(InvalidInput):
            decode_cursor(bad)
    assert check_limit(None, 20) == 20 and check_limit(None, 500) == 50 and check_limit(5, 20) == 5
    for bad_limit in (0, 21):
        with pytest.raises(InvalidInput):
            check_limit(bad_limit, 20)


def test_generator_labels_and_split() -> None:
    assert generator_labels({"labels": {"normal": 0, "pneumonia": 1}}) == {"normal": 0, "pneumonia": 1}
    assert generator_labels({"label_names": ["a", "b"]}) == {"a": 0, "b": 1}
    assert generator_labels({"id2label": {"0": "x", "1": "y"}}) == {"x": 0, "y": 1}
    assert generator_labels({"labels": {}, "conditional": False}) == {}
    assert _split_evenly(5, ["a", "b"]) == {"a": 3, "b": 2}
    assert _split_evenly(1, ["a", "b", "c"]) == {"a": 1}
    assert builtin_id("generator", "x") == builtin_id("generator", "x") != builtin_id("encoder", "x")
    name = safe_filename("My set/../é.zip")
    assert name.startswith("My-set") and name.endswith(".zip") and "/" not in name and ".." not in name
    assert safe_filename("..") == "download"


def test_zip_export_is_deterministic(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects", secret="s", base_url="http://x")
    prefix = "tenants/t/datasets/d/images"
    rows = [ManifestRow("normal/a.png", "normal", "0" * 64), ManifestRow("pneumonia/b.png", "pneumonia", "1" * 64)]
    for r in rows:
        store.put_bytes(f"{prefix}/{r.file}", r.file.encode())
    store.put_bytes("tenants/t/datasets/d/manifest.csv", manifest_csv(rows))
    assert parse_manifest(manifest_csv(rows)) == rows
    ds = Dataset(id="d", tenant_id="t", name="n", origin="real", prefix=prefix, label_counts={"normal": 1},
                 manifest_key="tenants/t/datasets/d/manifest.csv", card={})
    key = build_zip_export(store, ds)
    assert key == "tenants/t/datasets/d/exports/d.zip"
    first = store.get_bytes(key)
    build_zip_export(store, ds)
    assert store.get_bytes(key) == first  # same bytes on a re-run
    with zipfile.ZipFile(store.path_of(key)) as zf:
        assert zf.namelist() == ["normal/a.png", "pneumonia/b.png", "manifest.csv", "dataset.json", "card.json",
                                 "README.md"]
        assert zf.read("normal/a.png") == b"normal/a.png"


def test_embedded_probes_and_queue_depth(tmp_path: Path) -> None:
    from app.core.config import Settings
    from app.core.queue import TASK_START_JOB, send_task
    from app.db.session import migrate
    from app.services.health import queue_depths, readiness

    settings = Settings(_env_file=None, data_dir=tmp_path / "data")  # type: ignore[call-arg]
    migrate(settings.database_url)
    store = LocalStore(tmp_path / "objects", secret="s", base_url="http://x")
    assert readiness(settings, store) == {"database": "ok", "broker": "ok", "storage": "ok"}
    send_task(settings, TASK_START_JOB, "job-1")
    assert queue_depths(settings) == {"gpu": 0, "cpu": 1}
