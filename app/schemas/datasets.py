"""Datasets: real (uploaded or a registered object prefix) and synthetic (made by generation jobs)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.release.writers import ExportFormat


class DatasetOut(BaseModel):
    """A dataset. Image ``file`` paths in the manifest are relative to ``prefix`` (``LABEL/NAME.png``)."""

    id: str
    name: str
    origin: Literal["real", "synthetic"]
    status: str = Field(description="pending | ready | failed | canceled")
    num_images: int
    label_counts: dict[str, int]
    prefix: str
    manifest_key: str | None
    card: dict[str, Any]
    privacy: dict[str, Any] | None = None
    gate_status: str = Field(description="Privacy gate of synthetic datasets: not_run | passed | failed.")
    gate_override: dict[str, Any] | None = Field(
        None, description="An admin's recorded override of the privacy gate (by, reason, at, gate_status).")
    source_job_id: str | None = None
    total_bytes: int
    created_at: datetime


class DatasetImage(BaseModel):
    """One manifest row with a short-lived signed URL of the image (for thumbnails)."""

    file: str
    label: str
    sha256: str
    url: str
    expires_at: datetime


class RegisterDatasetRequest(BaseModel):
    """Register images already in object storage under the tenant's key space
    (``tenants/{tenant}/...``), laid out as ``PREFIX/LABEL/NAME.png|jpg``. Nothing is copied."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    prefix: str = Field(min_length=1, max_length=1000)


# The export format registry is models/release/writers.py::EXPORT_FORMATS (this literal is checked against it).
DownloadFormat = ExportFormat
