"""Generators and encoders: trained model folders (tenant-owned or built-in)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class ModelAssetOut(BaseModel):
    """Fields shared by generators and encoders."""

    id: str
    name: str
    status: str
    builtin: bool = Field(description="Shipped with the service (readable by every tenant).")
    config: dict[str, Any]
    metrics: dict[str, Any]
    card: str = Field(description="Model card (Markdown).")
    source_job_id: str | None = None
    created_at: datetime


class GeneratorOut(ModelAssetOut):
    """A diffusion generator; ``labels`` maps label names to class ids, ``resolution`` is in pixels."""

    labels: dict[str, int]
    resolution: int | None = None
    kind: str = Field("pixel", description="pixel (a UNet on pixels) or latent (autoencoder + UNet on its latents).")


class EncoderOut(ModelAssetOut):
    """A pretrained image encoder."""
