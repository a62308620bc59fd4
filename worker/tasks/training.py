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
from typing import Any

from app.db.orm import Dataset, Generator
from app.storage.base import tenant_key
from models.callbacks import Canceled, OnStep
from worker.multi_gpu import refuse_without_devices, retry_after_rank_failure, run_on_ranks
from worker.runtime import (
    WorkerContext,
    begin_job,
    complete_model_job,
    download_prefix,
    end_model_job,
    make_progress_callback,
    mark_failed,
    mark_running,
    public_error,
    record_event,
    upload_folder,
)

log = logging.getLogger(__name__)


def _train(ctx: WorkerContext, job_id: str, params: dict[str, Any], work: Path, ckpt: Path, resume: bool,
           progress: OnStep) -> Any:
    """Build the job's config and train, in this process or on ``gpus`` ranks; the training result."""
    from models.data.folders import folder_image_sizes
    from models.diffusion.config import TrainingConfig
    from models.diffusion.latent import LatentGeneratorConfig, train_latent_generator
    from models.diffusion.training import train_generator
    from models.generator_kinds import DEFAULT_AUTOENCODER_STEPS, check_image_sizes

    resolution = int(params.get("resolution", 64))
    overrides = {"max_steps": int(params.get("steps", 3000))}
    for key in ("batch_size", "learning_rate", "seed"):
        if params.get(key) is not None:
            overrides[key] = params[key]
    config: TrainingConfig | LatentGeneratorConfig
    if params.get("kind", "pixel") == "latent":
        check_image_sizes(resolution, folder_image_sizes(work / "data"))
        config = LatentGeneratorConfig.for_resolution(
            resolution, autoencoder={"max_steps": int(params.get("autoencoder_steps") or DEFAULT_AUTOENCODER_STEPS),
                                     **({"seed": params["seed"]} if params.get("seed") is not None else {})},
            **overrides)
    else:
        config = TrainingConfig().replace(resolution=resolution, **overrides)
    gpus = int(params.get("gpus") or 1)
    if gpus > 1:
        task = "train_latent_generator" if isinstance(config, LatentGeneratorConfig) else "train_generator"
        return run_on_ranks(ctx, job_id, gpus, task, data=work / "data", out=work / "out", config=config.to_dict(),
                            ckpt=ckpt, resume=resume, on_step=progress)
    if isinstance(config, LatentGeneratorConfig):
        return train_latent_generator(work / "data", work / "out", config, checkpoint_dir=ckpt, resume=resume,
                                      on_step=progress, device=ctx.settings.device)
    return train_generator(work / "data", work / "out", config, checkpoint_dir=ckpt, resume=resume,
                           on_step=progress, device=ctx.settings.device)


def train_generator_job(ctx: WorkerContext, job_id: str) -> None:
    """Run (or resume) one generator-training job end to end."""
    from models.checkpoints import CHECKPOINT_NAME
    from models.launch import DistributedRunError

    with ctx.sessions.begin() as s:
        job = begin_job(s, ctx.settings, job_id)
        if job is None:
            return
        params = dict(job.params or {})
        dataset = s.get(Dataset, params.get("dataset_id"))
        if dataset is None or dataset.tenant_id != job.tenant_id or dataset.status != "ready":
            mark_failed(s, job, "dataset not found", f"dataset {params.get('dataset_id')} is gone or not ready")
            return
        result = dict(job.result or {})
        gen = s.get(Generator, result["generator_id"]) if "generator_id" in result else None
        if gen is None:
            gen = Generator(tenant_id=job.tenant_id, name=params.get("name") or f"generator-{job.id[:8]}",
                            status="training", source_job_id=job.id)
            s.add(gen)
            s.flush()
            job.result = {**result, "generator_id": gen.id}
        if refuse_without_devices(s, ctx.settings, job, int(params.get("gpus") or 1), gen):
            return
        mark_running(s, job)
        gen_id, tenant_id, dataset_prefix = gen.id, job.tenant_id, dataset.prefix
    ckpt = ctx.settings.data_dir / "checkpoints" / job_id
    work = Path(tempfile.mkdtemp(prefix=f"cxrsynth-train-{job_id[:8]}-"))
    try:
        if download_prefix(ctx.store, dataset_prefix, work / "data") == 0:
            raise ValueError(f"dataset {params.get('dataset_id')} has no images in the store")
        resume = any(ckpt.rglob(CHECKPOINT_NAME)) if ckpt.is_dir() else False
        if resume:
            with ctx.sessions.begin() as s:
                record_event(s, job_id, "resuming from the last checkpoint")
        progress = make_progress_callback(ctx, job_id)
        run = _train(ctx, job_id, params, work, ckpt, resume, progress)
        out = work / "out"
        prefix = tenant_key(tenant_id, "generators", gen_id)
        upload_folder(ctx.store, out, prefix)
        meta = json.loads((out / "cxrsynth.json").read_text())
        card = (out / "README.md").read_text() if (out / "README.md").exists() else ""
    except Canceled:
        end_model_job(ctx, job_id, Generator, gen_id)
        shutil.rmtree(ckpt, ignore_errors=True)
        return
    except DistributedRunError as exc:
        if retry_after_rank_failure(ctx, job_id, exc, ckpt):
            return  # the checkpoint stays: the next delivery resumes from it
        end_model_job(ctx, job_id, Generator, gen_id, failure=("generator training failed", public_error(exc, work)))
        shutil.rmtree(ckpt, ignore_errors=True)
        return
    except Exception as exc:
        log.exception("generator training %s failed", job_id)
        end_model_job(ctx, job_id, Generator, gen_id, failure=("generator training failed", public_error(exc, work)))
        shutil.rmtree(ckpt, ignore_errors=True)
        return
    finally:
        shutil.rmtree(work, ignore_errors=True)
    complete_model_job(ctx, job_id, Generator, gen_id, kind="generator", prefix=prefix, config=meta, card=card,
                       steps=run.steps, final_loss=run.final_loss, wall_seconds=run.wall_seconds)
    shutil.rmtree(ckpt, ignore_errors=True)
