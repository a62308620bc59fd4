"""One registry per list (issue 14): the API's OpenAPI enums, the CLI's choices and the worker's dispatch
all read the registries of samplers, export formats, SSL methods and job kinds; unknown names fail loudly;
``app/`` imports ``worker`` from one module only."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from app.db.orm import JobKind
from models.release.writers import EXPORT_FORMATS, FORMATS, write_release
from models.samplers import DEFAULT_SAMPLER, SAMPLERS, check_sampler
from models.ssl_methods import DEFAULT_SSL_METHOD, SSL_METHOD_NAMES, check_ssl_method

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    from app.main import create_app

    return create_app().openapi()


def _query_param(openapi: dict[str, Any], path: str, name: str) -> dict[str, Any]:
    params = openapi["paths"][path]["get"]["parameters"]
    return next(p["schema"] for p in params if p["name"] == name)


def test_openapi_enums_are_the_registries(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    sampler = schemas["GenerationRequest"]["properties"]["sampler"]
    assert sampler["enum"] == list(SAMPLERS) and sampler["default"] == DEFAULT_SAMPLER
    method = schemas["PretrainingRequest"]["properties"]["method"]
    assert method["enum"] == list(SSL_METHOD_NAMES) and method["default"] == DEFAULT_SSL_METHOD
    assert schemas["JobKind"]["enum"] == [k.value for k in JobKind]
    fmt = _query_param(openapi, "/v1/datasets/{dataset_id}/download", "format")
    assert fmt["enum"] == list(FORMATS) == list(EXPORT_FORMATS) and fmt["default"] == FORMATS[0]


def test_cli_choices_and_help_are_the_registries(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from app.cli import app

    runner = CliRunner()

    def help_of(*command: str) -> str:
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    assert f"<{'|'.join(FORMATS)}>" in help_of("datasets", "export")
    assert f"<{'|'.join(SSL_METHOD_NAMES)}>" in help_of("pretrain")
    for command in ("generate", "generator-report"):
        assert " | ".join(SAMPLERS) + "." in help_of(command)
    from models.probe_readouts import LINEAR_READOUTS

    assert f"one of {', '.join(LINEAR_READOUTS)} " in help_of("evaluate", "classification")
    bad = runner.invoke(app, ["datasets", "export", "d", "--out", str(tmp_path), "--format", "tiff"])
    assert bad.exit_code == 2 and "tiff" in bad.output
    bad = runner.invoke(app, ["pretrain", "--out", str(tmp_path / "e"), "--data", str(tmp_path), "--method", "byol"])
    assert bad.exit_code == 2 and "byol" in bad.output


def test_every_registered_name_has_an_implementation() -> None:
    from models.diffusion.pipeline import _SCHEDULER_CLASSES
    from models.ssl.training import SSL_METHODS
    from worker.tasks.jobs import SINGLE_TASK_RUNNERS

    assert {spec.scheduler for spec in SAMPLERS.values()} <= set(_SCHEDULER_CLASSES)
    assert tuple(SSL_METHODS) == SSL_METHOD_NAMES
    assert {*SINGLE_TASK_RUNNERS, JobKind.generation.value} == {k.value for k in JobKind}


def test_unknown_names_fail_loudly(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from app.schemas.jobs import GenerationRequest, PretrainingRequest
    from models.ssl.config import PretrainConfig

    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        check_sampler("euler")
    with pytest.raises(ValueError, match="method must be 'dino' or 'simclr', got 'byol'"):
        check_ssl_method("byol")
    with pytest.raises(ValueError, match="got 'byol'"):
        PretrainConfig(method="byol")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown export format 'tiff'"):
        write_release("tiff", tmp_path / "x", [], None)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        GenerationRequest.model_validate({"n": 1, "sampler": "euler"})
    with pytest.raises(ValidationError):
        PretrainingRequest.model_validate({"dataset_ids": ["d"], "name": "e", "method": "byol"})


def test_app_imports_worker_from_one_module() -> None:
    importers = set()
    for path in (ROOT / "app").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "worker" or n.startswith("worker.") for n in names):
                importers.add(path.relative_to(ROOT).as_posix())
    assert importers == {"app/embedded.py"}


def _imported_modules(path: Path) -> list[str]:
    """Every module ``path`` imports (``from app import services`` counts as ``app.services``)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return found


def test_worker_imports_no_app_services() -> None:
    """The worker shares ``app.db``, ``app.storage``, ``app.core`` and ``app.schemas`` with the API, never its
    services, routes, console or CLI (issue 14: export building moved to ``worker/exports.py``)."""
    forbidden = ("app.services", "app.api", "app.console", "app.cli")
    offenders = {
        f"{path.relative_to(ROOT).as_posix()}: {name}"
        for path in (ROOT / "worker").rglob("*.py")
        for name in _imported_modules(path)
        if any(name == f or name.startswith((f + ".", f + "_")) for f in forbidden)
    }
    assert offenders == set()


def test_models_import_neither_app_nor_worker() -> None:
    offenders = {
        f"{path.relative_to(ROOT).as_posix()}: {name}"
        for path in (ROOT / "models").rglob("*.py")
        for name in _imported_modules(path)
        if name.split(".")[0] in ("app", "worker")
    }
    assert offenders == set()


def test_no_function_over_80_lines() -> None:
    """Issue 14's house rule: long work is a list of named steps. The one exception keeps its unrolled
    training loop on purpose (docs/architecture.md, Conventions)."""
    allowed = {"models/diffusion/training.py::train_generator"}
    long: dict[str, int] = {}
    for top in ("app", "worker", "models"):
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                    lines = (node.end_lineno or node.lineno) - first + 1
                    name = f"{path.relative_to(ROOT).as_posix()}::{node.name}"
                    if lines > 80 and name not in allowed:
                        long[name] = lines
    assert long == {}
