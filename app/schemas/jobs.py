"""Jobs: the one response shape of every kind, the creation requests, and the params the worker reads.

Contract with the worker (``worker/tasks``)
-------------------------------------------
The API validates a creation request, resolves defaults and stores the result in ``Job.params`` as the
JSON of a ``*Params`` model below; the worker reads ``Job.params`` (``GenerationParams.model_validate``
works) and never sees the raw request. After the commit the API sends ``TASK_START_JOB(job_id)``.

``generation`` -> :class:`GenerationParams`
    ``counts`` is ordered like the generator's labels; image ``i`` (0-based, over the whole job) gets the
    label of the ``counts`` entry it falls into (entries in order: the first ``counts[l0]`` images are
    ``l0``, ...), class id ``label_ids[label]`` (null for an unconditional generator, whose only label is
    ``unlabelled``), and is sampled from seed ``(seed, i)``. The worker creates the synthetic ``Dataset``
    (status ``pending`` -> ``ready``; ``canceled`` when the job is), its images under
    ``{dataset.prefix}/{label}/{i:07d}.png``, ``manifest.csv`` (``file,label,sha256,...`` with ``file``
    relative to ``dataset.prefix``) and the zip export via ``worker.exports.build_zip_export``,
    and writes :class:`GenerationResult` into ``Job.result``.

``generator_training`` -> :class:`GeneratorTrainingParams`
    Train on the dataset ``dataset_id`` (images listed in ``manifest_key``, paths relative to
    ``dataset_prefix``); ``labels`` maps label name -> class id (sorted names). ``steps`` is
    ``TrainingConfig.max_steps``. On success the worker creates the ``Generator`` row with its files under
    ``tenant_key(t, "generators", id, ...)`` (diffusers layout + ``cxrsynth.json`` + ``README.md``) and
    writes :class:`GeneratorTrainingResult`.

``pretraining`` -> :class:`PretrainingParams`
    Pretrain ``method`` on ``backbone`` over the images of ``datasets`` (each ``{id, prefix, origin,
    num_images, layout}``; a ``segmentation`` layout contributes its ``images/`` only) for ``steps``
    steps. The worker creates the ``Encoder`` row (status ``training`` -> ``ready``; ``failed`` /
    ``canceled``), its files under ``tenant_key(t, "encoders", id, ...)`` (``model.safetensors``,
    ``config.json``, ``README.md``), checkpoints under ``data_dir/checkpoints/<job id>`` (a redelivered
    task resumes) and writes :class:`PretrainingResult`.

``evaluation`` -> :class:`EvaluationParams`
    Evaluate ``encoder`` (``scratch:<backbone>`` or an encoder id, ``encoder_builtin`` when shipped) on
    ``train_dataset`` / ``test_dataset`` with ``models.evaluation``; ``Job.result`` is
    :class:`EvaluationResult` (the full report included). A tenant's own encoder also gets the
    summary in ``Encoder.metrics["evaluations"]``; built-in encoders are shared, so never.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.db.orm import JobKind, JobStatus
from app.schemas.common import WebhookUrl
from models.generator_kinds import (
    DEFAULT_AUTOENCODER_STEPS,
    GENERATOR_KINDS,
    TRAINABLE_RESOLUTIONS,
    kind_for_resolution,
)
from models.samplers import DEFAULT_SAMPLER, SamplerName
from models.samplers import DEFAULT_STEPS as DEFAULT_STEPS  # re-exported: app.services.generations reads it here
from models.samplers import SAMPLERS as SAMPLERS
from models.ssl_methods import DEFAULT_SSL_METHOD, SSLMethod

# The lists these schemas offer are the registries of models/ (samplers: models/samplers.py; SSL methods:
# models/ssl_methods.py; job kinds: app.db.orm.JobKind); their literals are checked against them at import.
SEED_MAX = 2**32 - 1
MAX_PRETRAINING_STEPS = 1_000_000
MAX_JOB_GPUS = 64  # ranks of one data-parallel training job (one worker machine: torchrun --nproc-per-node)


# --------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------
class JobProgress(BaseModel):
    """How far the job is: ``fraction`` = step / total (0 when total is unknown, 1 when succeeded)."""

    fraction: float = Field(ge=0.0, le=1.0)
    message: str
    step: int
    total: int


class JobOut(BaseModel):
    """A job of any kind. ``params`` are the resolved request (see module doc), ``result`` what it made."""

    id: str
    kind: JobKind
    status: JobStatus
    progress: JobProgress
    params: dict[str, Any]
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    webhook_url: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    compute_seconds: float = 0.0


class JobEventOut(BaseModel):
    """One progress or log line of a job; ``id`` increases (use it as ``Last-Event-ID``)."""

    id: int
    job_id: str
    created_at: datetime
    level: str
    message: str
    step: int | None = None
    total: int | None = None


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------
class GenerationRequest(BaseModel):
    """Make synthetic images. Give ``counts`` ({label: n}), or ``n`` with an optional ``label``.

    ``n`` alone splits the images evenly over the generator's labels (the first labels get the
    remainder). Labels are matched case-insensitively against the generator's label names.
    """

    model_config = ConfigDict(extra="forbid")

    generator_id: str | None = Field(None, max_length=64, description="Default: the built-in generator.")
    n: int | None = Field(None, ge=1, description="Number of images (at most max_images_per_job).")
    counts: dict[str, int] | None = Field(None, description="Images per label, e.g. {'pneumonia': 8}.")
    label: str | None = Field(None, min_length=1, max_length=100, description="One label for all n images.")
    sampler: SamplerName = DEFAULT_SAMPLER
    num_inference_steps: int | None = Field(None, ge=1, le=1000,
                                            description="Default per sampler: ddpm 1000, ddim 50, others 20.")
    guidance_scale: float = Field(2.0, ge=0.0, le=20.0, description="Classifier-free guidance; 0 = off.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Default: random, recorded in params.")
    name: str | None = Field(None, min_length=1, max_length=200, description="Name of the synthetic dataset.")
    webhook_url: WebhookUrl | None = None

    @model_validator(mode="after")
    def _one_way_to_count(self) -> GenerationRequest:
        if self.counts is not None:
            if self.n is not None or self.label is not None:
                raise ValueError("give either counts, or n (with an optional label), not both")
            if not self.counts:
                raise ValueError("counts must name at least one label")
            if any(v < 0 for v in self.counts.values()):
                raise ValueError("counts must be >= 0")
            if sum(self.counts.values()) <= 0:
                raise ValueError("counts must add up to at least 1 image")
        elif self.n is None:
            raise ValueError("give n (with an optional label) or counts")
        return self


class GeneratorTrainingRequest(BaseModel):
    """Train a class-conditional generator on one of the tenant's datasets. ``resolution`` picks the kind
    (``models.generator_kinds``): 32-128 px a pixel-space UNet, 224 or 256 px a latent generator (an
    autoencoder trained first for ``autoencoder_steps``, then a UNet on its latents for ``steps``)."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=200)
    resolution: int = Field(64, description="Image size in pixels; 224 and 256 train a latent generator.",
                            json_schema_extra={"enum": list(TRAINABLE_RESOLUTIONS)})
    steps: int = Field(3000, ge=1, le=200_000, description="Optimiser steps of the diffusion UNet.")
    autoencoder_steps: int | None = Field(
        None, ge=1, le=200_000,
        description=f"Latent generators only: autoencoder steps (default {DEFAULT_AUTOENCODER_STEPS}).")
    batch_size: int = Field(32, ge=1, le=512)
    learning_rate: float = Field(3e-4, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    gpus: int = Field(1, ge=1, le=MAX_JOB_GPUS, description=(
        "Processes (one per GPU) that train together, data-parallel with torchrun (DDP); batch_size is the "
        "global batch and must be a multiple of gpus. A job with gpus > 1 waits for a worker started with "
        "`cxrsynth worker --gpus ...` that has that many."))
    webhook_url: WebhookUrl | None = None

    @field_validator("resolution")
    @classmethod
    def _trainable(cls, value: int) -> int:
        kind_for_resolution(value)  # ValueError (422) names the trainable resolutions
        return value

    @model_validator(mode="after")
    def _autoencoder_steps_for_latent(self) -> GeneratorTrainingRequest:
        if self.autoencoder_steps is not None and kind_for_resolution(self.resolution) != "latent":
            raise ValueError(f"autoencoder_steps applies to latent generators "
                             f"({list(GENERATOR_KINDS['latent'])} px), not to {self.resolution} px")
        _check_global_batch(self.batch_size, self.gpus)
        return self

    @property
    def kind(self) -> str:
        """The generator kind this resolution trains."""
        return kind_for_resolution(self.resolution)


def _check_global_batch(batch_size: int, gpus: int) -> None:
    """A data-parallel job shares its global batch out evenly (models.distributed.check_global_batch)."""
    if batch_size % gpus:
        raise ValueError(f"batch_size ({batch_size}) is the global batch: it must be a multiple of gpus ({gpus})")


class PretrainingRequest(BaseModel):
    """Self-supervised encoder pretraining (DINO or SimCLR) on one or more of the tenant's datasets, real
    and/or synthetic. Give ``steps``, or ``epochs`` (passes over all images; converted to steps); neither
    means 100 epochs. Datasets in the segmentation layout (labels ``images`` and ``masks``) contribute
    their ``images`` only."""

    model_config = ConfigDict(extra="forbid")

    dataset_ids: list[str] = Field(min_length=1, max_length=32)
    name: str = Field(min_length=1, max_length=200)
    method: SSLMethod = DEFAULT_SSL_METHOD
    backbone: Literal["resnet18", "resnet50", "vit_small_patch16_224"] = "resnet18"
    resolution: int = Field(64, ge=32, le=512, description="Input size in pixels, a multiple of 16.")
    epochs: int | None = Field(None, ge=1, le=10_000)
    steps: int | None = Field(None, ge=1, le=MAX_PRETRAINING_STEPS)
    batch_size: int = Field(256, ge=2, le=4096)
    learning_rate: float | None = Field(None, gt=0.0, le=1.0, description="Peak learning rate; default per method.")
    fp16: bool = Field(False, description="Export the weights in float16 (half the download).")
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    gpus: int = Field(1, ge=1, le=MAX_JOB_GPUS, description=(
        "Processes (one per GPU) that train together, data-parallel with torchrun (DDP); batch_size is the "
        "global batch and must be a multiple of gpus. A job with gpus > 1 waits for a worker started with "
        "`cxrsynth worker --gpus ...` that has that many."))
    webhook_url: WebhookUrl | None = None

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> PretrainingRequest:
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give epochs or steps, not both")
        if self.resolution % 16:
            raise ValueError("resolution must be a multiple of 16 (ViT patch size)")
        if len(set(self.dataset_ids)) != len(self.dataset_ids):
            raise ValueError("dataset_ids must not repeat a dataset")
        _check_global_batch(self.batch_size, self.gpus)
        return self


class EvaluationRequest(BaseModel):
    """Downstream evaluation of an encoder (an encoder id, ``scratch`` or ``scratch:<backbone>``) on a
    train/test pair of the tenant's datasets: ``classification`` needs two-class ImageFolder datasets with
    the same labels, ``segmentation`` datasets in the ``images``/``masks`` layout."""

    model_config = ConfigDict(extra="forbid")

    encoder_id: str = Field(min_length=1, max_length=64)
    train_dataset_id: str = Field(min_length=1, max_length=64)
    test_dataset_id: str = Field(min_length=1, max_length=64)
    task: Literal["classification", "segmentation"] = "classification"
    mode: Literal["linear", "finetune"] | None = Field(
        None, description="Default: linear for classification, finetune for segmentation.")
    label_fraction: float = Field(1.0, gt=0.0, le=1.0, description="Share of the training split with labels.")
    epochs: int | None = Field(None, ge=1, le=1000, description="Training epochs; default per task.")
    resolution: int | None = Field(None, ge=16, le=512, description="Default: the encoder's (scratch: 64).")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the split, the training and the bootstrap.")
    webhook_url: WebhookUrl | None = None


# --------------------------------------------------------------------------------------------------
# Stored params (Job.params) and results (Job.result): the worker contract
# --------------------------------------------------------------------------------------------------
class GenerationParams(BaseModel):
    """``Job.params`` of a ``generation`` job (resolved: every default filled in)."""

    generator_id: str
    n: int = Field(description="Total images = sum(counts.values()).")
    counts: dict[str, int] = Field(description="Images per label, in generator label order (no zeros).")
    label_ids: dict[str, int | None] = Field(
        description="Generator class id of each label in counts; null = unconditional (the null class).")
    sampler: SamplerName
    num_inference_steps: int
    guidance_scale: float
    seed: int = Field(description="Image i is sampled from seed (seed, i).")
    resolution: int | None = Field(description="Generator resolution (pixels, square), if its config says.")
    name: str = Field(description="Name of the synthetic dataset the job creates.")


class GenerationResult(BaseModel):
    """``Job.result`` of a succeeded ``generation`` job (written by the worker)."""

    dataset_id: str
    num_images: int = Field(description="Summed by /metrics as cxrsynth_images_generated_total.")
    label_counts: dict[str, int] = {}
    links: dict[str, str] = Field(default_factory=dict, description="API paths of the dataset and its zip.")


class GeneratorTrainingParams(BaseModel):
    """``Job.params`` of a ``generator_training`` job."""

    dataset_id: str
    dataset_prefix: str
    manifest_key: str
    name: str = Field(description="Name of the generator the job creates.")
    labels: dict[str, int] = Field(description="Label name -> class id (sorted names, ids 0..k-1).")
    resolution: int
    kind: str = Field("pixel", description="Generator kind (models.generator_kinds): pixel or latent.")
    autoencoder_steps: int | None = Field(None, description="Latent generators: autoencoder steps.")
    steps: int
    batch_size: int
    learning_rate: float
    seed: int
    gpus: int = Field(1, description="Ranks the training runs on (1: in the worker process).")


class GeneratorTrainingResult(BaseModel):
    """``Job.result`` of a succeeded ``generator_training`` job (written by the worker)."""

    generator_id: str
    steps: int | None = None
    final_loss: float | None = None


class PretrainingDataset(BaseModel):
    """One dataset of a pretraining job, as the worker reads it."""

    id: str
    prefix: str
    origin: str
    num_images: int = Field(description="Images the job uses from it (masks excluded).")
    layout: Literal["imagefolder", "segmentation"]


class PretrainingParams(BaseModel):
    """``Job.params`` of a ``pretraining`` job (resolved: steps computed, seed drawn)."""

    dataset_ids: list[str]
    datasets: list[PretrainingDataset]
    num_images: int
    name: str = Field(description="Name of the encoder the job creates.")
    method: SSLMethod
    backbone: Literal["resnet18", "resnet50", "vit_small_patch16_224"]
    resolution: int
    epochs: int | None = Field(description="As requested (null when steps were given).")
    steps: int
    batch_size: int
    learning_rate: float | None
    fp16: bool
    seed: int
    gpus: int = Field(1, description="Ranks the training runs on (1: in the worker process).")


class PretrainingResult(BaseModel):
    """``Job.result`` of a succeeded ``pretraining`` job (written by the worker)."""

    encoder_id: str
    steps: int | None = None
    final_loss: float | None = None
    links: dict[str, str] = Field(default_factory=dict)


class EvaluationDataset(BaseModel):
    """A dataset of an evaluation job, as the worker reads it."""

    id: str
    prefix: str
    num_images: int
    label_counts: dict[str, int]


class EvaluationParams(BaseModel):
    """``Job.params`` of an ``evaluation`` job (mode resolved from the task)."""

    encoder: str = Field(description="'scratch:<backbone>' or the encoder id.")
    encoder_id: str | None = Field(description="Null for scratch.")
    encoder_builtin: bool
    task: Literal["classification", "segmentation"]
    mode: Literal["linear", "finetune"]
    label_fraction: float
    epochs: int | None
    resolution: int | None
    seed: int
    train_dataset: EvaluationDataset
    test_dataset: EvaluationDataset


class EvaluationResult(BaseModel):
    """``Job.result`` of a succeeded ``evaluation`` job (written by the worker)."""

    task: str
    mode: str
    label_fraction: float
    encoder: str
    metrics: dict[str, dict[str, float]] = Field(description="metric -> {value, low, high, confidence, ...}.")
    report: dict[str, Any] = Field(description="The full models.evaluation report (split, selection, config).")
