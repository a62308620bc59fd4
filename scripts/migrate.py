"""Prepare a deployment's backing services: apply the Alembic migrations and create the S3 bucket.

The one-shot ``migrate`` service of ``docker-compose.yml`` runs this; it reads the usual
``CXRSYNTH_*`` settings and is safe to run any number of times.

    python scripts/migrate.py
"""

from __future__ import annotations

from app.core.config import Settings
from app.db.session import migrate


def prepare(settings: Settings) -> None:
    """Migrate the database to head, and create the bucket when the S3 backend is selected."""
    migrate(settings.database_url)
    print(f"database migrated: {settings.database_url.split('@')[-1]}")
    if settings.storage_backend == "s3":
        from app.storage.s3 import S3Store

        S3Store.from_settings(settings).ensure_bucket()
        print(f"bucket ready: {settings.s3_bucket} at {settings.s3_endpoint}")


if __name__ == "__main__":
    prepare(Settings())
