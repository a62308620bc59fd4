"""The memorisation gate inside generation jobs, on the real stack (Postgres + S3 on SeaweedFS), run inline.

A tiny generator gets a privacy index whose "training set" contains two of the very images the job will
generate first (as if the generator had memorised them): the gate must reject exactly those, replace
them from new seeds, keep N images, record it all in the manifest and the privacy report, and do the
same bytes whatever the sharding. With one attempt allowed the dataset's gate fails instead; without a
privacy index the gate is recorded as not run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.core.config import Settings
from app.core.queue import TASK_START_JOB
from app.db.orm import Dataset, Generator, Job
from app.db.session import get_sessionmaker, migrate
from app.services.tenants import create_tenant
from worker.dispatch import InlineDispatcher
from worker.runtime import WorkerContext
from worker.tasks.jobs import task_registry
from worker.tasks.privacy import attempt_seed, privacy_prefix, record_key

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

SEED, N, MEMORISED = 11, 6, (0, 3)
JOB = {"sampler": "ddim", "num_inference_steps": 4, "guidance_scale": 1.5}


def _first_attempt_images(generator_dir: Path, plan: list[str | None], indices: tuple[int, ...]) -> np.ndarray:
    """What the job generates first for ``indices`` (the pipeline's output depends only on (seed, i))."""
    from models.diffusion.pipeline import CXRDiffusionPipeline

    pipe = CXRDiffusionPipeline.from_pretrained(generator_dir, device="cpu")
    return pipe(labels=[plan[i] for i in indices], image_indices=list(indices), seed=SEED,
                sampler=JOB["sampler"], num_inference_steps=JOB["num_inference_steps"],
                guidance_scale=JOB["guidance_scale"]).images


@pytest.fixture(scope="module")
def memorising_generator(tiny_generator: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny generator whose privacy index holds two of its own first samples."""
    from models.data.folders import load_pneumoniamnist
    from models.diffusion.pipeline import plan_generation
    from models.privacy import build_privacy_index, save_privacy_index

    gen = tmp_path_factory.mktemp("privacy") / "generator-memorising"
    shutil.copytree(tiny_generator, gen)
    meta = json.loads((gen / "cxrsynth.json").read_text())
    names = [k for k, _ in sorted(meta["labels"].items(), key=lambda kv: kv[1])]
    counts = {name: N // len(names) + (1 if i < N % len(names) else 0) for i, name in enumerate(names)}
    plan = plan_generation(counts=counts, seed=SEED, label_names=names)
    memorised = _first_attempt_images(gen, plan, MEMORISED)
    res = int(meta["resolution"])
    real, _ = load_pneumoniamnist(shared_data / "pneumoniamnist" / "pneumoniamnist_28.npz", "val")
    real = np.stack([np.asarray(Image.fromarray(im).resize((res, res), Image.Resampling.BICUBIC)) for im in real[:80]])
    index, cal = build_privacy_index(np.concatenate([real, memorised]), source="test: real + 2 memorised samples",
                                     device="cpu")
    # The tiny generator's blurry blobs all look alike to the embedding network (measured: 0.94-0.99 for
    # unrelated samples), so every replacement would be rejected too. This test is about the worker's
    # replacement plumbing: only the pixel test (and the exact-copy check) decides here.
    save_privacy_index(gen, index, dataclasses.replace(cal, embedding_threshold=1.01))
    return gen


@pytest.fixture
def stack(settings_factory: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings: Settings = settings_factory(tmp_path, stack="real", shard_size=3, device="cpu")
    migrate(settings.database_url)
    sessions = get_sessionmaker(settings.database_url)
    with sessions() as s:
        tenant, _ = create_tenant(s, f"privacy-{tmp_path.name}")
        s.commit()
        yield {"settings": settings, "sessions": sessions, "tenant": tenant}


def _register(stack: dict[str, Any], path: Path) -> str:
    with stack["sessions"]() as s:
        gen = Generator(tenant_id=stack["tenant"].id, name=path.name, builtin_path=str(path),
                        config=json.loads((path / "cxrsynth.json").read_text()))
        s.add(gen)
        s.commit()
        return gen.id


def _run(stack: dict[str, Any], generator_id: str, settings: Settings | None = None) -> tuple[WorkerContext, str]:
    with stack["sessions"]() as s:
        gen = s.get(Generator, generator_id)
        labels = gen.config["labels"]
        names = sorted(labels, key=labels.get)
        counts = {name: N // len(names) + (1 if i < N % len(names) else 0) for i, name in enumerate(names)}
        job = Job(tenant_id=stack["tenant"].id, kind="generation",
                  params={"generator_id": generator_id, "n": N, "counts": counts, "label_ids": labels, "seed": SEED,
                          "resolution": gen.config["resolution"], "name": "synthetic", **JOB})
        s.add(job)
        s.commit()
        job_id = job.id
    ctx = WorkerContext(settings or stack["settings"], InlineDispatcher({}))
    dispatcher = InlineDispatcher(task_registry(ctx))
    ctx.dispatcher = dispatcher
    dispatcher.send(TASK_START_JOB, job_id)
    dispatcher.drain()
    return ctx, job_id


def _dataset(stack: dict[str, Any], job_id: str) -> Dataset:
    with stack["sessions"]() as s:
        job = s.get(Job, job_id)
        assert job.status == "succeeded", job.error
        ds = s.get(Dataset, job.result["dataset_id"])
        s.expunge(ds)
        return ds


def _manifest(ctx: WorkerContext, ds: Dataset) -> list[dict[str, str]]:
    assert ds.manifest_key
    return list(csv.DictReader(io.StringIO(ctx.store.get_bytes(ds.manifest_key).decode())))


def test_memorised_samples_are_replaced_and_the_dataset_keeps_n_images(
    stack: dict[str, Any], memorising_generator: Path
) -> None:
    from models.diffusion.pipeline import image_seed

    gen_id = _register(stack, memorising_generator)
    ctx, job_id = _run(stack, gen_id)
    ds = _dataset(stack, job_id)
    rows = _manifest(ctx, ds)
    assert len(rows) == N and ds.num_images == N
    assert len(list(ctx.store.list(ds.prefix + "/"))) == N
    assert ds.gate_status == "passed", ds.privacy
    for i in MEMORISED:  # the memorised samples were rejected (exact copies) and replaced
        row = rows[i]
        assert row["replaced"] == "true"
        record = json.loads(ctx.store.get_bytes(record_key(ds, i)))
        assert record["passed"] and record["attempts"] >= 2
        assert record["rejected"][0]["exact_copy"] and record["rejected"][0]["seed"] == image_seed(SEED, i)
        assert int(row["seed"]) == record["seed"] != image_seed(SEED, i)
        assert record["seed"] == image_seed(attempt_seed(SEED, record["attempts"] - 1), i)
    thresholds = ds.privacy["thresholds"]
    for row in rows:  # every released image is below both thresholds
        assert float(row["nn_pixel_similarity"]) <= thresholds["pixel"]
        assert float(row["nn_embedding_similarity"]) <= thresholds["embedding"]
    counts = ds.privacy["counts"]
    assert counts["images"] == N and counts["replaced_images"] >= 2 and counts["failed_images"] == 0
    assert counts["exact_copies"] >= 2 and ds.privacy["memorisation_rate"]["after_gate"] == 0
    report = json.loads(ctx.store.get_bytes(f"{privacy_prefix(ds)}/report.json"))
    assert report["status"] == "passed" and len(report["closest_pairs"]) == N
    assert ctx.store.get_bytes(f"{privacy_prefix(ds)}/report.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert ds.card["privacy_gate"]["status"] == "passed"
    # Same bytes with one shard instead of two: replacements are a function of (seed, i, attempt).
    ctx2, job2 = _run(stack, gen_id, stack["settings"].model_copy(update={"shard_size": N}))
    assert [(r["file"], r["sha256"], r["seed"]) for r in _manifest(ctx2, _dataset(stack, job2))] == [
        (r["file"], r["sha256"], r["seed"]) for r in rows]


def test_gate_fails_when_attempts_run_out(stack: dict[str, Any], memorising_generator: Path) -> None:
    gen_id = _register(stack, memorising_generator)
    ctx, job_id = _run(stack, gen_id, stack["settings"].model_copy(update={"privacy_max_attempts": 1}))
    ds = _dataset(stack, job_id)
    rows = _manifest(ctx, ds)
    assert len(rows) == N and ds.gate_status == "failed"
    assert ds.privacy["counts"]["failed_images"] >= 2 and ds.privacy["memorisation_rate"]["after_gate"] > 0
    for i in MEMORISED:
        assert float(rows[i]["nn_pixel_similarity"]) > 0.999 and rows[i]["replaced"] == "false"


def test_generator_without_privacy_index_records_not_run(
    stack: dict[str, Any], tiny_generator: Path, tmp_path: Path
) -> None:
    from models.privacy import PRIVACY_CALIBRATION, PRIVACY_INDEX

    legacy = tmp_path / "generator-legacy"
    shutil.copytree(tiny_generator, legacy)
    for name in (PRIVACY_INDEX, PRIVACY_CALIBRATION):
        (legacy / name).unlink(missing_ok=True)
    ctx, job_id = _run(stack, _register(stack, legacy))
    ds = _dataset(stack, job_id)
    assert ds.gate_status == "not_run" and "privacy index" in ds.privacy["reason"]
    rows = _manifest(ctx, ds)
    assert len(rows) == N and all(r["nn_pixel_similarity"] == "" for r in rows)
