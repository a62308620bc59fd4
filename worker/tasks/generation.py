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
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import select

from app.core.queue import TASK_FINALIZE_JOB, TASK_GENERATION_SHARD
from app.db.orm import Dataset, Generator, Job, JobShard, JobStatus, utcnow
from app.storage.base import ObjectNotFound, tenant_key
from models.callbacks import Canceled, OnStep
from worker.runtime import (
    WorkerContext,
    is_transient,
    load_job,
    make_progress_callback,
    mark_canceled,
    mark_failed,
    mark_running,
    record_event,
    retry_transient,
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


@dataclass(frozen=True)
class _ShardWork:
    """What one delivery of a shard generates: images ``todo`` of [start, stop), not yet stored."""

    job_id: str
    shard_index: int
    params: dict[str, Any]
    plan: list[str | None]
    start: int
    stop: int
    todo: list[int]
    generator: Generator
    dataset: Dataset
    on_step: OnStep

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class _DenoiseProgress:
    """Denoising steps of one batch -> images of the shard, so progress moves smoothly and a cancel request
    is seen within one step."""

    work: _ShardWork
    done_before: int
    batch_images: int

    def __call__(self, step: int, total: int, message: str) -> None:
        self.work.on_step(self.done_before + (self.batch_images * step) // max(total, 1), self.work.size,
                          f"shard {self.work.shard_index}: {message}")


@dataclass(frozen=True)
class _GateProgress:
    """Progress (and cancel checks) while the privacy gate samples replacements for a batch."""

    work: _ShardWork
    done_before: int

    def __call__(self, step: int, total: int, message: str) -> None:
        self.work.on_step(self.done_before, self.work.size,
                          f"shard {self.work.shard_index}: privacy gate, replacing: {message}")


@dataclass(frozen=True)
class _BatchSampler:
    """Samples image indices of one batch with a request seed: ``sampler(indices, seed) -> uint8 images``."""

    pipe: Any
    work: _ShardWork
    batch_size: int
    extra: dict[str, Any]  # guidance_scale, when the job sets one
    conditional: bool
    progress: OnStep

    def __call__(self, indices: list[int], seed: int) -> Any:
        params = self.work.params
        return self.pipe(labels=[self.work.plan[i] for i in indices] if self.conditional else None,
                         num_images=None if self.conditional else len(indices), image_indices=indices, seed=seed,
                         sampler=params.get("sampler", "dpmsolver++"),
                         num_inference_steps=params.get("num_inference_steps"), batch_size=self.batch_size,
                         callback=self.progress, output_type="np", **self.extra).images


def _honour_cancel_request(ctx: WorkerContext, job_id: str, shard_index: int) -> bool:
    """Transaction 1: skip a finished shard or job; a cancel request ends the job and deletes partial images.

    Returns whether this delivery goes on.
    """
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id)
        shard = s.get(JobShard, (job_id, shard_index))
        if job is None or shard is None or shard.status == JobStatus.succeeded.value:
            return False
        if JobStatus(job.status).terminal:
            return False
        canceled_dataset = (job.result or {}).get("dataset_id") if job.cancel_requested else None
        if job.cancel_requested:
            mark_canceled(s, job)
            shard.status = JobStatus.canceled.value
    if canceled_dataset is not None:
        _delete_partial(ctx, canceled_dataset)
        return False
    return True


def _claim_shard(ctx: WorkerContext, job_id: str, shard_index: int) -> tuple[Job, JobShard, Generator, Dataset] | None:
    """Transaction 2: count this delivery (a shard delivered too often fails the job), mark shard and job running.

    Returns the rows, detached from the session, or ``None`` when there is nothing to do.
    """
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id)
        shard = s.get(JobShard, (job_id, shard_index))
        if job is None or shard is None or JobStatus(job.status).terminal:
            return None
        shard.attempts += 1
        if shard.attempts > ctx.settings.max_task_attempts:
            mark_failed(s, job, "worker lost", f"shard {shard_index} was delivered {shard.attempts - 1} times "
                        "without finishing (worker killed or out of memory?)")
            shard.status = JobStatus.failed.value
            return None
        shard.status = JobStatus.running.value
        mark_running(s, job)
        generator = s.get(Generator, _params(job).get("generator_id"))
        dataset = s.get(Dataset, (job.result or {}).get("dataset_id"))
        assert generator is not None and dataset is not None, "start_generation created both"
        s.expunge_all()
    return job, shard, generator, dataset


def _shard_work(ctx: WorkerContext, job: Job, shard: JobShard, generator: Generator, dataset: Dataset) -> _ShardWork:
    """The images of the shard whose PNG is not stored yet (an earlier delivery may have written some)."""
    plan = _plan(job, generator)
    start, stop = shard.start, shard.stop
    done_keys = {o.key for o in ctx.store.list(dataset.prefix + "/")}
    todo = [i for i in range(start, stop) if image_key(dataset, i, plan[i]) not in done_keys]
    return _ShardWork(job.id, shard.index, _params(job), plan, start, stop, todo, generator, dataset,
                      make_progress_callback(ctx, job.id, shard.index))


def _generate_batch(ctx: WorkerContext, work: _ShardWork, pipe: Any, gate: Any, idx: list[int], done_before: int,
                    batch_size: int, extra: dict[str, Any]) -> None:
    """Sample one batch, pass it through the privacy gate, store each gate record and then each PNG."""
    sampler = _BatchSampler(pipe, work, batch_size, extra, conditional=work.plan[idx[0]] is not None,
                            progress=_DenoiseProgress(work, done_before, len(idx)))
    seed = int(work.params["seed"])
    images = sampler(idx, seed)
    if gate is not None:
        # Rejected images are sampled again from seeds of (job seed, i, attempt); the record of
        # each image is stored before its PNG (see worker.tasks.privacy).
        regenerate = replace(sampler, progress=_GateProgress(work, done_before))
        gated = privacy.gate_batch(gate, images, idx, regenerate, seed, ctx.settings.privacy_max_attempts)
        images = gated.images
        for record in gated.records:
            privacy.put_record(ctx, work.dataset, record)
    for i, img in zip(idx, images, strict=True):
        ctx.store.put_bytes(image_key(work.dataset, i, work.plan[i]), _png_bytes(img), "image/png")


def _generate_missing(ctx: WorkerContext, work: _ShardWork) -> None:
    """Generate and store the shard's missing images batch by batch (raises ``Canceled`` on a cancel request)."""
    todo = work.todo
    pipe = load_pipeline(ctx, work.generator)
    gate = privacy.load_gate(ctx, generator_dir(ctx, work.generator)) if todo else None
    batch = max(1, min(len(todo), pipe.auto_batch_size())) if todo else 1
    params = work.params
    extra = {} if params.get("guidance_scale") is None else {"guidance_scale": float(params["guidance_scale"])}
    for b in range(0, len(todo), batch):
        idx = todo[b:b + batch]
        done_before = work.size - (len(todo) - b)
        _generate_batch(ctx, work, pipe, gate, idx, done_before, batch, extra)
        work.on_step(done_before + len(idx), work.size, f"shard {work.shard_index}: {b + len(idx)}/{len(todo)} images")


def _cancel_shard(ctx: WorkerContext, job_id: str, shard_index: int, dataset_id: str) -> None:
    """Transaction 3 (canceled): shard and job canceled; then the partial images are deleted."""
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id)
        sh = s.get(JobShard, (job_id, shard_index))
        if sh is not None:
            sh.status = JobStatus.canceled.value
        if job is not None:
            mark_canceled(s, job)
    _delete_partial(ctx, dataset_id)


def fail_generation(ctx: WorkerContext, job_id: str, title: str, detail: str) -> None:
    """Transaction: the job fails with a problem-shaped error (no-op when it already ended)."""
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id)
        if job is not None:
            mark_failed(s, job, title, detail)


def _complete_shard(ctx: WorkerContext, work: _ShardWork, elapsed: float) -> bool:
    """Transaction 4: the shard succeeded; returns whether every shard of the job has now succeeded."""
    with ctx.sessions.begin() as s:
        sh = s.get(JobShard, (work.job_id, work.shard_index))
        assert sh is not None
        sh.status = JobStatus.succeeded.value
        sh.done_items = work.size
        sh.compute_seconds += elapsed
        sh.updated_at = utcnow()
        s.flush()
        unfinished = s.scalar(select(JobShard.index).where(
            JobShard.job_id == work.job_id, JobShard.status != JobStatus.succeeded.value).limit(1))
    return unfinished is None


def _generate_shard(ctx: WorkerContext, claimed: tuple[Job, JobShard, Generator, Dataset]) -> _ShardWork:
    """List what the shard still lacks in the store, generate and store it; returns the work."""
    work = _shard_work(ctx, *claimed)
    _generate_missing(ctx, work)
    return work


def generation_shard(ctx: WorkerContext, job_id: str, shard_index: int) -> None:
    """Generate images [start, stop) of a job; skip images already stored by an earlier delivery.

    Four transactions, in order: check for a cancel request, claim the delivery, (on cancel or error)
    end the job, mark the shard succeeded. Images and gate records are written between the second and
    the last, each to a key fixed by (job seed, index), so a redelivery writes the same bytes.
    """
    if not _honour_cancel_request(ctx, job_id, shard_index):
        return
    claimed = _claim_shard(ctx, job_id, shard_index)
    if claimed is None:
        return
    t0 = time.perf_counter()
    try:
        # A connection to Postgres or S3 lost mid-way is not the job's fault: the step runs again (within
        # this delivery, so it is not counted as one) and makes only the images not stored yet.
        work = retry_transient(partial(_generate_shard, ctx, claimed), f"shard {shard_index} of job {job_id}")
    except Canceled:
        _cancel_shard(ctx, job_id, shard_index, claimed[3].id)
        return
    except Exception as exc:
        log.exception("shard %s of job %s failed", shard_index, job_id)
        title = "storage or database unreachable" if is_transient(exc) else "generation failed"
        fail_generation(ctx, job_id, title, f"{type(exc).__name__}: {exc}")
        return
    if _complete_shard(ctx, work, time.perf_counter() - t0):
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


TEST_PAUSE_ENV = "CXRSYNTH_TEST_PAUSE_IN"  # fault injection for tests/e2e/test_chaos.py only
TEST_PAUSE_S = 600.0


def _test_pause(stage: str) -> None:
    """Chaos-test hook: with ``CXRSYNTH_TEST_PAUSE_IN=<stage>`` in the worker's environment, log and sleep
    here, so a test can ``kill -9`` the worker at a known point of ``stage`` (e.g. ``finalize``, with the
    manifest and card written but the job not yet succeeded). Deliberately not a ``Settings`` field: no
    configuration a user sees can turn it on, and without the variable it costs one dictionary lookup."""
    if os.environ.get(TEST_PAUSE_ENV) == stage:
        log.warning("%s=%s: pausing %.0f s for a test", TEST_PAUSE_ENV, stage, TEST_PAUSE_S)
        time.sleep(TEST_PAUSE_S)


class _ImageMissing(Exception):
    """An image of the plan has no stored PNG at finalize time."""


def _load_finished_generation(ctx: WorkerContext, job_id: str) -> tuple[Job, Generator, Dataset] | None:
    """Transaction 1 (job row locked): the job, generator and dataset, detached, once every shard succeeded."""
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id, lock=True)
        if job is None or JobStatus(job.status).terminal:
            return None
        generator = s.get(Generator, _params(job).get("generator_id"))
        dataset = s.get(Dataset, (job.result or {}).get("dataset_id"))
        shards = list(s.scalars(select(JobShard).where(JobShard.job_id == job_id)))
        if any(sh.status != JobStatus.succeeded.value for sh in shards) or generator is None or dataset is None:
            return None
        s.expunge_all()
    return job, generator, dataset


def _manifest_rows(ctx: WorkerContext, dataset: Dataset, generator: Generator, params: dict[str, Any],
                   plan: list[str | None]) -> list[dict[str, Any]]:
    """One manifest row per planned image, with the SHA-256 of its stored PNG; ``_ImageMissing`` if one is not."""
    from models.diffusion.pipeline import image_seed

    rows = []
    for i, label in enumerate(plan):
        key = image_key(dataset, i, label)
        try:
            digest = hashlib.sha256(ctx.store.get_bytes(key)).hexdigest()
        except ObjectNotFound:
            raise _ImageMissing(f"image {i} ({key}) was not written") from None
        rows.append({"file": key[len(dataset.prefix) + 1:], "index": i, "label": label or "", "sha256": digest,
                     "seed": image_seed(int(params["seed"]), i), "sampler": params.get("sampler"),
                     "steps": params.get("num_inference_steps"), "guidance": params.get("guidance_scale"),
                     "generator_id": generator.id})
    return rows


def _apply_privacy_gate(ctx: WorkerContext, dataset: Dataset, generator: Generator, params: dict[str, Any],
                        plan: list[str | None], rows: list[dict[str, Any]]) -> privacy.PrivacyOutcome:
    """Privacy report of the dataset; adds the gate's columns (and replaced images' seeds) to ``rows``."""
    gate = privacy.finalize_privacy(
        ctx, dataset, generator, generator_dir(ctx, generator), [str(r["file"]) for r in rows], plan,
        lambda i: ctx.store.get_bytes(image_key(dataset, i, plan[i])), int(params["seed"]))
    for row, columns in zip(rows, gate.columns, strict=True):
        row.update(columns)
    if gate.seeds is not None:  # a replaced image came from another seed than (job seed, i)
        for row, seed in zip(rows, gate.seeds, strict=True):
            row["seed"] = seed
    return gate


def _dataset_base(dataset: Dataset) -> str:
    """``tenants/t/datasets/id``: the folder above the images, holding the manifest and the card."""
    return dataset.prefix.rsplit("/", 1)[0]


def _put_manifest(ctx: WorkerContext, dataset: Dataset, rows: list[dict[str, Any]]) -> str:
    """Store ``manifest.csv``; returns its key."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    manifest_key = f"{_dataset_base(dataset)}/manifest.csv"
    ctx.store.put_bytes(manifest_key, buf.getvalue().encode(), "text/csv")
    return manifest_key


def _dataset_card(ctx: WorkerContext, generator: Generator, params: dict[str, Any], num_images: int,
                  counts: dict[str, Any], gate: privacy.PrivacyOutcome) -> dict[str, Any]:
    """The dataset card: generator, generation settings, label counts, privacy gate, intended use, sources."""
    return {
        "kind": "synthetic chest X-ray dataset",
        "generator": {"id": generator.id, "name": generator.name, "config": generator.config},
        "generation": {k: params.get(k) for k in ("n", "counts", "label", "sampler", "num_inference_steps",
                                                  "guidance_scale", "seed")}
        | {"unet_compiled": ctx.settings.compile_unet},
        "num_images": num_images,
        "label_counts": counts,
        "privacy_gate": gate.summary,
        "intended_use": "research and pretraining; not for diagnosis",
        "data_sources": (generator.config or {}).get("data_sources")
        or (generator.config or {}).get("training_data"),
    }


def _record_dataset(ctx: WorkerContext, dataset_id: str, num_images: int, counts: dict[str, Any], manifest_key: str,
                    card: dict[str, Any], gate: privacy.PrivacyOutcome) -> None:
    """Transaction 2: the dataset row gets its counts, manifest, card and privacy outcome."""
    with ctx.sessions.begin() as s:
        ds = s.get(Dataset, dataset_id)
        assert ds is not None
        ds.num_images = num_images
        ds.label_counts = dict(counts)
        ds.manifest_key = manifest_key
        ds.card = card
        ds.gate_status = gate.gate_status
        ds.privacy = gate.summary


def _build_zip(ctx: WorkerContext, dataset_id: str, generator: Generator) -> str:
    """The zip export (with the dataset card: licences from the generator, privacy and generation figures);
    WebDataset and DICOM are built on request (worker.exports). Returns its key."""
    from worker.exports import build_dataset_export

    with ctx.sessions() as s:
        ds = s.get(Dataset, dataset_id)
        assert ds is not None
        return build_dataset_export(ctx.store, ds, "zip", generator=generator)


def _image_bytes(ctx: WorkerContext, dataset: Dataset, rows: list[dict[str, Any]]) -> int:
    """Bytes of the dataset's images (what ``total_bytes`` means for uploads too), from one listing."""
    files = {f"{dataset.prefix}/{r['file']}" for r in rows}
    return sum(o.size for o in ctx.store.list(f"{dataset.prefix}/") if o.key in files)


def _complete_generation(ctx: WorkerContext, job_id: str, dataset_id: str, num_images: int, counts: dict[str, Any],
                         total_bytes: int) -> None:
    """Transaction 3 (job row locked): dataset ready, job succeeded with its result (no-op if the job ended)."""
    with ctx.sessions.begin() as s:
        job = load_job(s, job_id, lock=True)
        ds = s.get(Dataset, dataset_id)
        if job is None or ds is None or JobStatus(job.status).terminal:
            return
        ds.status = "ready"
        ds.total_bytes = total_bytes
        shards = list(s.scalars(select(JobShard).where(JobShard.job_id == job_id)))
        job.compute_seconds = float(sum(sh.compute_seconds for sh in shards))
        job.status = JobStatus.succeeded.value
        job.finished_at = utcnow()
        job.progress_step = job.progress_total = num_images
        job.progress_message = f"{num_images} images"
        job.result = {"dataset_id": ds.id, "num_images": num_images, "label_counts": counts,
                      "links": {"dataset": f"/v1/datasets/{ds.id}",
                                "download": f"/v1/datasets/{ds.id}/download?format=zip"}}
        record_event(s, job.id, f"succeeded: {num_images} images")


def finalize_generation(ctx: WorkerContext, job_id: str) -> None:
    """Write manifest and card, build the zip export, mark dataset ready and job succeeded (idempotent)."""
    loaded = _load_finished_generation(ctx, job_id)
    if loaded is None:
        return
    job, generator, dataset = loaded
    params = _params(job)
    plan = _plan(job, generator)
    try:
        rows = _manifest_rows(ctx, dataset, generator, params, plan)
    except _ImageMissing as missing:
        fail_generation(ctx, job_id, "image missing", str(missing))
        return
    gate = _apply_privacy_gate(ctx, dataset, generator, params, plan, rows)
    manifest_key = _put_manifest(ctx, dataset, rows)
    counts: dict[str, Any] = {str(k): v for k, v in Counter(r["label"] or "unlabelled" for r in rows).items()}
    card = _dataset_card(ctx, generator, params, len(rows), counts, gate)
    ctx.store.put_bytes(f"{_dataset_base(dataset)}/card.json", json.dumps(card, indent=2, default=str).encode(),
                        "application/json")
    _test_pause("finalize")
    _record_dataset(ctx, dataset.id, len(rows), counts, manifest_key, card, gate)
    _build_zip(ctx, dataset.id, generator)
    _complete_generation(ctx, job_id, dataset.id, len(rows), counts, _image_bytes(ctx, dataset, rows))
