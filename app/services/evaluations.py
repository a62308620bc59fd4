"""Evaluation jobs: check an encoder (scratch, the tenant's own or a built-in) and a train/test dataset pair
in the task's layout (:mod:`app.services.ssl_jobs` defines the layouts), resolve the params the worker reads
(``app.schemas.jobs.EvaluationParams``), then submit through :func:`app.services.jobs.submit_job`. The API
never runs a model: everything here reads rows only.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.problems import Conflict, InvalidInput
from app.db.orm import Dataset, Encoder, Job, JobKind
from app.schemas.jobs import EvaluationDataset, EvaluationParams, EvaluationRequest
from app.services.jobs import submit_job
from app.services.model_assets import get_asset
from app.services.ssl_jobs import ENCODER_FORMAT, SCRATCH, SCRATCH_BACKBONES, dataset_layout, ready_dataset


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
    train = ready_dataset(session, tenant_id, req.train_dataset_id)
    test = ready_dataset(session, tenant_id, req.test_dataset_id)
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
