"""One pydantic-settings ``Settings`` for the API, the worker and the CLI.

Every setting has an embedded default, so ``cxrsynth serve`` runs on one machine with no environment
variable: SQLite and a local object folder under ``data_dir``, a filesystem Celery broker, and a worker
process started by ``serve``. Production sets ``CXRSYNTH_DATABASE_URL`` (Postgres),
``CXRSYNTH_BROKER_URL`` (Redis) and ``CXRSYNTH_STORAGE_BACKEND=s3`` with the ``CXRSYNTH_S3_*`` settings.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
WEIGHTS_DIR = REPO_ROOT / "models" / "weights"


class Settings(BaseSettings):
    """Service configuration; env prefix ``CXRSYNTH_`` (e.g. ``CXRSYNTH_DATABASE_URL``)."""

    model_config = SettingsConfigDict(env_prefix="CXRSYNTH_", env_file=".env", extra="ignore")

    # --- embedded defaults -------------------------------------------------------------------
    data_dir: Path = Field(default=Path.home() / ".cxrsynth", description="Root of embedded state.")
    database_url: str = Field(default="", description="SQLAlchemy URL; empty = SQLite in data_dir.")
    broker_url: str = Field(default="", description="Celery broker; empty = filesystem queue in data_dir.")
    storage_backend: Literal["local", "s3"] = Field(default="local", description="Object store: local folder or S3.")
    storage_dir: Path | None = Field(default=None, description="Local object folder; default data_dir/objects.")

    # --- S3 (minio client) ---------------------------------------------------------------------
    s3_endpoint: str = Field(default="127.0.0.1:9000", description="S3 host:port the service talks to.")
    s3_access_key: str = Field(default="cxrsynth", description="S3 access key.")
    s3_secret_key: SecretStr = Field(default=SecretStr("cxrsynth-secret"), description="S3 secret key.")
    s3_bucket: str = Field(default="cxrsynth", description="Bucket of every object.")
    s3_region: str = Field(default="us-east-1", description="Explicit region (no location lookup).")
    s3_secure: bool = Field(default=False, description="Use HTTPS to reach S3.")
    s3_public_endpoint: str = Field(default="", description="Host clients use for presigned URLs.")

    # --- API -----------------------------------------------------------------------------------
    public_base_url: str = Field(default="http://127.0.0.1:8000", description="Base of links the API hands out.")
    signing_secret: SecretStr = Field(default=SecretStr(""), description="HMAC key for signed URLs.")
    signed_url_ttl_s: int = Field(default=900, ge=1, le=7 * 24 * 3600)
    admin_token: SecretStr = Field(default=SecretStr(""), description="Enables admin endpoints when set.")
    auth_cache_ttl_s: float = Field(default=5.0, ge=0, le=300, description="Seconds an API process reuses a "
                                    "valid API key's lookup (0: look up every request). A key revoked by another "
                                    "process (the CLI) stops working within this time; in the revoking one at once.")
    console_session_ttl_s: int = Field(default=8 * 3600, ge=60, le=7 * 24 * 3600,
                                       description="Web console login lifetime (signed cookie).")

    # --- limits --------------------------------------------------------------------------------
    max_images_per_job: int = Field(default=10_000, ge=1, description="Most images one generation job may ask for "
                                    "(larger n or counts get a 422); raise it for a large pretraining set, e.g. "
                                    "20000.")
    max_jobs_in_flight_per_tenant: int = Field(default=8, ge=1)
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    max_upload_files: int = Field(default=200_000, ge=1)
    max_uncompressed_bytes: int = Field(default=4 * 1024 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    max_compression_ratio: float = Field(default=200.0, gt=1)
    page_size_max: int = Field(default=200, ge=1, description="Largest page of a list endpoint.")

    # --- worker --------------------------------------------------------------------------------
    shard_size: int = Field(default=64, ge=1, description="Images per generation shard task.")
    task_time_limit_s: int = Field(default=24 * 3600, ge=60, description="Hard time limit of one task.")
    visibility_timeout_s: int = Field(default=26 * 3600, description="Above the longest job.")
    max_task_attempts: int = Field(default=3, ge=1, description="Deliveries before a job fails.")
    privacy_max_attempts: int = Field(default=4, ge=1, description="Samples (seeds) tried per image before "
                                      "the memorisation gate fails it.")
    device: str = Field(default="auto", description="Worker device: auto (CUDA if present), cpu, cuda.")
    worker_gpus: str = Field(default="", description="Devices this worker's multi-GPU process trains a job "
                             "with gpus > 1 on: GPU ids (`0,1,2,3`, set by `cxrsynth worker --gpus`) or `cpu:N` "
                             "(N gloo processes on the CPU); empty: none.")
    compile_unet: bool = Field(default=False, description="torch.compile the generator UNet in workers: "
                               "1.15-1.4x faster sampling after a one-off compile per process (~90 s on a "
                               "2-core CPU); rare pixels may differ by one grey level from eager sampling.")
    generation_cpu_bf16: bool = Field(default=False, description="bf16 autocast for sampling on CPUs with "
                                      "native bf16 (AVX512-BF16/AMX): 1.27x faster at 224 px on a 2-core EPYC, "
                                      "pixels within 0.38 grey levels on average of fp32, identical run to run; "
                                      "off by default because the quality figures were measured in fp32.")
    default_generator_dir: Path = Field(default=WEIGHTS_DIR / "generator-kermany-224",
                                        description="Built-in generator used when a request names none; the "
                                        "other generator-* folders beside it are built-ins too.")
    webhook_max_attempts: int = Field(default=6, ge=1, description="Deliveries tried per webhook.")
    webhook_backoff_s: float = Field(default=2.0, ge=0, description="First retry delay; doubles each time.")
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="Timeout of one webhook POST.")

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'cxrsynth.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.storage_dir is None:
            self.storage_dir = self.data_dir / "objects"
        if not self.signing_secret.get_secret_value():
            self.signing_secret = SecretStr(_persistent_secret(self.data_dir))
        return self

    @property
    def embedded(self) -> bool:
        """True when the broker is the local filesystem queue (``cxrsynth serve`` on one machine)."""
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        """Folder of the filesystem broker's messages (embedded mode)."""
        return self.data_dir / "broker"


def _persistent_secret(data_dir: Path) -> str:
    """A random signing key kept in ``data_dir/secret.key`` so signed URLs survive restarts."""
    path = data_dir / "secret.key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(32)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(key)
        tmp.chmod(0o600)
        tmp.replace(path)
        return path.read_text().strip()


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests build their own ``Settings`` instead)."""
    return Settings()
