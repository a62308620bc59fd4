"""``cxrsynth pretrain`` and ``cxrsynth evaluate classification|segmentation`` (registered in ``app.cli``).

* ``pretrain --data DIR`` runs the self-supervised library (``models.ssl.pretrain``) here and writes an
  encoder folder (``model.safetensors`` + ``config.json`` + model card) to ``--out``; resumable with
  ``--resume``. ``pretrain --dataset-id ID`` runs a ``pretraining`` job instead: through a running
  service with ``--api/--key``, or embedded (local database, the worker's task code in this process),
  and unpacks the resulting encoder into ``--out``.
* ``evaluate classification|segmentation --encoder PATH|scratch --train-data DIR --test-data DIR``
  runs ``models.evaluation`` here and writes the report JSON (``--json``, else stdout).

User errors (missing folder, one class only, corrupt image, mask/image size mismatch...) exit with
code 2 and one readable line, never a traceback.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
import zipfile
from collections.abc import Callable
from enum import StrEnum
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
from models.probe_readouts import LINEAR_READOUTS
from models.ssl_methods import DEFAULT_SSL_METHOD, SSLMethod  # the choices: the registry (checked equal)
from models.torchrun import LaunchOptions

evaluate_app = typer.Typer(help="Downstream evaluation of an encoder (pneumonia classification, lung segmentation); "
                                "writes a JSON report.", no_args_is_help=True)

class Backbone(StrEnum):
    resnet18 = "resnet18"
    resnet50 = "resnet50"
    vit_small_patch16_224 = "vit_small_patch16_224"


class Mode(StrEnum):
    linear = "linear"
    finetune = "finetune"


# --------------------------------------------------------------------------------------------------
# pretrain
# --------------------------------------------------------------------------------------------------
def pretrain_cmd(
    out: Annotated[Path, typer.Option(help="Encoder folder to write (model.safetensors, config.json, README.md).")],
    data: Annotated[str | None, typer.Option(help="What to pretrain on, here: an image folder (ImageFolder or "
                                                  "loose images), a folder of WebDataset shards (an extracted "
                                                  "`datasets export --format webdataset`) or s3://bucket/prefix "
                                                  "(AWS_* environment variables); labels are never used.")] = None,
    dataset_id: Annotated[list[str] | None, typer.Option(
        "--dataset-id", help="Dataset id(s) of a pretraining job (repeatable): remote with --api/--key, "
                             "else on the embedded service.")] = None,
    method: Annotated[SSLMethod, typer.Option(help="Self-supervised method.")] = DEFAULT_SSL_METHOD,
    backbone: Annotated[Backbone, typer.Option(help="timm backbone (one input channel).")] = Backbone.resnet18,
    resolution: Annotated[int, typer.Option(help="Input size in pixels (a multiple of 16).")] = 64,
    epochs: Annotated[int | None, typer.Option(help="Passes over the data, converted to steps (default 100 "
                                                    "when neither --epochs nor --steps is given).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (instead of --epochs).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate (default: the method's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, batches and augmentations.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint (local runs).")] = False,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Resumable state (default OUT.ckpt).")] = None,
    fp16: Annotated[bool, typer.Option("--fp16/--fp32", help="Weights dtype of the export.")] = False,
    name: Annotated[str | None, typer.Option(help="Encoder name (jobs; default: the --out folder name).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (local runs).")] = "auto",
    nproc_per_node: NprocOpt = 1,
    nnodes: NnodesOpt = 1,
    rdzv_endpoint: RdzvEndpointOpt = None,
    rdzv_id: RdzvIdOpt = "cxrsynth-pretrain",
    api: ApiUrl = None,
    key: ApiKeyOpt = None,
) -> None:
    """Pretrain a chest X-ray encoder with DINO or SimCLR and export it for plain timm.

    With --nproc-per-node N (and --nnodes, --rdzv-endpoint for several machines) the run is data-parallel
    over N processes with torchrun; a job (--dataset-id) asks the service's worker for N GPUs."""
    options = launch_options(nproc_per_node, nnodes, rdzv_endpoint, rdzv_id, batch_size)
    if (data is None) == (not dataset_id):
        fail("give either --data DIR (run here) or --dataset-id ID (a pretraining job)")
    if epochs is not None and steps is not None:
        fail("give --epochs or --steps, not both")
    for flag, value in (("--epochs", epochs), ("--steps", steps)):
        if value is not None and value < 1:
            fail(f"{flag} must be at least 1 (got {value})")
    if resolution < 32 or resolution % 16:
        fail(f"--resolution must be a multiple of 16 and at least 32 (got {resolution})")
    if batch_size < 2:
        fail(f"--batch-size must be at least 2 (got {batch_size})")
    if dataset_id:
        body: dict[str, Any] = {
            "dataset_ids": list(dataset_id), "name": name or out.name, "method": method,
            "backbone": backbone.value, "resolution": resolution, "batch_size": batch_size, "seed": seed,
            "fp16": fp16,
        }
        if options.nnodes > 1:
            fail("--nnodes is for runs here (--data); a job uses the GPUs of one worker (--nproc-per-node)")
        if options.nproc_per_node > 1:
            body["gpus"] = options.nproc_per_node
        if learning_rate is not None:
            body["learning_rate"] = learning_rate
        if steps is not None:
            body["steps"] = steps
        elif epochs is not None:
            body["epochs"] = epochs
        if api:
            _pretrain_remote(api, key, body, out)
        else:
            _pretrain_embedded(body, out)
        return
    assert data is not None
    _pretrain_local(data, out, method, backbone.value, resolution, epochs, steps, batch_size, learning_rate,
                    seed, resume, checkpoint_dir or out.with_name(out.name + ".ckpt"), fp16, device, options)


def _count_images(data: str) -> int:
    """Images in an image folder, or samples in WebDataset shards (streamed later, never copied here)."""
    from models.data.folders import list_image_folder
    from models.ssl.data import shard_source
    from models.ssl.shards import index_shards

    source = shard_source(data)
    if source is not None:
        return index_shards(source).num_samples
    return len(list_image_folder(data))


def _pretrain_local(
    data: str, out: Path, method: str, backbone: str, resolution: int, epochs: int | None, steps: int | None,
    batch_size: int, learning_rate: float | None, seed: int, resume: bool, ckpt: Path, fp16: bool, device: str,
    options: LaunchOptions,
) -> None:
    from app.services.ssl_jobs import DEFAULT_EPOCHS, steps_for_epochs
    from models.callbacks import Canceled
    from models.checkpoints import CHECKPOINT_NAME
    from models.ssl import PretrainConfig, pretrain

    try:
        n_images = _count_images(data)
    except (ValueError, FileNotFoundError, OSError) as exc:
        fail(str(exc))
    max_steps = steps if steps is not None else steps_for_epochs(epochs or DEFAULT_EPOCHS, n_images, batch_size)
    has_checkpoint = (ckpt / CHECKPOINT_NAME).is_file()
    if resume and not has_checkpoint:
        fail(f"--resume: no checkpoint in {ckpt}")
    if has_checkpoint and not resume:
        fail(f"a checkpoint of an unfinished run is in {ckpt}: pass --resume to continue it, or delete it")
    overrides: dict[str, Any] = dict(
        method=method, backbone=backbone, resolution=resolution, max_steps=max_steps, batch_size=batch_size,
        seed=seed, warmup_steps=min(PretrainConfig.warmup_steps, max_steps // 10), export_fp16=fp16,
        checkpoint_every=max(1, min(PretrainConfig.checkpoint_every, max_steps)),
    )
    if learning_rate is not None:
        overrides["learning_rate"] = learning_rate
    try:
        config = PretrainConfig(**overrides)
    except ValueError as exc:
        fail(str(exc))
    console.print(f"{method} on {backbone} at {resolution} px: {n_images:,} images, {max_steps:,} steps of "
                  f"{batch_size}")
    # Ctrl-C stops between two steps with the state checkpointed (the library saves it on Canceled).
    interrupted = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set()) if in_main else None
    done = [0]
    try:
        with progress_bar() as bar:
            task = bar.add_task("pretraining", total=max_steps)

            def on_step(step: int, total: int, message: str) -> None:
                done[0] = step
                bar.update(task, completed=step, total=total, description=message[:60])
                if interrupted.is_set():
                    raise Canceled("interrupted")

            result: Any
            try:
                if options.distributed:
                    result = run_distributed("pretrain", options, data=data, out=out, config=config.to_dict(),
                                             ckpt=ckpt, resume=resume, device=device, on_step=on_step)
                else:
                    result = pretrain(data, config, out, checkpoint_dir=ckpt, resume=resume, on_step=on_step,
                                      device=device)
            except (ValueError, FileNotFoundError) as exc:
                fail(str(exc))
            except Canceled:
                console.print(f"[yellow]interrupted[/] after step {done[0]}/{max_steps}; the state is in {ckpt}: "
                              "run the same command with --resume to continue")
                raise typer.Exit(130) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if result is None:
        console.print("[green]done[/]: this machine's ranks finished; the machine of rank 0 wrote the encoder")
        return
    shutil.rmtree(ckpt, ignore_errors=True)  # the encoder is the result; an unfinished run keeps its state
    console.print(f"[green]pretrained[/] {result.steps} steps in {result.wall_seconds:.0f} s "
                  f"(final loss {result.final_loss:.4f}) -> {out}")


def _pretrain_remote(api: str, key: str | None, body: dict[str, Any], out: Path) -> None:
    from app.client import ApiError, CxrsynthClient

    if not key:
        fail("remote mode needs --key KEY (or CXRSYNTH_API_KEY)")
    with CxrsynthClient(api, key) as c:
        try:
            job = c.create_pretraining(**body)
        except ApiError as exc:
            fail(str(exc))
        console.print(f"job {job.id} {job.status.value}")
        with progress_bar() as bar:
            task = bar.add_task("pretraining", total=None)
            job = c.wait(job.id, on_progress=lambda j: bar.update(
                task, completed=j.progress.step, total=j.progress.total or None,
                description=(j.progress.message or j.status.value)[:60]))
        if job.status.value != "succeeded":
            fail(f"job {job.id} {job.status.value}: {json.dumps(job.error)}", code=1)
        encoder_id = (job.result or {})["encoder_id"]
        with tempfile.TemporaryDirectory() as tmp:
            archive = c.download_encoder(encoder_id, Path(tmp) / "encoder.zip")
            _unpack_encoder(archive, out)
    console.print(f"[green]encoder {encoder_id}[/] -> {out}")


def _unpack_encoder(archive: Path, out: Path) -> None:
    """Extract an encoder zip into ``out`` (the files may sit in one top folder)."""
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        configs = sorted(Path(tmp).rglob("config.json"))
        if not configs:
            fail(f"{archive} holds no config.json")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(configs[0].parent, out)


def _pretrain_embedded(body: dict[str, Any], out: Path) -> None:
    """Record a pretraining job on the embedded database and run it here; copy the encoder to ``out``."""
    from pydantic import ValidationError

    from app.core.config import get_settings
    from app.core.problems import ProblemError
    from app.db.orm import Encoder
    from app.db.session import get_sessionmaker, migrate
    from app.schemas.jobs import PretrainingRequest
    from app.services.ssl_jobs import create_pretraining

    settings = get_settings()
    migrate(settings.database_url)
    sessions = get_sessionmaker(settings.database_url)
    try:
        request = PretrainingRequest.model_validate(body)
    except ValidationError as exc:
        fail(validation_message(exc))
    with sessions() as s:
        tenant = local_tenant(s)
        try:
            job, _ = create_pretraining(s, settings, tenant.id, request, enqueue=False)
        except ProblemError as exc:
            fail(str(exc.detail))
        job_id = job.id
    finished, store = run_embedded_job(settings, job_id, "pretraining")
    if finished.status != "succeeded":
        fail(f"job {job_id} {finished.status}: {json.dumps(finished.error)}", code=1)
    with sessions() as s:
        enc = s.get(Encoder, (finished.result or {})["encoder_id"])
        assert enc is not None and enc.prefix
        prefix = enc.prefix
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for obj in store.list(prefix + "/"):
        rel = obj.key[len(prefix) + 1:]
        if rel.startswith("exports/"):
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        store.download_file(obj.key, out / rel)
    console.print(f"[green]encoder {enc.id}[/] (job {job_id}) -> {out}")


# --------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------
EncoderOpt = Annotated[str, typer.Option(
    help="An encoder folder (config.json + model.safetensors), 'scratch' (random ResNet-18) or "
         "'scratch:<timm name>'.")]
TrainOpt = Annotated[Path, typer.Option(help="Training folder; the validation split is carved from it.")]
TestOpt = Annotated[Path, typer.Option(help="Test folder, scored once by the selected model.")]
FractionOpt = Annotated[float, typer.Option(help="Share of the training split with labels, in (0, 1].")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Report path (default: print the JSON).")]
EpochsOpt = Annotated[int | None, typer.Option(help="Training epochs (fine-tuning / segmentation).")]
ResolutionOpt = Annotated[int | None, typer.Option(help="Input size (default: the encoder's; scratch 64).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the split, training and bootstrap.")]
BootstrapOpt = Annotated[int, typer.Option(help="Bootstrap resamples of the 95% intervals.")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda.")]


def _check_common(encoder: str, label_fraction: float, bootstrap: int, epochs: int | None,
                  resolution: int | None) -> None:
    if not 0.0 < label_fraction <= 1.0:
        fail(f"--label-fraction must be in (0, 1] (got {label_fraction})")
    if bootstrap < 10:
        fail(f"--bootstrap must be at least 10 (got {bootstrap})")
    if epochs is not None and epochs < 1:
        fail(f"--epochs must be at least 1 (got {epochs})")
    if resolution is not None and resolution < 16:
        fail(f"--resolution must be at least 16 (got {resolution})")
    if not encoder.startswith("scratch") and not Path(encoder).is_dir():
        fail(f"encoder not found: {encoder} (give an encoder folder, 'scratch' or 'scratch:<timm name>')")


def _finish_report(report: dict[str, Any], json_out: Path | None, primary: tuple[str, ...]) -> None:
    table = Table("metric", "value", "95% CI", title=f"{report['task']} ({report['mode']}, "
                                                     f"label fraction {report['label_fraction']:g}), "
                                                     f"test n={report['split']['test']}")
    for name, m in report["metrics"].items():
        style = "bold" if name in primary else None
        table.add_row(name, f"{m['value']:.4f}", f"[{m['low']:.4f}, {m['high']:.4f}]", style=style)
    Console(stderr=True).print(table)
    if json_out is None:
        print(json.dumps(report, indent=2))
    else:
        console.print(f"report: {json_out}")


def _run_evaluation(task: str, evaluate: Callable[..., dict[str, Any]], config_cls: Callable[..., Any],
                    primary: tuple[str, ...], *, encoder: str, train_data: Path, test_data: Path, mode: Mode,
                    label_fraction: float, json_out: Path | None, epochs: int | None, resolution: int | None,
                    seed: int, bootstrap: int, device: str, config_extra: dict[str, Any] | None = None) -> None:
    """Shared body of ``evaluate classification|segmentation``: check, run with a progress bar, print."""
    _check_common(encoder, label_fraction, bootstrap, epochs, resolution)
    kwargs: dict[str, Any] = {"seed": seed, "n_resamples": bootstrap, "resolution": resolution,
                              **(config_extra or {})}
    if epochs is not None:
        kwargs["epochs"] = epochs
    with progress_bar() as bar:
        bar_task = bar.add_task(task, total=None)

        def on_step(step: int, total: int, message: str) -> None:
            bar.update(bar_task, completed=step, total=total or None, description=message[:60])

        try:
            report = evaluate(encoder, train_data, test_data, mode=mode.value, label_fraction=label_fraction,
                              config=config_cls(**kwargs), json_path=json_out, on_step=on_step, device=device)
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc))
    _finish_report(report, json_out, primary)


@evaluate_app.command("classification")
def evaluate_classification_cmd(
    encoder: EncoderOpt,
    train_data: TrainOpt,
    test_data: TestOpt,
    mode: Annotated[Mode, typer.Option(help="linear: frozen features + logistic regression; finetune: "
                                            "end to end.")] = Mode.linear,
    label_fraction: FractionOpt = 1.0,
    json_out: JsonOpt = None,
    epochs: EpochsOpt = None,
    resolution: ResolutionOpt = None,
    seed: SeedOpt = 0,
    bootstrap: BootstrapOpt = 1000,
    device: DeviceOpt = "auto",
    readout: Annotated[list[str] | None, typer.Option(
        help=f"Linear probe: how frozen features are read, one of {', '.join(LINEAR_READOUTS)} (avg: the model's "
             "global pool; grid2: the last map pooled to 2x2; @2x: images at twice --resolution). Repeat it to "
             "let validation AUC choose, with C.")] = None,
) -> None:
    """Pneumonia vs normal on ImageFolder layouts (<label>/*.png|jpg): AUC, F1, accuracy, sensitivity,
    specificity with bootstrap 95% CIs; model and threshold selected on a patient-level validation split of
    the training folder."""
    from models.evaluation import ClassificationConfig, evaluate_classification

    if readout and mode is not Mode.linear:
        fail("--readout applies to --mode linear only")
    _run_evaluation("classification", evaluate_classification, ClassificationConfig, ("auc",), encoder=encoder,
                    train_data=train_data, test_data=test_data, mode=mode, label_fraction=label_fraction,
                    json_out=json_out, epochs=epochs, resolution=resolution, seed=seed, bootstrap=bootstrap,
                    device=device, config_extra={"linear_readouts": tuple(readout)} if readout else None)


@evaluate_app.command("segmentation")
def evaluate_segmentation_cmd(
    encoder: EncoderOpt,
    train_data: TrainOpt,
    test_data: TestOpt,
    mode: Annotated[Mode, typer.Option(help="linear: frozen encoder, decoder trained; finetune: "
                                            "everything.")] = Mode.finetune,
    label_fraction: FractionOpt = 1.0,
    json_out: JsonOpt = None,
    epochs: EpochsOpt = None,
    resolution: ResolutionOpt = None,
    seed: SeedOpt = 0,
    bootstrap: BootstrapOpt = 1000,
    device: DeviceOpt = "auto",
) -> None:
    """Lung segmentation on images/ + masks/ folders: a U-Net (DPT for ViTs) on the encoder; Dice, IoU,
    HD95 with bootstrap 95% CIs; the epoch is selected on a patient-level validation split."""
    from models.evaluation import SegmentationConfig, evaluate_segmentation

    _run_evaluation("segmentation", evaluate_segmentation, SegmentationConfig, ("dice",), encoder=encoder,
                    train_data=train_data, test_data=test_data, mode=mode, label_fraction=label_fraction,
                    json_out=json_out, epochs=epochs, resolution=resolution, seed=seed, bootstrap=bootstrap,
                    device=device)
