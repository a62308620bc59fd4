"""Generation and generator-training jobs: validate a request against the tenant's data and resolve the
params the worker reads (see ``app.schemas.jobs``), then submit through :func:`app.services.jobs.submit_job`."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.problems import Conflict, InvalidInput
from app.db.orm import Generator, Job, JobKind
from app.schemas.jobs import (
    DEFAULT_STEPS,
    SEED_MAX,
    GenerationParams,
    GenerationRequest,
    GeneratorTrainingParams,
    GeneratorTrainingRequest,
)
from app.services.datasets import get_dataset
from app.services.jobs import submit_job
from app.services.model_assets import default_generator, generator_labels, generator_resolution, get_generator
from models.generator_kinds import DEFAULT_AUTOENCODER_STEPS, check_image_sizes

UNLABELED = "unlabelled"  # the folder the worker writes unconditional images to


def random_seed() -> int:
    """A fresh seed in 0..2**32-1 (recorded in the job params, so the run can be repeated)."""
    return secrets.randbelow(SEED_MAX + 1)


def _split_evenly(n: int, labels: list[str]) -> dict[str, int]:
    base, extra = divmod(n, len(labels))
    counts = {label: base + (1 if i < extra else 0) for i, label in enumerate(labels)}
    return {k: v for k, v in counts.items() if v > 0}


def resolve_generator(session: Session, settings: Settings, tenant_id: str, generator_id: str | None) -> Generator:
    """The requested generator (tenant's or built-in), or the default built-in one; must be ready."""
    if generator_id is not None:
        gen = get_generator(session, tenant_id, generator_id)
    else:
        found = default_generator(session, settings)
        if found is None:
            raise Conflict("no default generator is installed on this server; pass generator_id",
                           slug="no-default-generator")
        gen = found
    if gen.status != "ready":
        raise Conflict(f"generator {gen.id} is {gen.status}, not ready", slug="not-ready")
    return gen


def plan_generation_params(
    session: Session, settings: Settings, tenant_id: str, req: GenerationRequest
) -> GenerationParams:
    """Check a generation request (generator, labels, n within ``max_images_per_job``) and resolve it."""
    gen = resolve_generator(session, settings, tenant_id, req.generator_id)
    labels = generator_labels(gen.config or {})
    by_folded = {name.casefold(): name for name in labels}
    ordered = sorted(labels, key=lambda name: labels[name])

    def canonical(label: str) -> str:
        if not labels:
            raise InvalidInput(f"generator {gen.name} is unconditional: it takes no label",
                               slug="unknown-label", allowed=[])
        name = by_folded.get(label.strip().casefold())
        if name is None:
            raise InvalidInput(f"unknown label {label!r}; this generator knows {', '.join(ordered)}",
                               slug="unknown-label", allowed=ordered)
        return name

    if req.counts is not None:
        wanted: dict[str, int] = {}
        for label, count in req.counts.items():
            name = canonical(label)
            if name in wanted:
                raise InvalidInput(f"label {name!r} is given twice in counts", slug="unknown-label")
            wanted[name] = count
        counts = {name: wanted[name] for name in ordered if wanted.get(name, 0) > 0}
    elif req.label is not None:
        assert req.n is not None
        counts = {canonical(req.label): req.n}
    else:
        assert req.n is not None
        counts = _split_evenly(req.n, ordered) if labels else {UNLABELED: req.n}
    total = sum(counts.values())
    if total > settings.max_images_per_job:
        raise InvalidInput(f"a job makes at most {settings.max_images_per_job} images (asked for {total})",
                           slug="too-many-images", limit=settings.max_images_per_job)
    label_ids: dict[str, int | None] = {name: labels[name] if labels else None for name in counts}
    name = req.name or f"{gen.name}-synthetic-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    return GenerationParams(
        generator_id=gen.id, n=total, counts=counts, label_ids=label_ids, sampler=req.sampler,
        num_inference_steps=req.num_inference_steps or DEFAULT_STEPS[req.sampler],
        guidance_scale=req.guidance_scale,
        seed=req.seed if req.seed is not None else random_seed(),
        resolution=generator_resolution(gen.config or {}), name=name,
    )


def create_generation(
    session: Session, settings: Settings, tenant_id: str, req: GenerationRequest, idempotency_key: str | None = None,
    enqueue: bool = True,
) -> tuple[Job, bool]:
    """Submit a generation job; returns ``(job, created)`` (``created`` False for an idempotent replay).

    ``enqueue=False`` only records it (the embedded CLI runs the worker's task code inline)."""
    return submit_job(session, settings, tenant_id, JobKind.generation, req,
                      lambda: plan_generation_params(session, settings, tenant_id, req),
                      idempotency_key=idempotency_key, webhook_url=req.webhook_url, enqueue=enqueue)


def plan_generator_training(
    session: Session, settings: Settings, tenant_id: str, req: GeneratorTrainingRequest
) -> GeneratorTrainingParams:
    """Check that the dataset is the tenant's, ready and non-empty, and resolve the training params."""
    ds = get_dataset(session, tenant_id, req.dataset_id)
    if ds.status != "ready" or not ds.manifest_key:
        raise Conflict(f"dataset {ds.id} is {ds.status}, not ready", slug="not-ready")
    if ds.num_images <= 0:
        raise InvalidInput(f"dataset {ds.id} has no images", slug="empty-dataset")
    labels = {name: i for i, name in enumerate(sorted(ds.label_counts or {}))}
    kind = req.kind
    if kind == "latent":
        if ds.num_images < 2:
            raise InvalidInput(f"dataset {ds.id} has {ds.num_images} image; a latent generator needs at least 2 "
                               "(some patients are held out to measure its autoencoder)", slug="dataset-too-small")
        try:  # datasets uploaded before image sizes were recorded are checked by the worker instead
            check_image_sizes(req.resolution, dict((ds.card or {}).get("image_sizes") or {}))
        except ValueError as exc:
            raise InvalidInput(f"dataset {ds.id}: {exc}", slug="unsuitable-images") from exc
    return GeneratorTrainingParams(
        dataset_id=ds.id, dataset_prefix=ds.prefix, manifest_key=ds.manifest_key, name=req.name, labels=labels,
        resolution=req.resolution, kind=kind,
        autoencoder_steps=(req.autoencoder_steps or DEFAULT_AUTOENCODER_STEPS) if kind == "latent" else None,
        steps=req.steps, batch_size=req.batch_size, learning_rate=req.learning_rate,
        seed=req.seed if req.seed is not None else random_seed(), gpus=req.gpus,
    )


def create_generator_training(
    session: Session, settings: Settings, tenant_id: str, req: GeneratorTrainingRequest,
    idempotency_key: str | None = None, *, enqueue: bool = True,
) -> tuple[Job, bool]:
    """Submit a generator-training job; returns ``(job, created)``."""
    return submit_job(session, settings, tenant_id, JobKind.generator_training, req,
                      lambda: plan_generator_training(session, settings, tenant_id, req),
                      idempotency_key=idempotency_key, webhook_url=req.webhook_url, enqueue=enqueue)
