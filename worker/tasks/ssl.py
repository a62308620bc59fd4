"""Pretraining jobs (a single task each, on the GPU queue); evaluation jobs are in
:mod:`worker.tasks.evaluation`.

``pretrain_job``: dataset objects -> one local image folder -> ``models.ssl.pretrain`` (checkpointed under
``data_dir/checkpoints/<job id>``, so a redelivered task resumes) -> the encoder folder uploaded under
``tenant_key(t, "encoders", id)`` -> the ``Encoder`` row ready.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from app.db.orm import Dataset, Encoder, Job
from app.schemas.jobs import PretrainingDataset, PretrainingParams
from app.storage.base import tenant_key
from models.callbacks import Canceled
from models.data.folders import IMAGE_SUFFIXES
from worker.multi_gpu import refuse_without_devices, retry_after_rank_failure, run_on_ranks
from worker.runtime import (
    WorkerContext,
    begin_job,
    complete_model_job,
    end_model_job,
    make_progress_callback,
    mark_failed,
    mark_running,
    public_error,
    record_event,
    upload_folder,
)

log = logging.getLogger(__name__)



def own_dataset(s: Any, job: Job, dataset_id: str) -> Dataset | None:
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
def _pretrain_config(params: PretrainingParams) -> Any:
    """The ``PretrainConfig`` of a job: its parameters, warm-up and checkpoints scaled to its length."""
    from models.ssl import PretrainConfig

    overrides: dict[str, Any] = dict(
        method=params.method, backbone=params.backbone, resolution=params.resolution, max_steps=params.steps,
        batch_size=params.batch_size, seed=params.seed, export_fp16=params.fp16,
        warmup_steps=min(PretrainConfig.warmup_steps, params.steps // 10),
        checkpoint_every=max(1, min(PretrainConfig.checkpoint_every, params.steps)),
    )
    if params.learning_rate is not None:
        overrides["learning_rate"] = params.learning_rate
    return PretrainConfig(**overrides)


def pretrain_job(ctx: WorkerContext, job_id: str) -> None:
    """Run (or resume) one pretraining job end to end."""
    from models.checkpoints import CHECKPOINT_NAME
    from models.launch import DistributedRunError
    from models.ssl import pretrain

    with ctx.sessions.begin() as s:
        job = begin_job(s, ctx.settings, job_id)
        if job is None:
            return
        params = PretrainingParams.model_validate(job.params)
        missing = [d.id for d in params.datasets if own_dataset(s, job, d.id) is None]
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
        if refuse_without_devices(s, ctx.settings, job, params.gpus, enc):
            return
        mark_running(s, job)
        enc_id, tenant_id = enc.id, job.tenant_id

    ckpt = ctx.settings.data_dir / "checkpoints" / job_id
    work = Path(tempfile.mkdtemp(prefix=f"cxrsynth-pretrain-{job_id[:8]}-"))
    try:
        n = download_pretraining_images(ctx, params.datasets, work / "data")
        if n == 0:
            raise ValueError("the datasets hold no images")
        config = _pretrain_config(params)
        resume = (ckpt / CHECKPOINT_NAME).is_file()
        if resume:
            with ctx.sessions.begin() as s:
                record_event(s, job_id, "resuming from the last checkpoint")
        names = ", ".join(f"{d.id} ({d.origin}, {d.num_images} images)" for d in params.datasets)
        notes = f"Pretrained by job {job_id} on datasets {names}."
        run: Any
        if params.gpus > 1:
            run = run_on_ranks(ctx, job_id, params.gpus, "pretrain", data=work / "data", out=work / "out",
                               config=config.to_dict(), ckpt=ckpt, resume=resume,
                               on_step=make_progress_callback(ctx, job_id), notes=notes)
        else:
            run = pretrain(work / "data", config, work / "out", checkpoint_dir=ckpt, resume=resume,
                           on_step=make_progress_callback(ctx, job_id), device=ctx.settings.device, notes=notes)
        out = work / "out"
        prefix = tenant_key(tenant_id, "encoders", enc_id)
        upload_folder(ctx.store, out, prefix)
        meta = json.loads((out / "config.json").read_text())
        card = (out / "README.md").read_text()
    except Canceled:
        end_model_job(ctx, job_id, Encoder, enc_id)
        shutil.rmtree(ckpt, ignore_errors=True)
        return
    except DistributedRunError as exc:
        if retry_after_rank_failure(ctx, job_id, exc, ckpt):
            return  # the checkpoint stays: the next delivery resumes from it
        end_model_job(ctx, job_id, Encoder, enc_id, failure=("pretraining failed", public_error(exc, work)))
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
