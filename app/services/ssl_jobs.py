"""Pretraining jobs: validate a request against the tenant's datasets, resolve the params the worker reads
(``app.schemas.jobs``), then submit through :func:`app.services.jobs.submit_job`. Evaluation jobs live in
:mod:`app.services.evaluations` and share the dataset layouts defined here.

Datasets come in two layouts, told apart by their labels: an ImageFolder (``LABEL/NAME.png``: real or
synthetic X-rays) and the segmentation layout, whose two "labels" are ``images`` and ``masks``
(``images/NAME.png`` + ``masks/NAME.png``, as a zip of ``lung-seg`` uploads). The API never runs a model:
everything here reads rows only.
"""

from __future__ import annotations

import math
from typing import Literal

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.problems import Conflict, InvalidInput
from app.db.orm import Dataset, Job, JobKind
from app.schemas.jobs import (
    MAX_PRETRAINING_STEPS,
    PretrainingDataset,
    PretrainingParams,
    PretrainingRequest,
)
from app.services.datasets import get_dataset
from app.services.generations import random_seed
from app.services.jobs import submit_job

SEGMENTATION_LABELS = frozenset({"images", "masks"})
DEFAULT_EPOCHS = 100
SCRATCH = "scratch"
# The backbones a scratch baseline may name: those PretrainingRequest accepts.
SCRATCH_BACKBONES = ("resnet18", "resnet50", "vit_small_patch16_224")
# ``format`` of an encoder's config.json written by models.ssl.export (FORMAT there; a unit test keeps
# them equal): the API checks it without importing the model stack.
ENCODER_FORMAT = "cxrsynth-encoder/1"


def steps_for_epochs(epochs: int, num_images: int, batch_size: int) -> int:
    """Optimiser steps that show every image ``epochs`` times on average (at least one step)."""
    return max(1, math.ceil(epochs * num_images / batch_size))


def dataset_layout(ds: Dataset) -> Literal["imagefolder", "segmentation"]:
    """``segmentation`` when the dataset's labels are exactly ``images`` and ``masks``."""
    return "segmentation" if set(ds.label_counts or {}) == SEGMENTATION_LABELS else "imagefolder"


def ready_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    """The tenant's dataset (404 otherwise), ready (409) and non-empty (422)."""
    ds = get_dataset(session, tenant_id, dataset_id)
    if ds.status != "ready" or not ds.manifest_key:
        raise Conflict(f"dataset {ds.id} is {ds.status}, not ready", slug="not-ready")
    if ds.num_images <= 0:
        raise InvalidInput(f"dataset {ds.id} has no images", slug="empty-dataset")
    return ds


# --------------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------------
def plan_pretraining(session: Session, tenant_id: str, req: PretrainingRequest) -> PretrainingParams:
    """Check every dataset (the tenant's, ready, with images) and resolve steps and seed."""
    datasets: list[PretrainingDataset] = []
    for dataset_id in req.dataset_ids:
        ds = ready_dataset(session, tenant_id, dataset_id)
        layout = dataset_layout(ds)
        n = int((ds.label_counts or {}).get("images", 0)) if layout == "segmentation" else ds.num_images
        datasets.append(PretrainingDataset(id=ds.id, prefix=ds.prefix, origin=ds.origin, num_images=n,
                                           layout=layout))
    total = sum(d.num_images for d in datasets)
    steps = req.steps or steps_for_epochs(req.epochs or DEFAULT_EPOCHS, total, req.batch_size)
    if steps > MAX_PRETRAINING_STEPS:
        raise InvalidInput(f"{steps:,} steps ({req.epochs or DEFAULT_EPOCHS} epochs of {total:,} images at batch "
                           f"{req.batch_size}) is over the limit of {MAX_PRETRAINING_STEPS:,}; give fewer epochs "
                           "or steps", slug="too-many-steps", limit=MAX_PRETRAINING_STEPS)
    return PretrainingParams(
        dataset_ids=list(req.dataset_ids), datasets=datasets, num_images=total, name=req.name, method=req.method,
        backbone=req.backbone, resolution=req.resolution,
        epochs=None if req.steps else (req.epochs or DEFAULT_EPOCHS), steps=steps, batch_size=req.batch_size,
        learning_rate=req.learning_rate, fp16=req.fp16, seed=req.seed if req.seed is not None else random_seed(),
        gpus=req.gpus,
    )


def create_pretraining(
    session: Session, settings: Settings, tenant_id: str, req: PretrainingRequest,
    idempotency_key: str | None = None, *, enqueue: bool = True,
) -> tuple[Job, bool]:
    """Submit a pretraining job; returns ``(job, created)`` (``enqueue=False``: record only, for the CLI)."""
    return submit_job(session, settings, tenant_id, JobKind.pretraining, req,
                      lambda: plan_pretraining(session, tenant_id, req),
                      idempotency_key=idempotency_key, webhook_url=req.webhook_url, enqueue=enqueue)
