"""``cxrsynth`` command line (typer + rich).

Two ways to run jobs:

* **embedded** (the default, no server): ``cxrsynth generate --n 16 --out DIR`` records the job in the
  local SQLite database and runs the very same worker task code in this process, then writes PNGs and
  ``manifest.csv`` to ``DIR``;
* **remote**: with ``--api URL`` and ``--key KEY`` (or ``CXRSYNTH_API_URL`` / ``CXRSYNTH_API_KEY``), the
  command goes through the REST API with the typed client (``app.client``).

``cxrsynth serve`` runs the API and a worker on one machine (SQLite, local folder, filesystem broker);
``cxrsynth worker`` runs Celery workers for a production deployment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from app.cli_common import (
    ApiKeyOpt,
    ApiUrl,
    console,
    fail,
    local_tenant,
    progress_bar,
    run_embedded_job,
    validation_message,
)
from app.cli_distributed import NnodesOpt, NprocOpt, RdzvEndpointOpt, RdzvIdOpt, launch_options, run_distributed
from app.cli_export import datasets_export
from app.cli_privacy import privacy_check_cmd, privacy_index_cmd
from app.cli_ssl import evaluate_app, pretrain_cmd
from app.core.config import Settings, get_settings
from models.generator_kinds import DEFAULT_AUTOENCODER_STEPS, GENERATOR_KINDS, check_image_sizes, kind_for_resolution
from models.samplers import DEFAULT_SAMPLER, sampler_help

app = typer.Typer(help="cxrsynth: privacy-safe synthetic chest X-rays and encoders pretrained on them.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
tenants_app = typer.Typer(help="Tenants (hospitals) and their API keys.", no_args_is_help=True)
jobs_app = typer.Typer(help="List, watch and cancel jobs (through the API).", no_args_is_help=True)
datasets_app = typer.Typer(help="Upload and download datasets (through the API).", no_args_is_help=True)
encoders_app = typer.Typer(help="Pretrained encoders (through the API).", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
app.add_typer(jobs_app, name="jobs")
app.add_typer(datasets_app, name="datasets")
app.add_typer(encoders_app, name="encoders")
datasets_app.command("export")(datasets_export)  # app/cli_export.py
app.add_typer(evaluate_app, name="evaluate")  # app/cli_ssl.py
app.command("pretrain")(pretrain_cmd)
app.command("privacy-check")(privacy_check_cmd)  # app/cli_privacy.py
app.command("privacy-index")(privacy_index_cmd)

def _client(api: str | None, key: str | None) -> Any:
    from app.client import CxrsynthClient

    if not api or not key:
        fail("this command talks to a running service: give --api URL and --key KEY "
             "(or CXRSYNTH_API_URL / CXRSYNTH_API_KEY)")
    return CxrsynthClient(str(api), str(key))


def _parse_counts(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    counts: dict[str, int] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            fail(f"--counts takes label=n pairs separated by commas, e.g. normal=8,pneumonia=8 (got {part!r})")
        try:
            counts[name.strip()] = int(value)
        except ValueError:
            fail(f"--counts: {value!r} is not a whole number")
    return counts


# --------------------------------------------------------------------------------------------------
# serve / worker
# --------------------------------------------------------------------------------------------------
def _worker_command(queues: str, concurrency: int, pool: str, *, embedded: bool = False) -> list[str]:
    """The Celery worker command line; ``embedded`` (``serve``'s own worker) drops the banner and the
    per-task log lines (``worker/celery_app.py`` drops Celery's root-user warning for it)."""
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", *(["--quiet"] if embedded else []), "worker",
            "-Q", queues, "--concurrency", str(concurrency), "--pool", pool,
            "--loglevel", "WARNING" if embedded else "INFO", "--without-gossip", "--without-mingle",
            "--without-heartbeat"]


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown of the local worker (its task is resumable), then a kill after 30 s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def recover_unfinished_jobs(settings: Settings) -> int:
    """Re-send every queued or running job, and the export build of every pending upload or registration
    (embedded mode, before its only worker starts).

    The filesystem broker drops a message once read, so a job whose worker died with the process
    would be stranded; tasks are idempotent, so sending them again is safe.
    """
    from sqlalchemy import select

    from app.core.queue import TASK_BUILD_DATASET, TASK_START_JOB, send_task
    from app.db.orm import ACTIVE_STATUSES, Dataset, Job
    from app.db.session import session_scope

    queue_dir = settings.broker_dir / "queue"
    if queue_dir.is_dir():
        for f in queue_dir.iterdir():
            f.unlink(missing_ok=True)
    with session_scope(settings.database_url) as s:
        ids = list(s.scalars(select(Job.id).where(Job.status.in_(ACTIVE_STATUSES)).order_by(Job.created_at)))
        builds = list(s.scalars(select(Dataset.id).where(Dataset.status == "pending", Dataset.origin == "real",
                                                         Dataset.source_job_id.is_(None))
                                .order_by(Dataset.created_at)))
    for job_id in ids:
        send_task(settings, TASK_START_JOB, job_id)
    for dataset_id in builds:
        send_task(settings, TASK_BUILD_DATASET, dataset_id)
    return len(ids) + len(builds)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the API.")] = 8000,
    worker: Annotated[bool, typer.Option("--worker/--api-only", help="Also run a local worker.")] = True,
) -> None:
    """Run the API (and, embedded, a local worker): no server to start by hand."""
    import uvicorn

    from app.db.session import migrate
    from app.embedded import lifeline_env

    if "CXRSYNTH_PUBLIC_BASE_URL" not in os.environ:
        # Signed download links of the local store must point at this server.
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        os.environ["CXRSYNTH_PUBLIC_BASE_URL"] = f"http://{shown}:{port}"
        get_settings.cache_clear()
    settings = get_settings()
    migrate(settings.database_url)
    proc: subprocess.Popen[bytes] | None = None
    if worker:
        if settings.embedded:
            n = recover_unfinished_jobs(settings)
            if n:
                console.print(f"re-queued {n} unfinished job(s)")
        # One solo worker process: the machine's cores go to torch inside it. It watches this pid and
        # exits if this process dies without stopping it (SIGKILL, crash): see worker/lifeline.py.
        env = {**os.environ, **lifeline_env()}
        proc = subprocess.Popen(_worker_command("gpu,cpu", 1, "solo", embedded=True), env=env)
        console.print(f"worker started (pid {proc.pid})")
    if settings.embedded:
        console.print(f"embedded state (database, objects, queue) in {settings.data_dir}: shared by every "
                      "checkout on this machine; set CXRSYNTH_DATA_DIR to keep one apart")
    # uvicorn handles SIGTERM/SIGINT itself, then restores the previous handlers and re-raises the signal.
    # With the default SIGTERM handler that re-raise kills the process before `finally` can stop the
    # worker; this handler turns it into SystemExit so the worker stops with the server.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level="info")
    finally:
        if proc is not None:
            _stop_worker(proc)


@app.command("worker")
def worker_cmd(
    gpus: Annotated[str | None, typer.Option(
        help="GPU ids, e.g. 0,1,2,3: one worker process per GPU, plus one that runs training jobs asking for "
             "gpus > 1 over these GPUs with torchrun. cpu:N: one worker, plus N CPU ranks (gloo) for such "
             "jobs.")] = None,
    queues: Annotated[str, typer.Option(help="Queues to consume.")] = "gpu,cpu",
    concurrency: Annotated[int, typer.Option(help="Processes per worker (CPU only).")] = 1,
) -> None:
    """Run Celery worker(s). With --gpus, each GPU gets its own process with CUDA_VISIBLE_DEVICES set,
    so CUDA is initialised only in that child; one more process consumes the multi-GPU queue and trains
    such jobs over all listed GPUs (GPU leases keep it and the per-GPU processes off each other's GPUs)."""
    from app.core.devices import LEASED_GPU_ENV, worker_devices
    from app.core.queue import MULTI_GPU_QUEUE
    from app.db.session import migrate

    settings = get_settings()
    migrate(settings.database_url)
    if not gpus:
        os.execv(sys.executable, _worker_command(queues, concurrency, "prefork" if concurrency > 1 else "solo"))
    try:
        devices = worker_devices(settings.model_copy(update={"worker_gpus": gpus}))
    except ValueError as exc:
        fail(str(exc))
    procs = []
    if devices.kind == "cpu":
        procs.append(subprocess.Popen(_worker_command(queues, concurrency, "prefork" if concurrency > 1 else "solo")))
    for gpu in devices.ids if devices.kind == "cuda" else ():
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, LEASED_GPU_ENV: gpu}
        cmd = [*_worker_command(queues, 1, "solo"), "--hostname", f"gpu{gpu}@%h"]
        procs.append(subprocess.Popen(cmd, env=env))
    multi_env = {**os.environ, "CXRSYNTH_WORKER_GPUS": gpus}
    multi_cmd = [*_worker_command(MULTI_GPU_QUEUE, 1, "solo"), "--hostname", f"gpus{len(devices.ids)}@%h"]
    procs.append(subprocess.Popen(multi_cmd, env=multi_env))
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGTERM)


# --------------------------------------------------------------------------------------------------
# tenants
# --------------------------------------------------------------------------------------------------
@tenants_app.command("create")
def tenants_create(name: str) -> None:
    """Create a tenant; prints its API key and webhook secret ONCE (only hashes of keys are kept)."""
    from app.core.problems import ProblemError
    from app.db.session import get_sessionmaker, migrate
    from app.services.tenants import create_tenant

    settings = get_settings()
    migrate(settings.database_url)
    with get_sessionmaker(settings.database_url)() as s:
        try:
            tenant, key = create_tenant(s, name)
        except ProblemError as exc:
            fail(str(exc.detail))
    console.print(f"tenant [bold]{tenant.name}[/] ({tenant.id})")
    console.print("API key (shown once):")
    print(key)
    console.print(f"webhook secret (shown once): {tenant.webhook_secret}")


# --------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------
@app.command()
def generate(
    out: Annotated[Path, typer.Option(help="Folder for PNGs + manifest.csv (embedded) or the zip (remote).")],
    n: Annotated[int | None, typer.Option(help="Number of images.")] = None,
    label: Annotated[str | None, typer.Option(help="One label for all images, e.g. pneumonia.")] = None,
    counts: Annotated[str | None, typer.Option(help="Per-label counts, e.g. normal=8,pneumonia=8.")] = None,
    sampler: Annotated[str | None, typer.Option(help=sampler_help())] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed; image i comes from (seed, i).")] = None,
    generator: Annotated[Path | None, typer.Option(help="A generator folder (embedded mode).")] = None,
    generator_id: Annotated[str | None, typer.Option(help="A generator id (remote mode).")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Remote: wait and download.")] = True,
    api: ApiUrl = None,
    key: ApiKeyOpt = None,
) -> None:
    """Generate synthetic chest X-rays (embedded by default; through the API with --api/--key)."""
    if n is None and not counts:
        n = 16
    count_map = _parse_counts(counts)
    if count_map is not None:
        n = None
    if api:
        _generate_remote(api, key, out, dict(n=n, counts=count_map, label=label, sampler=sampler,
                                             num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                                             generator_id=generator_id), wait)
        return
    _generate_embedded(out, n, count_map, label, sampler, steps, guidance, seed, generator)


def _generate_remote(api: str, key: str | None, out: Path, body: dict[str, Any], wait: bool) -> None:
    from app.client import ApiError

    with _client(api, key) as c:
        try:
            job = c.create_generation(**body)
        except ApiError as exc:
            fail(str(exc))
        console.print(f"job {job.id} {job.status.value}")
        if not wait:
            print(job.id)
            return
        with progress_bar() as bar:
            task = bar.add_task("generating", total=None)

            def show(j: Any) -> None:
                bar.update(task, completed=j.progress.step, total=j.progress.total or None,
                           description=j.progress.message or j.status.value)

            job = c.wait(job.id, on_progress=show)
        if job.status.value != "succeeded":
            fail(f"job {job.id} {job.status.value}: {job.error}", code=1)
        dataset_id = (job.result or {})["dataset_id"]
        target = out / f"{dataset_id}.zip" if out.suffix != ".zip" else out
        c.download_dataset(dataset_id, target)
        console.print(f"downloaded {target}")


def _generate_embedded(out: Path, n: int | None, counts: dict[str, int] | None, label: str | None,
                       sampler: str | None, steps: int | None, guidance: float | None, seed: int | None,
                       generator_dir: Path | None) -> None:
    """Record the job in the local database and run the worker's task code in this process."""
    from pydantic import ValidationError

    from app.core.problems import ProblemError
    from app.db.orm import Dataset
    from app.db.session import get_sessionmaker, migrate
    from app.schemas.jobs import GenerationRequest
    from app.services.generations import create_generation
    from app.services.model_assets import ensure_builtin_generators

    settings = get_settings()
    if generator_dir is not None:
        if not (generator_dir / "cxrsynth.json").is_file():
            fail(f"{generator_dir} is not a cxrsynth generator folder (no cxrsynth.json)")
        settings = settings.model_copy(update={"default_generator_dir": generator_dir.resolve()})
    migrate(settings.database_url)
    sessions = get_sessionmaker(settings.database_url)
    body = {k: v for k, v in dict(n=n, counts=counts, label=label, sampler=sampler, num_inference_steps=steps,
                                  guidance_scale=guidance, seed=seed).items() if v is not None}
    try:
        request = GenerationRequest.model_validate(body)
    except ValidationError as exc:
        fail(validation_message(exc))
    with sessions() as s:
        tenant = local_tenant(s)
        ensure_builtin_generators(s, settings)
        try:
            # Records the job exactly as the API does (validation, limits, params the worker reads).
            job, _ = create_generation(s, settings, tenant.id, request, enqueue=False)
        except ProblemError as exc:
            fail(str(exc.detail))
        job_id = job.id
    finished, store = run_embedded_job(settings, job_id, "generating", final_status=True)
    if finished.status != "succeeded":
        fail(f"job {finished.id} {finished.status}: {json.dumps(finished.error)}", code=1)
    with sessions() as s:
        dataset = s.get(Dataset, (finished.result or {})["dataset_id"])
        assert dataset is not None
    written = _export_folder(store, dataset, out)
    console.print(f"[green]{written} images[/] in {out} (manifest.csv, card.json); job {job_id}, dataset {dataset.id}; "
                  f"embedded state in {settings.data_dir}")
    console.print(_gate_line(dataset.gate_status, dataset.privacy or {}))


def _gate_line(status: str, summary: dict[str, Any]) -> str:
    """One line on the memorisation gate's verdict, for the end of ``generate``."""
    if status == "not_run":
        return f"[yellow]privacy gate not run[/]: {summary.get('reason', 'the generator has no privacy index')}"
    counts = summary.get("counts", {})
    colour = "green" if status == "passed" else "red"
    return (f"[{colour}]privacy gate {status}[/]: {counts.get('replaced_images', 0)} of {counts.get('images', '?')} "
            f"images were too close to a training image and were replaced by new samples; "
            f"{counts.get('failed_images', 0)} still too close (privacy_report.json, privacy_report.png)")


def _export_folder(store: Any, dataset: Any, out: Path) -> int:
    """Copy a dataset's images, manifest, card and privacy report from the store into ``out`` (label subfolders)."""
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for obj in store.list(dataset.prefix + "/"):
        dest = out / obj.key[len(dataset.prefix) + 1:]
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(obj.key, dest)
        n += 1
    base = dataset.prefix.rsplit("/", 1)[0]
    for name, target in (("manifest.csv", "manifest.csv"), ("card.json", "card.json"),
                         ("privacy/report.json", "privacy_report.json"), ("privacy/report.png", "privacy_report.png")):
        if store.exists(f"{base}/{name}"):
            store.download_file(f"{base}/{name}", out / target)
    return n


# --------------------------------------------------------------------------------------------------
# train-generator (library call, no service)
# --------------------------------------------------------------------------------------------------
@app.command("train-generator")
def train_generator_cmd(
    data: Annotated[Path, typer.Option(help="ImageFolder (LABEL/*.png|jpg) or a folder of images.")],
    out: Annotated[Path, typer.Option(help="Where the diffusers-format generator is written.")],
    resolution: Annotated[int, typer.Option(
        help=f"Image size in pixels: {', '.join(f'{k} {list(v)}' for k, v in GENERATOR_KINDS.items())}.")] = 64,
    steps: Annotated[int, typer.Option(help="Optimiser steps of the diffusion UNet.")] = 3000,
    autoencoder_steps: Annotated[int | None, typer.Option(
        help=f"Latent generators: autoencoder steps (default {DEFAULT_AUTOENCODER_STEPS}).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Resumable state (default OUT.ckpt).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint (either stage).")] = False,
    init_from: Annotated[Path | None, typer.Option(
        help="Generator folder to warm-start from (a latent one also lends its autoencoder).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    nproc_per_node: NprocOpt = 1,
    nnodes: NnodesOpt = 1,
    rdzv_endpoint: RdzvEndpointOpt = None,
    rdzv_id: RdzvIdOpt = "cxrsynth-train-generator",
) -> None:
    """Train a diffusion generator on a folder of chest X-rays (runs here, no service needed).

    64 px (32-128) trains a UNet on pixels; 224 or 256 px a latent generator: an autoencoder first,
    then a UNet on its latents. Progress shows each stage. --nproc-per-node N trains the UNet
    data-parallel over N processes with torchrun (--nnodes and --rdzv-endpoint for several machines)."""
    options = launch_options(nproc_per_node, nnodes, rdzv_endpoint, rdzv_id, batch_size)
    from models.data.folders import folder_image_sizes
    from models.diffusion.config import TrainingConfig
    from models.diffusion.latent import LatentGeneratorConfig, train_latent_generator
    from models.diffusion.training import train_generator

    try:
        kind = kind_for_resolution(resolution)
        if autoencoder_steps is not None and kind != "latent":
            raise ValueError(f"--autoencoder-steps applies to latent generators ({list(GENERATOR_KINDS['latent'])} px)")
        if kind == "latent":
            check_image_sizes(resolution, folder_image_sizes(data))
            latent = LatentGeneratorConfig.for_resolution(
                resolution, autoencoder={"max_steps": autoencoder_steps or DEFAULT_AUTOENCODER_STEPS},
                max_steps=steps, batch_size=batch_size)
        else:
            config = TrainingConfig(resolution=resolution, max_steps=steps, batch_size=batch_size)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    ckpt = checkpoint_dir or out.with_name(out.name + ".ckpt")
    with progress_bar() as bar:
        task = bar.add_task("training", total=steps)

        def on_step(step: int, total: int, message: str) -> None:
            bar.update(task, completed=step, total=total, description=message[:60])

        result: Any
        try:
            if options.distributed:
                launch_task = "train_latent_generator" if kind == "latent" else "train_generator"
                result = run_distributed(launch_task, options, data=data, out=out,
                                         config=(latent if kind == "latent" else config).to_dict(), ckpt=ckpt,
                                         resume=resume, device=device, on_step=on_step, init_from=init_from)
            elif kind == "latent":
                result = train_latent_generator(data, out, latent, checkpoint_dir=ckpt, resume=resume,
                                                on_step=on_step, device=device, init_from=init_from)
            else:
                result = train_generator(data, out, config, checkpoint_dir=ckpt, resume=resume, on_step=on_step,
                                         device=device, init_from=init_from)
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc))
    if result is None:
        console.print("[green]done[/]: this machine's ranks finished; the machine of rank 0 wrote the generator")
        return
    console.print(f"[green]trained[/] a {kind} generator ({resolution} px), {result.steps} UNet steps in "
                  f"{result.wall_seconds:.0f} s -> {out}")


@app.command("generator-report")
def generator_report_cmd(
    generator: Annotated[Path, typer.Option(help="Generator folder (diffusers layout + cxrsynth.json).")],
    real: Annotated[Path, typer.Option(help="Real ImageFolder to compare with (e.g. kermany-pneumonia).")],
    json_out: Annotated[Path, typer.Option("--json", help="Where the report JSON is written.")],
    n: Annotated[int, typer.Option(help="Synthetic images to sample.")] = 1000,
    sampler: Annotated[str, typer.Option(help=sampler_help())] = DEFAULT_SAMPLER,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (sampler default when unset).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the samples and of the real halves.")] = 0,
    grid: Annotated[Path | None, typer.Option(help="PNG grid, synthetic beside real (default JSON.png).")] = None,
) -> None:
    """Quality of a generator: domain FID, precision/recall/density/coverage, diversity and label
    fidelity against real images, next to a real-vs-real row as the yardstick."""
    from models.diffusion.quality import generator_quality_report

    if not (generator / "cxrsynth.json").is_file():
        fail(f"{generator} is not a generator folder (no cxrsynth.json)")
    if n < 2:
        fail(f"--n must be at least 2 (got {n})")
    with progress_bar() as bar:
        task = bar.add_task("report", total=None)

        def on_step(step: int, total: int, message: str) -> None:
            bar.update(task, completed=step, total=total or None, description=message[:60])

        try:
            report = generator_quality_report(generator, real, n, sampler=sampler, num_inference_steps=steps,
                                              guidance_scale=guidance, seed=seed, json_path=json_out,
                                              grid_path=grid or json_out.with_suffix(".png"), on_step=on_step)
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc))
    rows = report.get("rows", report)
    table = Table("row", "FID", "precision", "recall", "density", "coverage")
    for name in ("synthetic_vs_real", "real_vs_real"):
        r = rows.get(name, {}) if isinstance(rows, dict) else {}
        table.add_row(name, *(f"{r.get(k, float('nan')):.3f}" if isinstance(r.get(k), (int, float)) else "-"
                              for k in ("fid", "precision", "recall", "density", "coverage")))
    Console().print(table)
    console.print(f"report: {json_out}")


# --------------------------------------------------------------------------------------------------
# jobs / datasets / encoders (remote)
# --------------------------------------------------------------------------------------------------
@jobs_app.command("list")
def jobs_list(api: ApiUrl = None, key: ApiKeyOpt = None, kind: str | None = None, status: str | None = None,
              limit: int = 20) -> None:
    """The newest jobs."""
    table = Table("id", "kind", "status", "progress", "created")
    with _client(api, key) as c:
        for i, j in enumerate(c.list_jobs(kind=kind, status=status)):
            if i >= limit:
                break
            table.add_row(j.id, j.kind.value, j.status.value, f"{j.progress.fraction:.0%}", str(j.created_at))
    Console().print(table)


@jobs_app.command("watch")
def jobs_watch(job_id: str, api: ApiUrl = None, key: ApiKeyOpt = None) -> None:
    """Follow a job until it finishes."""
    with _client(api, key) as c, progress_bar() as bar:
        task = bar.add_task(job_id, total=None)
        job = c.wait(job_id, on_progress=lambda j: bar.update(
            task, completed=j.progress.step, total=j.progress.total or None,
            description=j.progress.message or j.status.value))
    console.print(f"job {job.id}: {job.status.value}")
    if job.status.value != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, api: ApiUrl = None, key: ApiKeyOpt = None) -> None:
    """Cancel a job (a queued job at once; a running one between two steps)."""
    from app.client import ApiError

    with _client(api, key) as c:
        try:
            job = c.cancel_job(job_id)
        except ApiError as exc:
            fail(str(exc))
    console.print(f"job {job.id}: {job.status.value} (cancel requested: {job.cancel_requested})")


@datasets_app.command("upload")
def datasets_upload(path: Path, name: str, api: ApiUrl = None, key: ApiKeyOpt = None) -> None:
    """Upload a zip of an ImageFolder, or a folder (zipped on the fly)."""
    from app.client import ApiError

    upload = path
    tmp: Path | None = None
    if path.is_dir():
        tmp = Path(shutil.make_archive(str(Path(os.environ.get("TMPDIR", "/tmp")) / f"cxr-{os.getpid()}"),
                                       "zip", root_dir=path))
        upload = tmp
    try:
        with _client(api, key) as c:
            ds = c.upload_dataset(upload, name)
    except ApiError as exc:
        fail(str(exc))
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    console.print(f"dataset {ds.id}: {ds.num_images} images {ds.label_counts}")


@datasets_app.command("download")
def datasets_download(dataset_id: str, out: Path, format: str = "zip", api: ApiUrl = None,
                      key: ApiKeyOpt = None) -> None:
    """Download a dataset export through its signed URL."""
    from app.client import ApiError

    with _client(api, key) as c:
        try:
            path = c.download_dataset(dataset_id, out, format)
        except ApiError as exc:
            fail(str(exc))
    console.print(f"downloaded {path}")


@encoders_app.command("download")
def encoders_download(encoder_id: str, out: Path, api: ApiUrl = None, key: ApiKeyOpt = None) -> None:
    """Download a pretrained encoder (zip of safetensors + config.json + model card)."""
    from app.client import ApiError

    with _client(api, key) as c:
        try:
            path = c.download_encoder(encoder_id, out)
        except ApiError as exc:
            fail(str(exc))
    console.print(f"downloaded {path}")


def main() -> None:
    """Entry point of the ``cxrsynth`` script."""
    app()


if __name__ == "__main__":
    main()
