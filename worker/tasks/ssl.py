"""Pretraining and evaluation jobs (single task each, on the GPU queue).

``pretrain_job``: dataset objects -> one local image folder -> ``models.ssl.pretrain`` (checkpointed under
``data_dir/checkpoints/<job id>``, so a redelivered task resumes) -> the encoder folder uploaded under
``tenant_key(t, "encoders", id)`` -> the ``Encoder`` row ready.

``evaluate_job``: the train and test datasets and the encoder (downloaded, or the built-in folder, or a
scratch backbone) -> ``models.evaluation`` -> the report in ``Job.result`` and, for the tenant's own
encoders, a summary in ``Encoder.metrics["evaluations"]``. Evaluations are short and deterministic for
a seed, so a redelivered one simply runs again.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.db.orm import Dataset, Encoder, Job, JobStatus, utcnow
from app.schemas.jobs import EvaluationParams, EvaluationResult, PretrainingDataset, PretrainingParams
from app.storage.base import tenant_key
from models.callbacks import Canceled
from models.data.folders import IMAGE_SUFFIXES
from worker.runtime import (
    WorkerContext,
    begin_job,
    complete_model_job,
    download_prefix,
    end_model_job,
    load_job,
    make_progress_callback,
    mark_canceled,
    mark_failed,
    mark_running,
    public_error,
    record_event,
    upload_folder,
)

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "scratch:"


def _own_dataset(s: Any, job: Job, dataset_id: str) -> Dataset | None:
    ds = s.get(Dataset, dataset_id)
    return ds if ds is not None and ds.tenant_id == job.tenant_id and ds.status == "ready" else None


def download_pretraining_images(ctx: WorkerContext, datasets: list[PretrainingDataset], dest: Path) -> int:
    """Gather the images of several datasets into one ImageFolder at ``dest``.

    ``LABEL/NAME`` of dataset ``d`` lands at ``dest/LABEL/<d.id[:8]>-NAME`` (names of different datasets
    never collide); a segmentation dataset contributes ``images/`` only, as ``unlabelled``. Returns the
    number of images."""
    n = 0
    for d in datasets:
        for obj in ctx.store.list(d.prefix + "/"):
            parts = obj.key[len(d.prefix) + 1:].split("/")
            if len(parts) != 2 or Path(parts[1]).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            label, name = parts
            if d.layout == "segmentation":
                if label != "images":
                    continue
                label = "unlabelled"
            target = dest / label / f"{d.id[:8]}-{name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            ctx.store.download_file(obj.key, target)
            n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------------
def pretrain_job(ctx: WorkerContext, job_id: str) -> None:
    """Run (or resume) one pretraining job end to end."""
    from models.checkpoints import CHECKPOINT_NAME
    from models.ssl import PretrainConfig, pretrain

    with ctx.sessions.begin() as s:
        job = begin_job(s, ctx.settings, job_id)
        if job is None:
            return
        params = PretrainingParams.model_validate(job.params)
        missing = [d.id for d in params.datasets if _own_dataset(s, job, d.id) is None]
        if missing:
            mark_failed(s, job, "dataset not found", f"dataset(s) {', '.join(missing)} are gone or not ready")
            return
        result = dict(job.result or {})
        enc = s.get(Encoder, result["encoder_id"]) if "encoder_id" in result else None
        if enc is None:
            enc = Encoder(tenant_id=job.tenant_id, name=params.name, status="training", source_job_id=job.id)
            s.add(enc)
            s.flush()
            job.result = {**result, "encoder_id": enc.id}
        mark_running(s, job)
        enc_id, tenant_id = enc.id, job.tenant_id

    ckpt = ctx.settings.data_dir / "checkpoints" / job_id
    work = Path(tempfile.mkdtemp(prefix=f"cxrsynth-pretrain-{job_id[:8]}-"))
    try:
        n = download_pretraining_images(ctx, params.datasets, work / "data")
        if n == 0:
            raise ValueError("the datasets hold no images")
        overrides: dict[str, Any] = dict(
            method=params.method, backbone=params.backbone, resolution=params.resolution, max_steps=params.steps,
            batch_size=params.batch_size, seed=params.seed, export_fp16=params.fp16,
            warmup_steps=min(PretrainConfig.warmup_steps, params.steps // 10),
            checkpoint_every=max(1, min(PretrainConfig.checkpoint_every, params.steps)),
        )
        if params.learning_rate is not None:
            overrides["learning_rate"] = params.learning_rate
        config = PretrainConfig(**overrides)
        resume = (ckpt / CHECKPOINT_NAME).is_file()
        if resume:
            with ctx.sessions.begin() as s:
                record_event(s, job_id, "resuming from the last checkpoint")
        names = ", ".join(f"{d.id} ({d.origin}, {d.num_images} images)" for d in params.datasets)
        run = pretrain(work / "data", config, work / "out", checkpoint_dir=ckpt, resume=resume,
                       on_step=make_progress_callback(ctx, job_id), device=ctx.settings.device,
                       notes=f"Pretrained by job {job_id} on datasets {names}.")
        out = work / "out"
        prefix = tenant_key(tenant_id, "encoders", enc_id)
        upload_folder(ctx.store, out, prefix)
        meta = json.loads((out / "config.json").read_text())
        card = (out / "README.md").read_text()
    except Canceled:
        end_model_job(ctx, job_id, Encoder, enc_id)
        shutil.rmtree(ckpt, ignore_errors=True)
        return
    except Exception as exc:
        log.exception("pretraining %s failed", job_id)
        end_model_job(ctx, job_id, Encoder, enc_id, failure=("pretraining failed", public_error(exc, work)))
        shutil.rmtree(ckpt, ignore_errors=True)
        return
    finally:
        shutil.rmtree(work, ignore_errors=True)
    complete_model_job(ctx, job_id, Encoder, enc_id, kind="encoder", prefix=prefix, config=meta, card=card,
                       steps=run.steps, final_loss=run.final_loss, wall_seconds=run.wall_seconds)
    shutil.rmtree(ckpt, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
def evaluate_job(ctx: WorkerContext, job_id: str) -> None:
    """Run one evaluation job end to end."""
    from models.evaluation import (
        ClassificationConfig,
        SegmentationConfig,
        evaluate_classification,
        evaluate_segmentation,
    )

    with ctx.sessions.begin() as s:
        job = begin_job(s, ctx.settings, job_id)
        if job is None:
            return
        params = EvaluationParams.model_validate(job.params)
        missing = [d.id for d in (params.train_dataset, params.test_dataset) if _own_dataset(s, job, d.id) is None]
        if missing:
            mark_failed(s, job, "dataset not found", f"dataset(s) {', '.join(missing)} are gone or not ready")
            return
        enc_source: tuple[str | None, str | None] = (None, None)  # (builtin folder, store prefix)
        if params.encoder_id is not None:
            enc = s.get(Encoder, params.encoder_id)
            if enc is None or enc.status != "ready" or enc.tenant_id not in (None, job.tenant_id):
                mark_failed(s, job, "encoder not found", f"encoder {params.encoder_id} is gone or not ready")
                return
            enc_source = (enc.builtin_path, enc.prefix) if enc.tenant_id is None else (None, enc.prefix)
        mark_running(s, job)
        tenant_id = job.tenant_id

    work = Path(tempfile.mkdtemp(prefix=f"cxrsynth-eval-{job_id[:8]}-"))
    try:
        train_dir, test_dir = work / "train", work / "test"
        for role, d, folder in (("train", params.train_dataset, train_dir), ("test", params.test_dataset, test_dir)):
            if download_prefix(ctx.store, d.prefix, folder) == 0:
                raise ValueError(f"the {role} dataset {d.id} has no images in the store")
        encoder: str | Path = params.encoder
        if params.encoder_id is not None:
            builtin_path, prefix = enc_source
            if builtin_path:
                encoder = Path(builtin_path)
            else:
                if not prefix:
                    raise ValueError(f"encoder {params.encoder_id} has no files")
                encoder = work / "encoder"
                download_prefix(ctx.store, prefix, encoder, skip=("exports/",))
        on_step = make_progress_callback(ctx, job_id)
        kwargs: dict[str, Any] = {"seed": params.seed, "resolution": params.resolution}
        if params.epochs is not None:
            kwargs["epochs"] = params.epochs
        if params.task == "classification":
            report = evaluate_classification(encoder, train_dir, test_dir, mode=params.mode,
                                             label_fraction=params.label_fraction,
                                             config=ClassificationConfig(**kwargs), on_step=on_step,
                                             device=ctx.settings.device)
        else:
            report = evaluate_segmentation(encoder, train_dir, test_dir, mode=params.mode,
                                           label_fraction=params.label_fraction,
                                           config=SegmentationConfig(**kwargs), on_step=on_step,
                                           device=ctx.settings.device)
    except Canceled:
        with ctx.sessions.begin() as s:
            job = load_job(s, job_id)
            if job is not None:
                mark_canceled(s, job)
        return
    except Exception as exc:
        log.exception("evaluation %s failed", job_id)
        with ctx.sessions.begin() as s:
            job = load_job(s, job_id)
            if job is not None:
                mark_failed(s, job, "evaluation failed", public_error(exc, work))
        return
    finally:
        shutil.rmtree(work, ignore_errors=True)

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
            _record_on_encoder(s, params, job_id, tenant_id, report)


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
