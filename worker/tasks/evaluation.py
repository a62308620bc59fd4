"""Evaluation jobs (a single task each, on the GPU queue): the train and test datasets and the encoder
(downloaded, or the built-in folder, or a scratch backbone) -> ``models.evaluation`` -> the report in
``Job.result`` and, for the tenant's own encoders, a summary in ``Encoder.metrics["evaluations"]``.
Evaluations are short and deterministic for a seed, so a redelivered one simply runs again.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.db.orm import Encoder, JobStatus, utcnow
from app.schemas.jobs import EvaluationParams, EvaluationResult
from models.callbacks import Canceled
from worker.runtime import (
    WorkerContext,
    begin_job,
    cancel_or_fail,
    download_prefix,
    load_job,
    make_progress_callback,
    mark_failed,
    mark_running,
    public_error,
    record_event,
)
from worker.tasks.ssl import own_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _EvaluationClaim:
    """What the first transaction of an evaluation hands on: the request and where its encoder lives."""

    params: EvaluationParams
    tenant_id: str
    encoder_builtin_path: str | None  # a built-in encoder's folder
    encoder_prefix: str | None  # or the store prefix of a tenant's encoder


def _claim_evaluation(ctx: WorkerContext, job_id: str) -> _EvaluationClaim | None:
    """Transaction 1: start the job, check that its datasets and encoder exist and are ready, mark it running."""
    with ctx.sessions.begin() as s:
        job = begin_job(s, ctx.settings, job_id)
        if job is None:
            return None
        params = EvaluationParams.model_validate(job.params)
        missing = [d.id for d in (params.train_dataset, params.test_dataset) if own_dataset(s, job, d.id) is None]
        if missing:
            mark_failed(s, job, "dataset not found", f"dataset(s) {', '.join(missing)} are gone or not ready")
            return None
        enc_source: tuple[str | None, str | None] = (None, None)  # (builtin folder, store prefix)
        if params.encoder_id is not None:
            enc = s.get(Encoder, params.encoder_id)
            if enc is None or enc.status != "ready" or enc.tenant_id not in (None, job.tenant_id):
                mark_failed(s, job, "encoder not found", f"encoder {params.encoder_id} is gone or not ready")
                return None
            enc_source = (enc.builtin_path, enc.prefix) if enc.tenant_id is None else (None, enc.prefix)
        mark_running(s, job)
        return _EvaluationClaim(params, job.tenant_id, *enc_source)


def _download_datasets(ctx: WorkerContext, params: EvaluationParams, work: Path) -> tuple[Path, Path]:
    """The train and test datasets as local folders under ``work``; ``ValueError`` for an empty one."""
    train_dir, test_dir = work / "train", work / "test"
    for role, d, folder in (("train", params.train_dataset, train_dir), ("test", params.test_dataset, test_dir)):
        if download_prefix(ctx.store, d.prefix, folder) == 0:
            raise ValueError(f"the {role} dataset {d.id} has no images in the store")
    return train_dir, test_dir


def _evaluation_encoder(ctx: WorkerContext, claim: _EvaluationClaim, work: Path) -> str | Path:
    """The encoder to evaluate: a named backbone, a built-in folder, or a tenant's encoder downloaded to ``work``."""
    params = claim.params
    encoder: str | Path = params.encoder
    if params.encoder_id is not None:
        if claim.encoder_builtin_path:
            encoder = Path(claim.encoder_builtin_path)
        else:
            if not claim.encoder_prefix:
                raise ValueError(f"encoder {params.encoder_id} has no files")
            encoder = work / "encoder"
            download_prefix(ctx.store, claim.encoder_prefix, encoder, skip=("exports/",))
    return encoder


def _run_evaluation(ctx: WorkerContext, job_id: str, params: EvaluationParams, encoder: str | Path, train_dir: Path,
                    test_dir: Path) -> dict[str, Any]:
    """``models.evaluation``'s classification or segmentation protocol; returns its report."""
    from models.evaluation import (
        ClassificationConfig,
        SegmentationConfig,
        evaluate_classification,
        evaluate_segmentation,
    )

    on_step = make_progress_callback(ctx, job_id)
    kwargs: dict[str, Any] = {"seed": params.seed, "resolution": params.resolution}
    if params.epochs is not None:
        kwargs["epochs"] = params.epochs
    if params.task == "classification":
        return evaluate_classification(encoder, train_dir, test_dir, mode=params.mode,
                                       label_fraction=params.label_fraction,
                                       config=ClassificationConfig(**kwargs), on_step=on_step,
                                       device=ctx.settings.device)
    return evaluate_segmentation(encoder, train_dir, test_dir, mode=params.mode,
                                 label_fraction=params.label_fraction,
                                 config=SegmentationConfig(**kwargs), on_step=on_step,
                                 device=ctx.settings.device)


def _end_evaluation(ctx: WorkerContext, job_id: str, failure: tuple[str, str] | None = None) -> None:
    """Transaction: the job is canceled, or fails with ``failure`` = (title, detail)."""
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id)
        if job is not None:
            cancel_or_fail(s, job, failure)


def _complete_evaluation(ctx: WorkerContext, job_id: str, claim: _EvaluationClaim, report: dict[str, Any]) -> None:
    """Transaction 2 (job row locked): the job succeeds with the report; a tenant's encoder records its summary."""
    params = claim.params
    # Worker paths mean nothing to the client: name the datasets and the encoder instead.
    report["train_data"] = f"dataset {params.train_dataset.id}"
    report["test_data"] = f"dataset {params.test_dataset.id}"
    report["encoder"]["source"] = params.encoder if params.encoder_id is None else f"encoder {params.encoder_id}"
    result = EvaluationResult(task=params.task, mode=params.mode, label_fraction=params.label_fraction,
                              encoder=params.encoder, metrics=report["metrics"], report=report)
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id, lock=True)
        if job is None or JobStatus(job.status).terminal:
            return
        job.status = JobStatus.succeeded.value
        job.finished_at = utcnow()
        job.compute_seconds = float(report.get("wall_seconds", 0.0))
        job.result = result.model_dump(mode="json")
        record_event(s, job_id, "evaluation finished")
        if params.encoder_id is not None and not params.encoder_builtin:
            _record_on_encoder(s, params, job_id, claim.tenant_id, report)


def evaluate_job(ctx: WorkerContext, job_id: str) -> None:
    """Run one evaluation job end to end: claim it, download its inputs, evaluate, record the report."""
    import models.evaluation  # noqa: F401  (imported before the job is claimed: a broken install leaves it queued)

    claim = _claim_evaluation(ctx, job_id)
    if claim is None:
        return
    work = Path(tempfile.mkdtemp(prefix=f"cxrsynth-eval-{job_id[:8]}-"))
    try:
        train_dir, test_dir = _download_datasets(ctx, claim.params, work)
        encoder = _evaluation_encoder(ctx, claim, work)
        report = _run_evaluation(ctx, job_id, claim.params, encoder, train_dir, test_dir)
    except Canceled:
        _end_evaluation(ctx, job_id)
        return
    except Exception as exc:
        log.exception("evaluation %s failed", job_id)
        _end_evaluation(ctx, job_id, ("evaluation failed", public_error(exc, work)))
        return
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _complete_evaluation(ctx, job_id, claim, report)


def _record_on_encoder(s: Any, params: EvaluationParams, job_id: str, tenant_id: str, report: dict[str, Any]) -> None:
    """Add the evaluation's summary to the tenant's own encoder (row locked: concurrent jobs both land)."""
    enc = s.scalar(select(Encoder).where(Encoder.id == params.encoder_id, Encoder.tenant_id == tenant_id)
                   .with_for_update())
    if enc is None:
        return
    metrics = dict(enc.metrics or {})
    evaluations = dict(metrics.get("evaluations") or {})
    key = f"{params.task}/{params.mode}/{params.label_fraction:g}/{params.test_dataset.id}"
    evaluations[key] = {
        "job_id": job_id, "task": params.task, "mode": params.mode, "label_fraction": params.label_fraction,
        "train_dataset_id": params.train_dataset.id, "test_dataset_id": params.test_dataset.id,
        "metrics": {k: {"value": v["value"], "low": v["low"], "high": v["high"]} for k, v in report["metrics"].items()},
        "finished_at": utcnow().isoformat(),
    }
    enc.metrics = {**metrics, "evaluations": evaluations}  # a new dict, so the JSON column is written
