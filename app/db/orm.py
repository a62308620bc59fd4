"""SQLAlchemy ORM tables. Every tenant-owned row carries ``tenant_id``; queries always filter on it.

Generators with ``tenant_id IS NULL`` are built-in (shipped with the service) and readable by every
tenant, never writable.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    """Timezone-aware now (UTC)."""
    return datetime.now(UTC)


def new_id() -> str:
    """A random UUID4 as 32 hex characters: unguessable, so ids never leak across tenants."""
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    """Declarative base; ``type_annotation_map`` makes datetimes timezone-aware everywhere."""

    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSONType}  # noqa: RUF012


class JobKind(enum.StrEnum):
    generator_training = "generator_training"
    generation = "generation"
    pretraining = "pretraining"
    evaluation = "evaluation"


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


ACTIVE_STATUSES = (JobStatus.queued.value, JobStatus.running.value)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # Signs this tenant's webhooks (shown once at creation, like the API key; needed in clear to sign).
    webhook_secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key, stored as SHA-256 of the secret (keys are 256-bit random, so no slow hash needed)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="default")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_message: Mapped[str] = mapped_column(Text, default="")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    compute_seconds: Mapped[float] = mapped_column(Float, default=0.0)


class JobShard(Base):
    """One Celery task's slice of a job (a generation of N images runs as ceil(N/shard) shards)."""

    __tablename__ = "job_shards"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    start: Mapped[int] = mapped_column(Integer)
    stop: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    done_items: Mapped[int] = mapped_column(Integer, default=0)
    compute_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEvent(Base):
    """Progress and log lines of a job, streamed by ``GET /v1/jobs/{id}/events``."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text, default="")
    step: Mapped[int | None] = mapped_column(Integer, default=None)
    total: Mapped[int | None] = mapped_column(Integer, default=None)


class Dataset(Base):
    """Real (uploaded / registered prefix) or synthetic (made by a generation job, immutable) images."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    origin: Mapped[str] = mapped_column(String(16))  # "real" | "synthetic"
    status: Mapped[str] = mapped_column(String(16), default="ready")  # "pending" | "ready" | "failed"
    prefix: Mapped[str] = mapped_column(Text)  # object-store key prefix of the images
    num_images: Mapped[int] = mapped_column(Integer, default=0)
    label_counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    manifest_key: Mapped[str | None] = mapped_column(Text, default=None)
    card: Mapped[dict[str, Any]] = mapped_column(default=dict)
    privacy: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    gate_status: Mapped[str] = mapped_column(String(16), default="not_run")  # not_run|passed|failed
    gate_override: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    source_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class _ModelAsset:
    """Columns shared by generators and encoders: tenant-owned files under ``prefix``, or a built-in
    folder on local disk (``tenant_id`` NULL, readable by every tenant)."""

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="ready")
    prefix: Mapped[str | None] = mapped_column(Text, default=None)
    builtin_path: Mapped[str | None] = mapped_column(Text, default=None)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    card: Mapped[str] = mapped_column(Text, default="")
    source_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Generator(_ModelAsset, Base):
    """A trained diffusion generator (diffusers layout + ``cxrsynth.json`` + model card)."""

    __tablename__ = "generators"


class Encoder(_ModelAsset, Base):
    """A pretrained encoder (``model.safetensors`` + ``config.json`` + model card)."""

    __tablename__ = "encoders"


class WebhookDelivery(Base):
    """One attempt log of a job-completion webhook (retried with backoff by the worker)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|delivered|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
