"""The shared fixtures give what they promise (so other tests can rely on them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from app.core.config import Settings
from app.db.session import get_engine
from app.storage import build_store
from app.storage.s3 import S3Store
from tests.support import SettingsFactory

pytestmark = pytest.mark.integration


def test_real_stack_settings(settings_factory: SettingsFactory, tmp_path: Path) -> None:
    s = settings_factory(tmp_path, stack="real", max_images_per_job=7)
    assert s.database_url.startswith("postgresql+psycopg://") and s.broker_url.startswith("redis://")
    assert s.storage_backend == "s3" and not s.embedded and s.max_images_per_job == 7
    with get_engine(s.database_url).connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
    assert redis.Redis.from_url(s.broker_url).ping()
    store = build_store(s)
    assert isinstance(store, S3Store) and list(store.list("")) == []
    other = settings_factory(tmp_path, stack="real")
    assert other.s3_bucket != s.s3_bucket  # a fresh bucket per call


def test_embedded_settings(settings_factory: SettingsFactory, tmp_path: Path) -> None:
    s = settings_factory(tmp_path)
    assert s.embedded and s.storage_backend == "local"
    assert s.database_url == f"sqlite:///{tmp_path / 'cxrsynth' / 'cxrsynth.db'}"
    assert s.storage_dir == tmp_path / "cxrsynth" / "objects"


def test_s3_settings_bucket_is_empty(s3_settings: Settings) -> None:
    store = S3Store.from_settings(s3_settings)
    assert store.client.bucket_exists(s3_settings.s3_bucket)
    assert list(store.list("")) == []


def test_shared_data_layout(shared_data: Path) -> None:
    assert (shared_data / "pneumoniamnist" / "pneumoniamnist_28.npz").is_file()
    assert (shared_data / "kermany-pneumonia" / "labels.csv").is_file()
