"""The published OpenAPI schema: links between operations and the documented 400 of unparseable bodies
(``app/api/openapi_extras.py``); found by the schemathesis run of ``tests/integration/test_fuzz_api.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.openapi_extras import LINKS, add_extras
from app.core.config import Settings
from app.main import create_app


@pytest.fixture
def schema(tmp_path: Path) -> dict[str, Any]:
    app = create_app(Settings(_env_file=None, data_dir=tmp_path))  # type: ignore[call-arg]
    # Served as generated, through the route (not only app.openapi()).
    served: dict[str, Any] = TestClient(app).get("/openapi.json").json()
    return served


def _operations(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {op["operationId"]: op for item in schema["paths"].values() for op in item.values()}


def test_links_name_existing_operations_and_their_path_parameters(schema: dict[str, Any]) -> None:
    ops = _operations(schema)
    seen = 0
    for path, item in schema["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                for name, link in response.get("links", {}).items():
                    seen += 1
                    target = ops[link["operationId"]]
                    declared = {p["name"] for p in target.get("parameters", [])}
                    assert set(link["parameters"]) <= declared, (method, path, status, name)
                    assert ((method, path), status) in LINKS
    assert seen == sum(len(v) for v in LINKS.values())
    create = schema["paths"]["/v1/generations"]["post"]["responses"]["202"]["links"]
    assert {"GetJob", "CancelJob", "ListJobEvents"} <= set(create)
    assert create["GetJob"]["parameters"] == {"job_id": "$response.body#/id"}
    upload = schema["paths"]["/v1/datasets"]["post"]["responses"]["201"]["links"]
    assert {"GetDataset", "DownloadDataset", "DeleteDataset"} <= set(upload)


def test_a_link_to_a_missing_operation_fails_loudly() -> None:
    with pytest.raises(KeyError, match="POST /v1/generations"):
        add_extras({"paths": {}})


def test_every_request_body_documents_400_problem(schema: dict[str, Any]) -> None:
    with_body = [op for op in _operations(schema).values() if "requestBody" in op]
    assert len(with_body) >= 7
    for op in with_body:
        assert "application/problem+json" in op["responses"]["400"]["content"], op["operationId"]


@pytest.mark.parametrize(("path", "body", "content_type"), [
    ("/v1/generations", b"\xff", "application/json"),  # the request schemathesis sent: not UTF-8
    ("/v1/pretrainings", b")\x14kZ\xff\x1e", "application/json"),
    ("/v1/datasets/register", b"\xff\xfe{", "application/json"),
])
def test_unparseable_body_is_a_documented_400_problem(tmp_path: Path, path: str, body: bytes,
                                                      content_type: str) -> None:
    app = create_app(Settings(_env_file=None, data_dir=tmp_path))  # type: ignore[call-arg]
    # No lifespan and no key: the body is parsed before any dependency runs.
    resp = TestClient(app).post(path, content=body, headers={"Content-Type": content_type})
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert problem["type"].endswith("/bad-request") and problem["status"] == 400 and problem["instance"] == path
    assert "400" in app.openapi()["paths"][path]["post"]["responses"]
