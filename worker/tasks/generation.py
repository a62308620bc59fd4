"""Generation jobs: plan -> shards (one task each) -> finalize.

Image ``i`` of a job always comes from seed ``(job seed, i)`` and lands at the same key, so a
redelivered shard, a second worker, or 1 vs 4 workers write the same bytes to the same keys and the
dataset is the same. The last shard to finish enqueues ``finalize`` (no chord, no result backend);
finalize is idempotent.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import select

from app.core.queue import TASK_FINALIZE_JOB, TASK_GENERATION_SHARD
from app.db.orm import Dataset, Generator, Job, JobShard, JobStatus, utcnow
from app.storage.base import ObjectNotFound, tenant_key
from models.callbacks import Canceled
from worker.runtime import (
    WorkerContext,
    load_job,
    make_progress_callback,
    mark_canceled,
    mark_failed,
    mark_running,
    record_event,
)
from worker.tasks import privacy

log = logging.getLogger(__name__)

MANIFEST_FIELDS = ["file", "label", "sha256", "index", "seed", "sampler", "steps", "guidance", "generator_id",
                   "nn_pixel_similarity", "nn_embedding_similarity", "replaced"]  # last three: privacy gate
_PIPELINES: dict[str, Any] = {}


def image_key(dataset: Dataset, index: int, label: str | None) -> str:
    """Object key of image ``index`` of a synthetic dataset (label folder, zero-padded index)."""
    return f"{dataset.prefix}/{label or 'unlabelled'}/{index:07d}.png"


def _params(job: Job) -> dict[str, Any]:
    return dict(job.params or {})


def generator_label_names(config: dict[str, Any] | None) -> list[str]:
    """Label names of a generator from its ``cxrsynth.json`` (``labels``: name -> class id)."""
    labels = (config or {}).get("labels") or {}
    return [name for name, _ in sorted(labels.items(), key=lambda kv: kv[1])]


def _plan(job: Job, generator: Generator) -> list[str | None]:
    from models.diffusion.pipeline import plan_generation

    p = _params(job)
    names = generator_label_names(generator.config)
    if p.get("counts") and names:  # the API stores resolved per-label counts (GenerationParams)
        return plan_generation(counts=p["counts"], seed=int(p["seed"]), label_names=names)
    return plan_generation(n=int(p["n"]), seed=int(p["seed"]), label_names=names)


def generator_dir(ctx: WorkerContext, generator: Generator) -> Path:
    """Local folder of a generator: the built-in path, or a cached copy of its objects."""
    if generator.builtin_path:
        return Path(generator.builtin_path)
    assert generator.prefix, "a tenant generator has an object prefix"
    cache = ctx.settings.data_dir / "cache" / "generators" / generator.id
    if (cache / "cxrsynth.json").is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{generator.id}-"))
    try:
        for obj in ctx.store.list(generator.prefix + "/"):
            rel = obj.key[len(generator.prefix) + 1:]
            if rel.startswith("exports/"):
                continue
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            ctx.store.download_file(obj.key, dest)
        if cache.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cache


def load_pipeline(ctx: WorkerContext, generator: Generator) -> Any:
    """The sampling pipeline of a generator, cached per process (loading costs more than a batch)."""
    from models.diffusion.pipeline import CXRDiffusionPipeline

    path = generator_dir(ctx, generator)
    key = str(path)
    if key not in _PIPELINES:
        if len(_PIPELINES) >= 2:
            _PIPELINES.pop(next(iter(_PIPELINES)))
        _PIPELINES[key] = CXRDiffusionPipeline.from_pretrained(
            path, device=ctx.settings.device, compile=ctx.settings.compile_unet,
            precision="auto" if ctx.settings.generation_cpu_bf16 else None)
    pipe = _PIPELINES[key]
    pipe.generator_id = generator.id
    return pipe


def start_generation(ctx: WorkerContext, job_id: str) -> None:
    """Create the dataset row and shard rows once, then (re)send every unfinished shard."""
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id, lock=True)
        if job is None or JobStatus(job.status).terminal:
            return
        generator = s.get(Generator, _params(job).get("generator_id"))
        if generator is None:
            mark_failed(s, job, "generator not found", f"generator {_params(job).get('generator_id')} is gone")
            return
        try:
            plan = _plan(job, generator)
        except ValueError as exc:
            mark_failed(s, job, "invalid generation request", str(exc))
            return
        result = dict(job.result or {})
        dataset = s.get(Dataset, result["dataset_id"]) if "dataset_id" in result else None
        if dataset is None:
            dataset = Dataset(tenant_id=job.tenant_id, name=_params(job).get("name") or f"synthetic-{job.id[:8]}",
                              origin="synthetic", status="pending", prefix="", source_job_id=job.id)
            s.add(dataset)
            s.flush()
            dataset.prefix = tenant_key(job.tenant_id, "datasets", dataset.id, "images")
            job.result = {**result, "dataset_id": dataset.id}
        job.progress_total = len(plan)
        existing = {sh.index: sh for sh in s.scalars(select(JobShard).where(JobShard.job_id == job.id))}
        size = ctx.settings.shard_size
        for k, start in enumerate(range(0, len(plan), size)):
            if k not in existing:
                existing[k] = JobShard(job_id=job.id, index=k, start=start, stop=min(start + size, len(plan)))
                s.add(existing[k])
        pending = sorted(k for k, sh in existing.items() if sh.status != JobStatus.succeeded.value)
        record_event(s, job.id, f"planned {len(plan)} images in {len(existing)} shards")
    for k in pending:
        ctx.dispatcher.send(TASK_GENERATION_SHARD, job_id, k)
    if not pending:
        ctx.dispatcher.send(TASK_FINALIZE_JOB, job_id)


def _png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")  # deterministic for equal pixels
    return buf.getvalue()


def generation_shard(ctx: WorkerContext, job_id: str, shard_index: int) -> None:
    """Generate images [start, stop) of a job; skip images already stored by an earlier delivery."""
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id)
        shard = s.get(JobShard, (job_id, shard_index))
        if job is None or shard is None or shard.status == JobStatus.succeeded.value:
            return
        if JobStatus(job.status).terminal:
            return
        canceled_dataset = (job.result or {}).get("dataset_id") if job.cancel_requested else None
        if job.cancel_requested:
            mark_canceled(s, job)
            shard.status = JobStatus.canceled.value
    if canceled_dataset is not None:
        _delete_partial(ctx, canceled_dataset)
        return
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id)
        shard = s.get(JobShard, (job_id, shard_index))
        if job is None or shard is None or JobStatus(job.status).terminal:
            return
        shard.attempts += 1
        if shard.attempts > ctx.settings.max_task_attempts:
            mark_failed(s, job, "worker lost", f"shard {shard_index} was delivered {shard.attempts - 1} times "
                        "without finishing (worker killed or out of memory?)")
            shard.status = JobStatus.failed.value
            return
        shard.status = JobStatus.running.value
        mark_running(s, job)
        generator = s.get(Generator, _params(job).get("generator_id"))
        dataset = s.get(Dataset, (job.result or {}).get("dataset_id"))
        assert generator is not None and dataset is not None, "start_generation created both"
        s.expunge_all()
    params = _params(job)
    plan = _plan(job, generator)
    start, stop = shard.start, shard.stop
    done_keys = {o.key for o in ctx.store.list(dataset.prefix + "/")}
    todo = [i for i in range(start, stop) if image_key(dataset, i, plan[i]) not in done_keys]
    on_step = make_progress_callback(ctx, job_id, shard_index)
    t0 = time.perf_counter()
    try:
        pipe = load_pipeline(ctx, generator)
        gate = privacy.load_gate(ctx, generator_dir(ctx, generator)) if todo else None
        batch = max(1, min(len(todo), pipe.auto_batch_size())) if todo else 1
        extra = {} if params.get("guidance_scale") is None else {"guidance_scale": float(params["guidance_scale"])}
        for b in range(0, len(todo), batch):
            idx = todo[b:b + batch]
            done_before = (stop - start) - (len(todo) - b)

            def denoise_progress(k: int, total: int, message: str, done_before: int = done_before,
                                 m: int = len(idx)) -> None:
                # Denoising steps of this batch -> images of the shard, so progress moves smoothly and a
                # cancel request is seen within one step.
                on_step(done_before + (m * k) // max(total, 1), stop - start, f"shard {shard_index}: {message}")

            conditional = plan[idx[0]] is not None

            def sample(indices: list[int], seed: int, progress: Any = denoise_progress,
                       conditional: bool = conditional) -> Any:
                return pipe(labels=[plan[i] for i in indices] if conditional else None,
                            num_images=None if conditional else len(indices), image_indices=indices, seed=seed,
                            sampler=params.get("sampler", "dpmsolver++"),
                            num_inference_steps=params.get("num_inference_steps"), batch_size=batch,
                            callback=progress, output_type="np", **extra).images

            images = sample(idx, int(params["seed"]))
            if gate is not None:
                # Rejected images are sampled again from seeds of (job seed, i, attempt); the record of
                # each image is stored before its PNG (see worker.tasks.privacy).
                def cancel_check(k: int, total: int, message: str, done: int = done_before) -> None:
                    on_step(done, stop - start, f"shard {shard_index}: privacy gate, replacing: {message}")

                gated = privacy.gate_batch(gate, images, idx, lambda ii, sd: sample(ii, sd, cancel_check),
                                           int(params["seed"]), ctx.settings.privacy_max_attempts)
                images = gated.images
                for record in gated.records:
                    privacy.put_record(ctx, dataset, record)
            for i, img in zip(idx, images, strict=True):
                ctx.store.put_bytes(image_key(dataset, i, plan[i]), _png_bytes(img), "image/png")
            on_step(done_before + len(idx), stop - start, f"shard {shard_index}: {b + len(idx)}/{len(todo)} images")
    except Canceled:
        with ctx.sessions.begin() as s:
            job2 = load_job(s, job_id)
            sh = s.get(JobShard, (job_id, shard_index))
            if sh is not None:
                sh.status = JobStatus.canceled.value
            if job2 is not None:
                mark_canceled(s, job2)
        _delete_partial(ctx, dataset.id)
        return
    except Exception as exc:
        log.exception("shard %s of job %s failed", shard_index, job_id)
        with ctx.sessions.begin() as s:
            job2 = load_job(s, job_id)
            if job2 is not None:
                mark_failed(s, job2, "generation failed", f"{type(exc).__name__}: {exc}")
        return
    elapsed = time.perf_counter() - t0
    with ctx.sessions.begin() as s:
        sh = s.get(JobShard, (job_id, shard_index))
        assert sh is not None
        sh.status = JobStatus.succeeded.value
        sh.done_items = stop - start
        sh.compute_seconds += elapsed
        sh.updated_at = utcnow()
        s.flush()
        unfinished = s.scalar(select(JobShard.index).where(
            JobShard.job_id == job_id, JobShard.status != JobStatus.succeeded.value).limit(1))
    if unfinished is None:
        ctx.dispatcher.send(TASK_FINALIZE_JOB, job_id)


def _delete_partial(ctx: WorkerContext, dataset_id: str) -> None:
    """A canceled generation keeps no half-made images (the dataset row stays, marked canceled)."""
    with ctx.sessions.begin() as s:
        ds = s.get(Dataset, dataset_id)
        if ds is None:
            return
        ds.status = "canceled"
        prefix = ds.prefix
        gate_prefix = privacy.privacy_prefix(ds)
    ctx.store.delete_prefix(prefix + "/")
    ctx.store.delete_prefix(gate_prefix + "/")


def finalize_generation(ctx: WorkerContext, job_id: str) -> None:
    """Write manifest and card, build the zip export, mark dataset ready and job succeeded (idempotent)."""
    from app.services.exports import build_dataset_export

    with ctx.sessions.begin() as s:
        job = load_job(s, job_id, lock=True)
        if job is None or JobStatus(job.status).terminal:
            return
        generator = s.get(Generator, _params(job).get("generator_id"))
        dataset = s.get(Dataset, (job.result or {}).get("dataset_id"))
        shards = list(s.scalars(select(JobShard).where(JobShard.job_id == job_id)))
        if any(sh.status != JobStatus.succeeded.value for sh in shards) or generator is None or dataset is None:
            return
        s.expunge_all()
    params = _params(job)
    plan = _plan(job, generator)
    from models.diffusion.pipeline import image_seed

    rows = []
    for i, label in enumerate(plan):
        key = image_key(dataset, i, label)
        try:
            digest = hashlib.sha256(ctx.store.get_bytes(key)).hexdigest()
        except ObjectNotFound:
            with ctx.sessions.begin() as s:
                j = load_job(s, job_id)
                if j is not None:
                    mark_failed(s, j, "image missing", f"image {i} ({key}) was not written")
            return
        rows.append({"file": key[len(dataset.prefix) + 1:], "index": i, "label": label or "", "sha256": digest,
                     "seed": image_seed(int(params["seed"]), i), "sampler": params.get("sampler"),
                     "steps": params.get("num_inference_steps"), "guidance": params.get("guidance_scale"),
                     "generator_id": generator.id})
    gate = privacy.finalize_privacy(
        ctx, dataset, generator, generator_dir(ctx, generator), [str(r["file"]) for r in rows], plan,
        lambda i: ctx.store.get_bytes(image_key(dataset, i, plan[i])), int(params["seed"]))
    for row, columns in zip(rows, gate.columns, strict=True):
        row.update(columns)
    if gate.seeds is not None:  # a replaced image came from another seed than (job seed, i)
        for row, seed in zip(rows, gate.seeds, strict=True):
            row["seed"] = seed
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    base = dataset.prefix.rsplit("/", 1)[0]
    manifest_key = f"{base}/manifest.csv"
    ctx.store.put_bytes(manifest_key, buf.getvalue().encode(), "text/csv")
    counts: dict[str, Any] = {str(k): v for k, v in Counter(r["label"] or "unlabelled" for r in rows).items()}
    card = {
        "kind": "synthetic chest X-ray dataset",
        "generator": {"id": generator.id, "name": generator.name, "config": generator.config},
        "generation": {k: params.get(k) for k in ("n", "counts", "label", "sampler", "num_inference_steps",
                                                  "guidance_scale", "seed")}
        | {"unet_compiled": ctx.settings.compile_unet},
        "num_images": len(rows),
        "label_counts": counts,
        "privacy_gate": gate.summary,
        "intended_use": "research and pretraining; not for diagnosis",
        "data_sources": (generator.config or {}).get("data_sources")
        or (generator.config or {}).get("training_data"),
    }
    ctx.store.put_bytes(f"{base}/card.json", json.dumps(card, indent=2, default=str).encode(), "application/json")
    with ctx.sessions.begin() as s:
        ds = s.get(Dataset, dataset.id)
        assert ds is not None
        ds.num_images = len(rows)
        ds.label_counts = dict(counts)
        ds.manifest_key = manifest_key
        ds.card = card
        ds.gate_status = gate.gate_status
        ds.privacy = gate.summary
    with ctx.sessions() as s:
        ds = s.get(Dataset, dataset.id)
        assert ds is not None
        # The zip (with the dataset card: licences from the generator, privacy and generation figures);
        # WebDataset and DICOM are built on request (app.services.releases).
        total_bytes = build_dataset_export(ctx.store, ds, "zip", generator=generator)
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id, lock=True)
        ds = s.get(Dataset, dataset.id)
        if job is None or ds is None or JobStatus(job.status).terminal:
            return
        ds.status = "ready"
        if isinstance(total_bytes, int):
            ds.total_bytes = total_bytes
        shards = list(s.scalars(select(JobShard).where(JobShard.job_id == job_id)))
        job.compute_seconds = float(sum(sh.compute_seconds for sh in shards))
        job.status = JobStatus.succeeded.value
        job.finished_at = utcnow()
        job.progress_step = job.progress_total = len(rows)
        job.progress_message = f"{len(rows)} images"
        job.result = {"dataset_id": ds.id, "num_images": len(rows), "label_counts": counts,
                      "links": {"dataset": f"/v1/datasets/{ds.id}",
                                "download": f"/v1/datasets/{ds.id}/download?format=zip"}}
        record_event(s, job.id, f"succeeded: {len(rows)} images")
