"""docker-compose.yml, .env.example and Dockerfile agree with the settings (no Docker engine runs here)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from app.core.config import REPO_ROOT, Settings

COMPOSE_TEXT = (REPO_ROOT / "docker-compose.yml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, Any] = COMPOSE["services"]
DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}; $${...} is an escaped $.
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
FIELDS = set(Settings.model_fields)


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (REPO_ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=value: {line!r}"
            pairs[name.strip()] = value.strip()
    return pairs


def environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's variable substitution, enough for this file."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in variables and (variables[name] or not op.startswith(":")):
            return variables[name]
        if op.endswith("?"):
            raise AssertionError(f"${{{name}}} is required: {arg}")
        return arg

    return INTERPOLATION.sub(one, value).replace("$$", "$")


def setting_name(var: str) -> str:
    assert var.startswith("CXRSYNTH_"), var
    return var.removeprefix("CXRSYNTH_").lower()


def test_services_and_dependencies() -> None:
    assert set(SERVICES) == {"api", "worker", "worker-multigpu", "postgres", "redis", "minio", "migrate"}
    for service in ("api", "worker", "worker-multigpu"):
        deps = SERVICES[service]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["restart"] == "no"
    assert SERVICES["migrate"]["command"] == ["python", "scripts/migrate.py"]
    assert (REPO_ROOT / "scripts" / "migrate.py").is_file()


def test_healthchecks_back_every_healthy_condition() -> None:
    for name, service in SERVICES.items():
        for dep, spec in service.get("depends_on", {}).items():
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep} to be healthy: no healthcheck"
    for name in ("postgres", "redis", "minio", "api"):
        assert SERVICES[name]["healthcheck"]["test"], name


def test_worker_reserves_a_gpu_and_runs_the_worker() -> None:
    worker = SERVICES["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert worker["command"] == ["cxrsynth", "worker"]
    assert worker["build"]["target"] == "worker" and SERVICES["api"]["build"]["target"] == "api"


def test_multi_gpu_worker_is_opt_in_and_owns_its_gpus() -> None:
    from app.core.devices import worker_devices

    multi = SERVICES["worker-multigpu"]
    assert multi["profiles"] == ["multi-gpu"]  # `docker compose up` alone does not start it
    command = multi["command"]
    assert command[:3] == ["cxrsynth", "worker", "--gpus"]
    devices = multi["deploy"]["resources"]["reservations"]["devices"]
    reserved = next(d for d in devices if d["driver"] == "nvidia")["device_ids"]
    gpus = worker_devices(Settings(worker_gpus=command[3]))
    assert gpus.kind == "cuda" and list(gpus.ids) == reserved  # it reserves exactly the GPUs it lists
    assert multi["ipc"] == "host" and multi["build"]["target"] == "worker"


def test_named_volumes_are_declared() -> None:
    used = {v.split(":", 1)[0] for s in SERVICES.values() for v in s.get("volumes", [])
            if not v.startswith((".", "/"))}
    assert used == set(COMPOSE["volumes"])


def test_every_cxrsynth_variable_is_a_setting() -> None:
    names = {k for s in SERVICES for k in environment(s) if k.startswith("CXRSYNTH_")}
    names |= {m.group(1) for m in INTERPOLATION.finditer(COMPOSE_TEXT) if m.group(1).startswith("CXRSYNTH_")}
    assert names, "compose sets no CXRSYNTH_ variable"
    unknown = sorted(n for n in names if setting_name(n) not in FIELDS)
    assert not unknown, f"not fields of Settings: {unknown}"


def test_env_example_covers_compose_and_names_only_settings() -> None:
    example = env_example()
    used = {m.group(1) for m in INTERPOLATION.finditer(COMPOSE_TEXT)}
    assert used - set(example) == set(), "variables compose reads but .env.example does not list"
    for name in example:
        if name.startswith("CXRSYNTH_"):
            assert setting_name(name) in FIELDS, f".env.example: {name} is not a setting"
        else:
            assert name in used, f".env.example: {name} is not used by docker-compose.yml"


@pytest.mark.parametrize("service", ["api", "worker", "migrate"])
def test_service_environment_makes_valid_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With .env.example's values, each service's environment is accepted by Settings as intended."""
    for key, value in environment(service).items():
        monkeypatch.setenv(key, interpolate(value, env_example()))
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.storage_backend == "s3" and not s.embedded
    assert s.database_url.startswith("postgresql+psycopg://") and "@postgres:5432/" in s.database_url
    assert s.broker_url.startswith("redis://redis:")
    assert s.s3_endpoint == "minio:9000" and s.s3_public_endpoint
    assert s.signing_secret.get_secret_value() == env_example()["CXRSYNTH_SIGNING_SECRET"]
    assert s.s3_secret_key.get_secret_value() == env_example()["MINIO_ROOT_PASSWORD"]
    if service == "worker":
        assert s.device == "cuda"


def test_dockerfile_stages() -> None:
    stages = dict(re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", DOCKERFILE, flags=re.MULTILINE | re.IGNORECASE))
    by_name = {name: image for image, name in stages.items()}
    assert {"api", "worker"} <= set(by_name)
    args: dict[str, str] = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE, flags=re.MULTILINE))
    api, worker = (args.get(by_name[n].strip("${}"), by_name[n]) for n in ("api", "worker"))
    assert api.startswith("python:3.11-slim")
    assert worker.startswith("nvidia/cuda:") and "runtime" in worker
    for name in ("api", "worker"):
        body = DOCKERFILE.split(f"AS {name}\n", 1)[1].split("\nFROM ", 1)[0]
        assert re.search(r"^USER\s+(?!root\b)\S+", body, flags=re.MULTILINE), f"{name} runs as root"
        assert "install --no-deps -e ." in body, f"{name} does not install the project"
    assert 'CMD ["cxrsynth", "worker"]' in DOCKERFILE
    assert '"app.main:create_app"' in DOCKERFILE and "--factory" in DOCKERFILE
