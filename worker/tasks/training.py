"""Generator-training jobs: dataset objects -> local ImageFolder -> ``train_generator`` -> upload.

Training state is checkpointed under ``data_dir/checkpoints/<job id>`` every K steps, so a redelivered
task (worker killed, restarted) resumes instead of starting over.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from app.db.orm import Dataset, Generator, JobStatus, utcnow
from app.storage.base import tenant_key
from models.callbacks import Canceled
from worker.runtime import (
    WorkerContext,
    download_prefix,
    load_job,
    make_progress_callback,
    mark_canceled,
    mark_failed,
    mark_running,
    upload_folder,
)

log = logging.getLogger(__name__)



def train_generator_job(ctx: WorkerContext, job_id: str) -> None:
    """Run (or resume) one generator-training job end to end."""
    from models.diffusion.config import TrainingConfig
    from models.diffusion.training import train_generator

    with ctx.sessions.begin() as s:
        job = load_job(s, job_id, lock=True)
        if job is None or JobStatus(job.status).terminal:
            return
        if job.cancel_requested:
            mark_canceled(s, job)
            return
        job.attempts += 1
        if job.attempts > ctx.settings.max_task_attempts:
            mark_failed(s, job, "worker lost", f"delivered {job.attempts - 1} times without finishing")
            return
        params = dict(job.params or {})
        dataset = s.get(Dataset, params.get("dataset_id"))
        if dataset is None or dataset.tenant_id != job.tenant_id:
            mark_failed(s, job, "dataset not found", f"dataset {params.get('dataset_id')} is gone")
            return
        result = dict(job.result or {})
        gen = s.get(Generator, result["generator_id"]) if "generator_id" in result else None
        if gen is None:
            gen = Generator(tenant_id=job.tenant_id, name=params.get("name") or f"generator-{job.id[:8]}",
                            status="training", source_job_id=job.id)
            s.add(gen)
            s.flush()
            job.result = {**result, "generator_id": gen.id}
        mark_running(s, job)
        gen_id, tenant_id = gen.id, job.tenant_id
        s.expunge(dataset)
    base = TrainingConfig()
    overrides = {"resolution": int(params.get("resolution", base.resolution)),
                 "max_steps": int(params.get("steps", base.max_steps))}
    for key in ("batch_size", "learning_rate", "seed"):
        if params.get(key) is not None:
            overrides[key] = params[key]
    ckpt = ctx.settings.data_dir / "checkpoints" / job_id
    work = Path(tempfile.mkdtemp(prefix=f"cxrsynth-train-{job_id[:8]}-"))
    try:
        config = base.replace(**overrides)
        n = download_prefix(ctx.store, dataset.prefix, work / "data")
        if n == 0:
            raise ValueError(f"dataset {dataset.id} has no images")
        on_step = make_progress_callback(ctx, job_id)
        result_run = train_generator(work / "data", work / "out", config, checkpoint_dir=ckpt,
                                     resume=(ckpt / "state.pt").exists() or any(ckpt.glob("*.pt")),
                                     on_step=on_step, device=ctx.settings.device)
        out = work / "out"
        prefix = tenant_key(tenant_id, "generators", gen_id)
        upload_folder(ctx.store, out, prefix)
        meta = json.loads((out / "cxrsynth.json").read_text())
        card = (out / "README.md").read_text() if (out / "README.md").exists() else ""
    except Canceled:
        with ctx.sessions.begin() as s:
            job = load_job(s, job_id)
            gen = s.get(Generator, gen_id)
            if gen is not None:
                gen.status = "canceled"
            if job is not None:
                mark_canceled(s, job)
        return
    except Exception as exc:
        log.exception("generator training %s failed", job_id)
        with ctx.sessions.begin() as s:
            job = load_job(s, job_id)
            gen = s.get(Generator, gen_id)
            if gen is not None:
                gen.status = "failed"
            if job is not None:
                mark_failed(s, job, "generator training failed", f"{type(exc).__name__}: {exc}")
        return
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id, lock=True)
        gen = s.get(Generator, gen_id)
        if job is None or gen is None or JobStatus(job.status).terminal:
            return
        gen.prefix, gen.config, gen.card, gen.status = prefix, meta, card, "ready"
        gen.metrics = {"final_loss": result_run.final_loss, "steps": result_run.steps}
        job.status = JobStatus.succeeded.value
        job.finished_at = utcnow()
        job.compute_seconds = float(result_run.wall_seconds)
        job.result = {"generator_id": gen_id, "steps": result_run.steps, "final_loss": result_run.final_loss,
                      "links": {"generator": f"/v1/generators/{gen_id}",
                                "download": f"/v1/generators/{gen_id}/download"}}
    shutil.rmtree(ckpt, ignore_errors=True)
