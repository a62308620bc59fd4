"""Post-processing of the generated OpenAPI schema: ``links`` between operations, and the ``400`` of bodies.

**Links**: what a client can call next with the ids a response carries. They document the workflows
(create a job -> read / follow / cancel it; upload a dataset -> read, page, download, delete it) and let
stateful API testers (schemathesis, ``tests/integration/test_fuzz_api.py``) chain real calls. Each link names
its target by method and path and is resolved to the target's ``operationId`` here, so a route that is
renamed or removed fails loudly at schema generation instead of leaving a dangling link.

**400**: every operation that reads a request body answers ``400 bad-request`` (problem+json) when the body
cannot be parsed at all (not JSON, not UTF-8, a broken multipart stream); FastAPI raises that before any
route runs, so it is documented here once rather than on each route.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.core.problems import problem_responses

# (method, path) of an operation.
Op = tuple[str, str]

_JOB_ID = {"job_id": "$response.body#/id"}
_DATASET_ID = {"dataset_id": "$response.body#/id"}

_FOLLOW_JOB: dict[str, tuple[Op, dict[str, str]]] = {
    "GetJob": (("get", "/v1/jobs/{job_id}"), _JOB_ID),
    "CancelJob": (("post", "/v1/jobs/{job_id}/cancel"), _JOB_ID),
    "ListJobEvents": (("get", "/v1/jobs/{job_id}/events"), {**_JOB_ID, "format": "json"}),
}
_FOLLOW_DATASET: dict[str, tuple[Op, dict[str, str]]] = {
    "GetDataset": (("get", "/v1/datasets/{dataset_id}"), _DATASET_ID),
    "ListDatasetImages": (("get", "/v1/datasets/{dataset_id}/images"), _DATASET_ID),
    "DownloadDataset": (("get", "/v1/datasets/{dataset_id}/download"), _DATASET_ID),
    "DeleteDataset": (("delete", "/v1/datasets/{dataset_id}"), _DATASET_ID),
}

# (source operation, response status) -> {link name: (target operation, parameters)}
LINKS: dict[tuple[Op, str], dict[str, tuple[Op, dict[str, str]]]] = {
    (("post", "/v1/generations"), "202"): _FOLLOW_JOB,
    (("post", "/v1/generators"), "202"): _FOLLOW_JOB,
    (("post", "/v1/pretrainings"), "202"): _FOLLOW_JOB,
    (("post", "/v1/evaluations"), "202"): _FOLLOW_JOB,
    (("get", "/v1/jobs/{job_id}"), "200"): {k: _FOLLOW_JOB[k] for k in ("CancelJob", "ListJobEvents")},
    (("post", "/v1/jobs/{job_id}/cancel"), "200"): {k: _FOLLOW_JOB[k] for k in ("GetJob", "ListJobEvents")},
    (("post", "/v1/datasets"), "201"): _FOLLOW_DATASET,
    (("post", "/v1/datasets/register"), "201"): _FOLLOW_DATASET,
    (("get", "/v1/datasets/{dataset_id}"), "200"): {
        k: _FOLLOW_DATASET[k] for k in ("ListDatasetImages", "DownloadDataset", "DeleteDataset")},
}


def add_extras(schema: dict[str, Any]) -> dict[str, Any]:
    """Add :data:`LINKS` and the ``400`` of request bodies to ``schema`` (in place) and return it.
    ``KeyError`` names an operation a link points to that does not exist."""
    paths = schema["paths"]

    def operation(op: Op) -> dict[str, Any]:
        method, path = op
        try:
            found: dict[str, Any] = paths[path][method]
        except KeyError:
            raise KeyError(f"OpenAPI link to an operation that does not exist: {method.upper()} {path}") from None
        return found

    for path_item in paths.values():
        for op in path_item.values():
            if isinstance(op, dict) and "requestBody" in op and "400" not in op.get("responses", {}):
                op["responses"] = dict(sorted({**op.get("responses", {}), "400": problem_responses(400)[400]}.items()))
    for (source, status), links in LINKS.items():
        response = operation(source)["responses"][status]
        response["links"] = {
            name: {"operationId": operation(target)["operationId"], "parameters": dict(params)}
            for name, (target, params) in links.items()
        }
    return schema


def install_openapi_extras(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json``) include :func:`add_extras`."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_extras(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
