"""Dataset release: an export being built (202), the admin's privacy-gate override."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.datasets import DatasetOut


class ExportPending(BaseModel):
    """``202``: the export in this format is being built by a worker; ask again after ``retry_after_s``."""

    status: Literal["building"] = "building"
    dataset_id: str
    format: str
    attempt: int = Field(description="Build attempt (a failed build is retried a few times).")
    images_done: int | None = Field(None, description="Images written so far, when the worker has reported.")
    retry_after_s: int
    detail: str


class GateOverrideRequest(BaseModel):
    """Allow downloads of a synthetic dataset whose privacy gate failed or was not run. Recorded."""

    model_config = ConfigDict(extra="forbid")

    actor: str = Field(min_length=1, max_length=200, description="Who decides (name or e-mail of the admin).")
    reason: str = Field(min_length=10, max_length=2000, description="Why releasing this dataset is acceptable.")


class GateOverride(BaseModel):
    """A recorded override of the privacy gate."""

    by: str
    reason: str
    at: datetime
    gate_status: str = Field(description="The gate's result when the override was made.")


class AdminDatasetOut(DatasetOut):
    """A dataset as the admin sees it: with its tenant."""

    tenant_id: str
