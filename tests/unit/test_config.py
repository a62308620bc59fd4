"""Settings: embedded defaults with no environment, and the ``CXRSYNTH_`` environment prefix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.config import REPO_ROOT, Settings


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory without ``.env``, and ``data_dir`` in ``tmp_path`` (not ``~/.cxrsynth``)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CXRSYNTH_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def test_embedded_defaults_need_no_environment(tmp_path: Path) -> None:
    """A fresh interpreter with an empty HOME and no CXRSYNTH_ variable gets a working embedded setup."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRSYNTH_")}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO_ROOT))
    probe = textwrap.dedent("""
        import json
        from app.core.config import Settings
        a, b = Settings(), Settings()
        print(json.dumps({"data_dir": str(a.data_dir), "database_url": a.database_url,
                          "broker_url": a.broker_url, "embedded": a.embedded,
                          "storage_backend": a.storage_backend, "storage_dir": str(a.storage_dir),
                          "secret_len": len(a.signing_secret.get_secret_value()),
                          "secret_kept": a.signing_secret == b.signing_secret}))
    """)
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    s = json.loads(done.stdout)
    data_dir = tmp_path / "home" / ".cxrsynth"
    assert s["data_dir"] == str(data_dir)
    assert s["database_url"] == f"sqlite:///{data_dir / 'cxrsynth.db'}"
    assert s["broker_url"] == "filesystem://" and s["embedded"]
    assert s["storage_backend"] == "local" and s["storage_dir"] == str(data_dir / "objects")
    # A signing key is generated once and kept (owner-only), so signed URLs survive a restart.
    assert s["secret_len"] >= 32 and s["secret_kept"]
    assert (data_dir / "secret.key").stat().st_mode & 0o077 == 0


def test_env_prefix(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXRSYNTH_DATABASE_URL", "postgresql+psycopg://u@db:5432/cxr")
    monkeypatch.setenv("CXRSYNTH_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("CXRSYNTH_STORAGE_BACKEND", "s3")
    monkeypatch.setenv("CXRSYNTH_S3_SECRET_KEY", "from-env")
    monkeypatch.setenv("CXRSYNTH_MAX_IMAGES_PER_JOB", "5")
    monkeypatch.setenv("DATABASE_URL", "sqlite:///unprefixed-is-ignored.db")
    s = Settings()
    assert s.database_url == "postgresql+psycopg://u@db:5432/cxr"
    assert s.broker_url == "redis://redis:6379/0" and not s.embedded
    assert s.storage_backend == "s3"
    assert s.s3_secret_key.get_secret_value() == "from-env"
    assert "from-env" not in repr(s)  # secrets are masked
    assert s.max_images_per_job == 5


def test_dotenv_file_in_working_directory(home: Path, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("CXRSYNTH_MAX_JOBS_IN_FLIGHT_PER_TENANT=3\n")
    assert Settings().max_jobs_in_flight_per_tenant == 3


@pytest.mark.parametrize(("name", "value"), [("CXRSYNTH_STORAGE_BACKEND", "ftp"),
                                             ("CXRSYNTH_MAX_IMAGES_PER_JOB", "0"),
                                             ("CXRSYNTH_SIGNED_URL_TTL_S", "not-a-number")])
def test_invalid_values_are_refused(home: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()
