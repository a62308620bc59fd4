"""Alembic migrations: upgrade head on a fresh Postgres and SQLite, and the ORM matches the result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from minio import Minio
from sqlalchemy import inspect

from app.db.orm import Base
from app.db.session import get_engine, migrate
from tests.support import PostgresDatabases, S3Server, new_bucket_name

pytestmark = pytest.mark.integration


@pytest.fixture(params=["postgres", "sqlite"])
def fresh_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind the service supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    dbs: PostgresDatabases = request.getfixturevalue("postgres_databases")
    return dbs.create("migrations")


def schema_diffs(database_url: str) -> list[object]:
    """What autogenerate would write to make the database match the ORM (empty = in step)."""
    with get_engine(database_url).connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "compare_server_default": True})
        return list(compare_metadata(context, Base.metadata))


def test_upgrade_head_matches_orm(fresh_database_url: str) -> None:
    migrate(fresh_database_url)
    tables = set(inspect(get_engine(fresh_database_url)).get_table_names())
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables
    assert schema_diffs(fresh_database_url) == []
    migrate(fresh_database_url)  # idempotent: the service runs it on every start
    assert schema_diffs(fresh_database_url) == []


def test_migrate_script_prepares_database_and_bucket(
        postgres_databases: PostgresDatabases, seaweed: S3Server, tmp_path: Path) -> None:
    """``scripts/migrate.py`` (compose's one-shot ``migrate`` service) from the environment alone."""
    url, bucket = postgres_databases.create("script"), new_bucket_name()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRSYNTH_")}
    env.update({
        "CXRSYNTH_DATA_DIR": str(tmp_path / "data"), "CXRSYNTH_DATABASE_URL": url,
        "CXRSYNTH_STORAGE_BACKEND": "s3", "CXRSYNTH_S3_ENDPOINT": seaweed.endpoint,
        "CXRSYNTH_S3_ACCESS_KEY": seaweed.access_key, "CXRSYNTH_S3_SECRET_KEY": seaweed.secret_key,
        "CXRSYNTH_S3_REGION": seaweed.region, "CXRSYNTH_S3_BUCKET": bucket,
    })
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    script = root / "scripts" / "migrate.py"
    for _ in range(2):  # a second run changes nothing and still succeeds
        done = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert schema_diffs(url) == []
    client = Minio(seaweed.endpoint, seaweed.access_key, seaweed.secret_key, secure=False,
                   region=seaweed.region)
    assert client.bucket_exists(bucket)
