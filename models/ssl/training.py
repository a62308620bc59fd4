"""The pretraining loop shared by DINO and SimCLR: data, on-device views, AdamW, checkpoints, export.

:func:`pretrain` takes an image folder, a uint8 array or a Dataset, trains the method named in the
:class:`~models.ssl.config.PretrainConfig`, checkpoints atomically (resuming is bit-for-bit exact on
CPU), reports progress through ``on_step`` (which may raise :class:`~models.callbacks.Canceled`) and
exports the encoder with :func:`~models.ssl.export.export_encoder`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightly.utils.scheduler import CosineWarmupScheduler
from timm.optim import param_groups_weight_decay
from torch.utils.data import Dataset

from models.callbacks import Canceled, OnStep, no_progress
from models.checkpoints import CHECKPOINT_NAME, read_checkpoint, save_checkpoint_atomic
from models.device import Precision, autocast_for, pick_device, resolve_precision
from models.distributed import World, agree, check_global_batch, world, wrap_ddp
from models.ssl.augment import MultiViewAugment, normalize
from models.ssl.backbones import backbone_kwargs, check_input_size, create_backbone
from models.ssl.base import SSLModel
from models.ssl.config import PretrainConfig
from models.ssl.data import DataSummary, pretraining_dataset, pretraining_loader
from models.ssl.dino import DINO
from models.ssl.shards import ShardSource
from models.ssl.simclr import SimCLR

CHECKPOINT_FORMAT = "cxrsynth-ssl-checkpoint/1"


@dataclass
class PretrainResult:
    """What a finished pretraining run produced (``out_dir`` is ``None`` when export was skipped)."""

    out_dir: Path | None
    method: str
    backbone: str
    steps: int
    final_loss: float
    wall_seconds: float
    device: str
    data: DataSummary
    losses: list[float] = field(default_factory=list)


# The SSL methods by name; an unknown name fails loudly (it never falls back to another method).
SSL_METHODS: dict[str, type[DINO] | type[SimCLR]] = {DINO.method: DINO, SimCLR.method: SimCLR}


def build_ssl_model(config: PretrainConfig) -> SSLModel:
    """A fresh DINO or SimCLR model on a randomly initialised timm backbone (``in_chans=1``)."""
    if config.method not in SSL_METHODS:
        raise ValueError(f"unknown SSL method {config.method!r}; known: {', '.join(SSL_METHODS)}")
    backbone = create_backbone(config.backbone, config.resolution, config.backbone_kwargs)
    if config.method == "dino" and config.n_local_crops > 0:
        check_input_size(backbone, config.backbone, config.local_size, "the local crop size")
    return SSL_METHODS[config.method](backbone, config)


def load_checkpoint(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`pretrain` (CPU tensors)."""
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    state = read_checkpoint(checkpoint_dir)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an SSL checkpoint (format {state.get('format')!r})")
    return state


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Smallest view side that gets bf16 on a CPU. Measured with torch 2.14.1 / oneDNN on AVX512-BF16: a
# ResNet-18 trained on 32 px global + 16 px local views in bf16 gives different losses run to run and
# sometimes NaN after the first step; 48/24 and 64/32 px views are bit-reproducible. Views below this
# side run in fp32 on CPU (``auto``) or are refused (``bf16``).
CPU_BF16_MIN_VIEW = 32


def training_precision(config: PretrainConfig, dev: torch.device) -> Precision:
    """The arithmetic of a run (``fp32`` or ``bf16``), resolved from ``config.precision`` for ``dev``."""
    arithmetic = resolve_precision(config.precision, dev)
    local = config.method == "dino" and config.n_local_crops > 0  # SimCLR has global views only
    smallest = min(config.resolution, config.local_size) if local else config.resolution
    if dev.type == "cpu" and arithmetic == "bf16" and smallest < CPU_BF16_MIN_VIEW:
        if config.precision == "bf16":
            raise ValueError(f"bf16 on CPU needs views of at least {CPU_BF16_MIN_VIEW} px (the smallest here is "
                             f"{smallest} px): oneDNN's bf16 kernels are not reproducible below that")
        return "fp32"
    return arithmetic


def _device_words(dev: torch.device, arithmetic: Precision) -> str:
    if dev.type == "cuda":
        return f"CUDA, {torch.cuda.get_device_name(dev)}, {arithmetic}"
    return f"CPU, {torch.get_num_threads()} threads, {arithmetic}"


@dataclass
class _Run:
    """What a pretraining run trains and checkpoints: the data, the model and its optimiser state."""

    config: PretrainConfig
    dataset: Dataset[torch.Tensor]
    summary: DataSummary
    dev: torch.device
    arithmetic: Precision
    model: SSLModel
    views: MultiViewAugment
    optimizer: torch.optim.Optimizer
    scheduler: CosineWarmupScheduler
    world: World = field(default_factory=World)


@dataclass
class _Progress:
    """Where a run stands: steps done, the wall time of earlier sessions and the loss of every step."""

    step: int = 0
    wall_before: float = 0.0
    losses: list[float] = field(default_factory=list)


def _set_up(data: str | Path | np.ndarray | Dataset[Any] | ShardSource, config: PretrainConfig,
            device: str) -> _Run:
    """Data, device, seeded model, views, AdamW and the warm-up/cosine schedule (in this order: it seeds)."""
    w = world()
    check_global_batch(config.batch_size, w)  # a batch the ranks cannot share fails before any work
    dataset, summary = pretraining_dataset(data, config.resolution, config.aspect_mode, config.cache_limit_mb)
    dev = pick_device(device)
    arithmetic = training_precision(config, dev)  # an impossible bf16 fails here, not mid-run
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = build_ssl_model(config).to(dev)
    model.train()
    views = model.views().to(dev)
    groups = param_groups_weight_decay(model.trainable_modules(), weight_decay=config.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    scheduler = CosineWarmupScheduler(
        optimizer, warmup_epochs=config.warmup_steps, max_epochs=config.max_steps,
        end_value=config.min_learning_rate / config.learning_rate,
    )
    return _Run(config, dataset, summary, dev, arithmetic, model, views, optimizer, scheduler, w)


def _resume(run: _Run, ckpt_dir: Path | None) -> _Progress:
    """Restore model, optimiser, scheduler and RNG state from ``ckpt_dir``; the progress it had reached."""
    if ckpt_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    state = load_checkpoint(ckpt_dir)
    if state["config"] != run.config.to_dict():
        raise ValueError("the checkpoint was written with a different PretrainConfig")
    if state["data"]["num_images"] != run.summary.num_images:
        raise ValueError(
            f"the checkpoint was trained on {state['data']['num_images']} images, "
            f"this data has {run.summary.num_images}"
        )
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return _Progress(int(state["step"]), float(state["wall_seconds"]), list(state["losses"]))


def _save_checkpoint(ckpt_dir: Path | None, run: _Run, step: int, losses: list[float], wall_seconds: float) -> None:
    """Write the full state of ``run`` after ``step`` steps atomically to ``ckpt_dir`` (nothing if ``None``)."""
    if ckpt_dir is None:
        return
    save_checkpoint_atomic(
        {
            "format": CHECKPOINT_FORMAT,
            "config": run.config.to_dict(),
            "data": run.summary.to_dict(),
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": _rng_state(),
            "step": step,
            "wall_seconds": wall_seconds,
            "losses": losses,
            "device": str(run.dev),
        },
        ckpt_dir,
    )


def _export(out_dir: str | Path, run: _Run, result: PretrainResult, notes: str) -> Path:
    """Export the trained encoder of ``run`` with its pretraining record; the export folder."""
    from models.ssl.export import export_encoder

    config = run.config
    return export_encoder(
        out_dir,
        run.model.encoder(),
        model_name=config.backbone,
        timm_kwargs=backbone_kwargs(config.backbone, config.resolution, config.backbone_kwargs),
        resolution=config.resolution,
        aspect_mode=config.aspect_mode,
        mean=config.norm_mean,
        std=config.norm_std,
        method=config.method,
        pretraining={
            "method": config.method,
            "data": run.summary.to_dict(),
            "steps": result.steps,
            "batch_size": config.batch_size,
            "wall_seconds": round(result.wall_seconds, 1),
            "device": result.device,
            "config": config.to_dict(),
        },
        fp16=config.export_fp16,
        notes=notes,
    )


def pretrain(
    data: str | Path | np.ndarray | Dataset[Any] | ShardSource,
    config: PretrainConfig,
    out_dir: str | Path | None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_step: OnStep = no_progress,
    device: str = "auto",
    *,
    notes: str = "",
) -> PretrainResult:
    """Self-supervised pretraining of a timm backbone on grey X-rays; exports the encoder to ``out_dir``.

    ``data``: an image folder (ImageFolder or loose images; labels are ignored), an (N, H, W) uint8
    array (resized to ``config.resolution``), a Dataset of uint8 images at that resolution, or WebDataset
    shards (a folder of ``*.tar``, an export folder with ``shards/``, ``s3://bucket/prefix/`` or a
    :class:`~models.ssl.shards.ShardSource`), streamed and never loaded whole.
    Optimiser: AdamW (no weight decay on biases and norms, timm's ``param_groups_weight_decay``) with
    linear warm-up then cosine decay (lightly's ``CosineWarmupScheduler``), gradient clipping; bf16
    autocast per ``config.precision`` (``auto``: on CUDA and on CPUs with native bf16, see
    :func:`training_precision`). With ``checkpoint_dir`` the full state is saved every
    ``config.checkpoint_every`` steps and at the end; ``resume=True`` continues from it. When
    ``on_step`` raises :class:`Canceled` the state is checkpointed, then the exception propagates.
    ``out_dir=None`` skips the export.
    """
    run = _set_up(data, config, device)
    model, optimizer, scheduler, dev, w = run.model, run.optimizer, run.scheduler, run.dev, run.world
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    progress = _resume(run, ckpt_dir) if resume else _Progress()
    step, wall_before, losses = progress.step, progress.wall_before, progress.losses
    t_start = time.perf_counter()
    # In a distributed run the forward goes through DDP, which averages the gradients over the ranks.
    loss_of = wrap_ddp(model, dev, w)
    pending_stop = False  # a cancel rank 0 saw, applied by every rank after the next step

    total = config.max_steps
    loader = pretraining_loader(run.dataset, config.batch_size, config.seed, step, total, config.num_workers,
                                pin_memory=dev.type == "cuda", w=w)
    try:
        for batch in loader:
            x = batch.to(dev, non_blocking=True)
            crops = [normalize(v, config.norm_mean, config.norm_std) for v in run.views(x, w)]
            with autocast_for(dev, run.arithmetic):
                loss = loss_of(crops, step, total)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.trainable_modules().parameters(), config.grad_clip_norm)
            model.before_optimizer_step(step, total)
            optimizer.step()
            scheduler.step()
            model.after_optimizer_step(step, total)
            step += 1
            loss_value, stop = agree(float(loss.item()), pending_stop, w, dev)
            losses.append(loss_value)
            if stop:
                raise Canceled()
            if ckpt_dir is not None and (step % config.checkpoint_every == 0 or step == total):
                _save_checkpoint(ckpt_dir, run, step, losses, wall_before + (time.perf_counter() - t_start))
            try:
                on_step(step, total, f"{config.method} loss {losses[-1]:.4f} lr {scheduler.get_last_lr()[0]:.2e}")
            except Canceled:
                if not w.distributed:
                    raise
                pending_stop = True
    except Canceled:
        _save_checkpoint(ckpt_dir, run, step, losses, wall_before + (time.perf_counter() - t_start))
        raise

    wall = wall_before + (time.perf_counter() - t_start)
    result = PretrainResult(
        None, config.method, config.backbone, step, losses[-1] if losses else float("nan"), wall,
        _device_words(dev, run.arithmetic), run.summary, losses,
    )
    if out_dir is not None and w.main:
        result.out_dir = _export(out_dir, run, result, notes)
    return result
