"""Pretraining and evaluation jobs: validate a request against the tenant's datasets and encoders, resolve
the params the worker reads (``app.schemas.jobs``), then submit through :func:`app.services.jobs.submit_job`.

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
from app.db.orm import Dataset, Encoder, Job, JobKind
from app.schemas.jobs import (
    MAX_PRETRAINING_STEPS,
    EvaluationDataset,
    EvaluationParams,
    EvaluationRequest,
    PretrainingDataset,
    PretrainingParams,
    PretrainingRequest,
)
from app.services.datasets import get_dataset
from app.services.generations import random_seed
from app.services.jobs import submit_job
from app.services.model_assets import get_asset

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


def _ready_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
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
        ds = _ready_dataset(session, tenant_id, dataset_id)
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
    )


def create_pretraining(
    session: Session, settings: Settings, tenant_id: str, req: PretrainingRequest,
    idempotency_key: str | None = None, *, enqueue: bool = True,
) -> tuple[Job, bool]:
    """Submit a pretraining job; returns ``(job, created)`` (``enqueue=False``: record only, for the CLI)."""
    return submit_job(session, settings, tenant_id, JobKind.pretraining, req,
                      lambda: plan_pretraining(session, tenant_id, req),
                      idempotency_key=idempotency_key, webhook_url=req.webhook_url, enqueue=enqueue)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
def resolve_evaluation_encoder(session: Session, tenant_id: str, encoder_id: str) -> tuple[str, str | None, bool]:
    """``(encoder, encoder_id, builtin)`` for ``scratch``, ``scratch:<backbone>`` or an encoder id the
    tenant may use (its own or built-in; 404 otherwise), which must be ready (409) and a cxrsynth
    encoder export (422)."""
    text = encoder_id.strip()
    if text == SCRATCH or text.startswith(SCRATCH + ":"):
        name = text.split(":", 1)[1] if ":" in text else SCRATCH_BACKBONES[0]
        if name not in SCRATCH_BACKBONES:
            raise InvalidInput(f"unknown scratch backbone {name!r}; choose one of {', '.join(SCRATCH_BACKBONES)}",
                               slug="unknown-backbone", allowed=list(SCRATCH_BACKBONES))
        return f"{SCRATCH}:{name}", None, False
    enc = get_asset(session, Encoder, tenant_id, text)
    if enc.status != "ready":
        raise Conflict(f"encoder {enc.id} is {enc.status}, not ready", slug="not-ready")
    if (enc.config or {}).get("format") != ENCODER_FORMAT:
        raise InvalidInput(f"encoder {enc.name} is not a {ENCODER_FORMAT} export and cannot be evaluated",
                           slug="not-evaluable")
    return enc.id, enc.id, enc.tenant_id is None


def _check_pair(task: str, train: Dataset, test: Dataset) -> None:
    for role, ds in (("train", train), ("test", test)):
        layout = dataset_layout(ds)
        counts = {k: int(v) for k, v in (ds.label_counts or {}).items()}
        if task == "segmentation":
            if layout != "segmentation":
                raise InvalidInput(f"{role} dataset {ds.id} is not in the segmentation layout (images/NAME.png + "
                                   f"masks/NAME.png); its labels are {sorted(counts)}", slug="wrong-dataset-layout")
            if counts["images"] != counts["masks"]:
                raise InvalidInput(f"{role} dataset {ds.id} has {counts['images']} images but {counts['masks']} "
                                   "masks", slug="wrong-dataset-layout")
        else:
            if layout == "segmentation":
                raise InvalidInput(f"{role} dataset {ds.id} is a segmentation dataset (images/ + masks/); "
                                   "classification needs two label folders", slug="wrong-dataset-layout")
            if len(counts) != 2:
                raise InvalidInput(f"{role} dataset {ds.id} has {len(counts)} label(s) {sorted(counts)}; "
                                   "classification needs exactly two (e.g. normal and pneumonia)",
                                   slug="wrong-dataset-layout")
    if task == "classification" and set(train.label_counts) != set(test.label_counts):
        raise InvalidInput(f"train labels {sorted(train.label_counts)} differ from test labels "
                           f"{sorted(test.label_counts)}", slug="label-mismatch")


def plan_evaluation(session: Session, tenant_id: str, req: EvaluationRequest) -> EvaluationParams:
    """Check the encoder and the two datasets (the tenant's, ready, different, in the task's layout)."""
    if req.train_dataset_id == req.test_dataset_id:
        raise InvalidInput("the test dataset is the training dataset: give a separate test dataset",
                           slug="same-dataset")
    encoder, encoder_id, builtin = resolve_evaluation_encoder(session, tenant_id, req.encoder_id)
    train = _ready_dataset(session, tenant_id, req.train_dataset_id)
    test = _ready_dataset(session, tenant_id, req.test_dataset_id)
    _check_pair(req.task, train, test)

    def summary(ds: Dataset) -> EvaluationDataset:
        return EvaluationDataset(id=ds.id, prefix=ds.prefix, num_images=ds.num_images,
                                 label_counts={k: int(v) for k, v in (ds.label_counts or {}).items()})

    mode = req.mode or ("linear" if req.task == "classification" else "finetune")
    return EvaluationParams(
        encoder=encoder, encoder_id=encoder_id, encoder_builtin=builtin, task=req.task, mode=mode,
        label_fraction=req.label_fraction, epochs=req.epochs, resolution=req.resolution, seed=req.seed,
        train_dataset=summary(train), test_dataset=summary(test),
    )


def create_evaluation(
    session: Session, settings: Settings, tenant_id: str, req: EvaluationRequest,
    idempotency_key: str | None = None, *, enqueue: bool = True,
) -> tuple[Job, bool]:
    """Submit an evaluation job; returns ``(job, created)``."""
    return submit_job(session, settings, tenant_id, JobKind.evaluation, req,
                      lambda: plan_evaluation(session, tenant_id, req),
                      idempotency_key=idempotency_key, webhook_url=req.webhook_url, enqueue=enqueue)
