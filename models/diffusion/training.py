"""Training loop of the class-conditional grey-scale chest X-ray diffusion generator.

One function, :func:`train_generator`, takes a data folder (or in-memory arrays), trains a diffusers
``UNet2DModel`` with a ``DDPMScheduler`` noise schedule, checkpoints atomically so a run can resume
bit-for-bit, and exports the EMA weights in diffusers format (see :mod:`models.diffusion.export`).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

# Concrete module imports (not the lazy top-level ``diffusers``) so mypy sees the real classes.
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.training_utils import EMAModel

from models.callbacks import Canceled, OnStep, no_progress
from models.checkpoints import read_checkpoint, save_checkpoint_atomic
from models.data.folders import images_to_array, list_image_folder
from models.device import autocast_for, pick_device
from models.diffusion.config import TrainingConfig
from models.distributed import World, agree, check_global_batch, shard_rows, world, wrap_ddp


@dataclass(frozen=True)
class TrainingData:
    """A training set held in RAM: (N, H, W) uint8 images at the training resolution.

    ``labels`` are class ids into ``label_names`` (``None`` for an unlabelled set, which trains an
    unconditional generator). ``source`` names where the images came from, for the model card.
    ``patient_ids`` (one per image, ``None`` when unknown) let the privacy calibration written at export
    skip a patient's follow-up images, which look alike without being memorisation.
    """

    images: np.ndarray
    labels: np.ndarray | None
    label_names: tuple[str, ...]
    source: str
    patient_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W) uint8, got {self.images.shape} {self.images.dtype}")
        if len(self.images) == 0:
            raise ValueError("the training set is empty")
        if self.images.shape[1] != self.images.shape[2]:
            raise ValueError(f"images must be square, got {self.images.shape[1]}x{self.images.shape[2]}")
        if self.labels is not None:
            if len(self.labels) != len(self.images):
                raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")
            if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.label_names)):
                raise ValueError(f"labels must be class ids in [0, {len(self.label_names)})")
        if self.patient_ids is not None and len(self.patient_ids) != len(self.images):
            raise ValueError(f"{len(self.patient_ids)} patient ids for {len(self.images)} images")

    @property
    def conditional(self) -> bool:
        """True when the set has labels (class-conditional training with a null class)."""
        return self.labels is not None

    def counts(self) -> dict[str, int]:
        """Number of images per label name (``{"unlabelled": N}`` for an unlabelled set)."""
        if self.labels is None:
            return {"unlabelled": len(self.images)}
        return {name: int((self.labels == i).sum()) for i, name in enumerate(self.label_names)}


def load_training_data(data: str | Path, resolution: int, aspect_mode: str = "pad") -> TrainingData:
    """Read an ImageFolder (label = sub-folder name) or an unlabelled folder into RAM.

    Label names are sorted, so ``normal`` -> 0 and ``pneumonia`` -> 1 for the Kermany layout. Patient ids
    come from the file names (:func:`models.data.folders.patient_id_from_name`).
    """
    records = list_image_folder(data)
    images = images_to_array([r.path for r in records], resolution, aspect_mode, threads=2)  # type: ignore[arg-type]
    patients = tuple(r.patient_id for r in records)
    if records[0].label is None:
        return TrainingData(images, None, (), Path(data).name, patients)
    names = tuple(sorted({r.label for r in records if r.label is not None}))
    ids = {n: i for i, n in enumerate(names)}
    labels = np.array([ids[r.label] for r in records if r.label is not None], dtype=np.int64)
    return TrainingData(images, labels, names, Path(data).name, patients)


@dataclass
class TrainingResult:
    """What a finished (or canceled) run produced."""

    out_dir: Path | None
    steps: int
    final_loss: float
    wall_seconds: float
    device: str
    losses: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Model construction and the training state
# --------------------------------------------------------------------------------------------


def build_unet(config: TrainingConfig, num_labels: int) -> UNet2DModel:
    """A fresh UNet; ``num_labels > 0`` adds ``num_labels + 1`` class embeddings (last = null)."""
    return UNet2DModel(**config.unet_kwargs(num_labels + 1 if num_labels > 0 else None))


def build_noise_scheduler(config: TrainingConfig) -> DDPMScheduler:
    """The training noise schedule (also saved as the generator's ``scheduler_config.json``)."""
    return DDPMScheduler(**config.scheduler_kwargs())


class _DataOrder:
    """Epoch-wise shuffled sample order driven by its own seeded generator (saved in checkpoints).

    Keeping the permutation, the position in it and the generator state lets a resumed run draw
    exactly the batches the uninterrupted run would have drawn.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.generator)
        self.pos = 0
        self.epoch = 0

    def next_batch(self, batch_size: int) -> np.ndarray:
        out: list[torch.Tensor] = []
        need = batch_size
        while need:
            if self.pos >= self.n:
                self.perm = torch.randperm(self.n, generator=self.generator)
                self.pos = 0
                self.epoch += 1
            take = min(need, self.n - self.pos)
            out.append(self.perm[self.pos : self.pos + take])
            self.pos += take
            need -= take
        return torch.cat(out).numpy()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self.perm.clone(), "pos": self.pos,
                "epoch": self.epoch, "n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] != self.n:
            raise ValueError(f"checkpoint was trained on {state['n']} images, this data has {self.n}")
        self.generator.set_state(state["generator"])
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"])
        self.epoch = int(state["epoch"])


def _rng_state(noise_gen: torch.Generator) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "noise": noise_gen.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any], noise_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    noise_gen.set_state(state["noise"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train_generator` (CPU tensors)."""
    return read_checkpoint(checkpoint_dir)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _as_training_data(
    data: str | Path | TrainingData | np.ndarray,
    labels: Sequence[int] | np.ndarray | None,
    label_names: Sequence[str] | None,
    config: TrainingConfig,
) -> TrainingData:
    if isinstance(data, TrainingData):
        td = data
    elif isinstance(data, np.ndarray):
        if labels is not None and not label_names:
            raise ValueError("label_names are required with labels")
        td = TrainingData(
            np.ascontiguousarray(data, dtype=np.uint8),
            None if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1),
            tuple(label_names or ()),
            "in-memory array",
        )
    else:
        td = load_training_data(data, config.resolution, config.aspect_mode)
    if td.images.shape[1] != config.resolution:
        td = _resize_data(td, config)
    return td


def _warm_start(unet: UNet2DModel, generator_dir: str | Path, label_names: Sequence[str]) -> dict[str, Any]:
    """Load an exported generator's (EMA, possibly fp16) weights into ``unet`` as float32.

    Returns the record the export keeps: the source folder's name and the UNet steps it had had in all,
    so a card of a phase-2 model states its whole training budget.
    """
    meta_path = Path(generator_dir) / "cxrsynth.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{generator_dir} is not a generator directory (no cxrsynth.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("conditional") and list(meta.get("labels", {})) != list(label_names):
        raise ValueError(f"warm start: generator labels {list(meta['labels'])} differ from data labels "
                         f"{list(label_names)}")
    # A latent generator keeps its UNet in the diffusers component folder ``unet/``.
    sub = "unet" if (Path(generator_dir) / "unet").is_dir() else None
    src = UNet2DModel.from_pretrained(str(generator_dir), subfolder=sub)
    state = {k: v.float() for k, v in src.state_dict().items()}
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"warm start: architecture differs from {generator_dir} "
                         f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    training = meta.get("training", {})
    return {"from": Path(generator_dir).resolve().name,
            "steps": int(training.get("total_steps", training.get("steps", 0)))}


def _resize_data(td: TrainingData, config: TrainingConfig) -> TrainingData:
    """Resize in-memory images (e.g. 28 px PneumoniaMNIST) to the training resolution."""
    from PIL import Image

    from models.data.folders import resize_grey

    out = np.stack(
        [np.asarray(resize_grey(Image.fromarray(im, mode="L"), config.resolution, config.aspect_mode))
         for im in td.images]
    )
    return TrainingData(out, td.labels, td.label_names, td.source, td.patient_ids)


def _training_inputs(
    data: str | Path | TrainingData | np.ndarray,
    config: TrainingConfig,
    labels: Sequence[int] | np.ndarray | None,
    label_names: Sequence[str] | None,
    latents: torch.Tensor | None,
    vae: Any,
) -> TrainingData:
    """The run's :class:`TrainingData`; for a latent run, checks the latents against it and the config."""
    if latents is None:
        if config.in_channels != 1:
            raise ValueError(f"in_channels={config.in_channels} trains on latents: pass latents=")
        return _as_training_data(data, labels, label_names, config)
    if vae is None:
        raise ValueError("latents need their vae (the export and previews decode with it)")
    if not isinstance(data, TrainingData):
        raise ValueError("a latent run needs its TrainingData")
    if tuple(latents.shape[1:]) != (config.in_channels, config.resolution, config.resolution):
        raise ValueError(f"latents are {tuple(latents.shape[1:])}; the config wants "
                         f"({config.in_channels}, {config.resolution}, {config.resolution})")
    if len(latents) != len(data.images):
        raise ValueError(f"{len(latents)} latents for {len(data.images)} images")
    return data


@dataclass
class _TrainingState:
    """Everything a checkpoint holds besides the config and data: model, EMA, optimiser, schedule, RNGs."""

    unet: UNet2DModel
    ema: EMAModel
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    order: _DataOrder
    noise_gen: torch.Generator
    warm_start: dict[str, Any] | None
    step: int = 0
    wall_before: float = 0.0  # seconds of earlier (resumed) sessions
    losses: list[float] = field(default_factory=list)


def _fresh_state(
    config: TrainingConfig, td: TrainingData, dev: torch.device, init_from: str | Path | None, resume: bool
) -> _TrainingState:
    """Seeded UNet (optionally warm-started), EMA, AdamW, cosine schedule, data order and noise generator."""
    # Seed the global RNGs too: diffusers / torch layers may draw from them (e.g. dropout).
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    num_labels = len(td.label_names) if td.conditional else 0
    unet: UNet2DModel = cast(Any, build_unet(config, num_labels)).to(dev)  # cast: see pipeline
    warm_start: dict[str, Any] | None = None
    if init_from is not None and not resume:
        warm_start = _warm_start(unet, init_from, td.label_names)
    unet.train()
    if dev.type == "cuda":
        unet = cast(Any, unet).to(memory_format=torch.channels_last)
    ema = EMAModel(
        unet.parameters(), decay=config.ema_decay, use_ema_warmup=config.ema_warmup,
        inv_gamma=1.0, power=3 / 4, model_cls=UNet2DModel, model_config=unet.config,
    )
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=config.learning_rate, betas=config.adam_betas,
        weight_decay=config.weight_decay,
    )
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
    order = _DataOrder(len(td.images), config.seed)
    # A dedicated generator for noise, timesteps, label dropout and flips, so the sequence of random
    # draws depends only on the seed and the step, not on unrelated library code.
    noise_gen = torch.Generator().manual_seed(config.seed + 1)
    return _TrainingState(unet, ema, optimizer, lr_scheduler, order, noise_gen, warm_start)


def _resume_state(
    state: _TrainingState, ckpt_dir: Path | None, config: TrainingConfig, td: TrainingData, dev: torch.device
) -> None:
    """Load a checkpoint into ``state`` (same config up to ``max_steps``, same labels; else ``ValueError``)."""
    if ckpt_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    saved_state = load_checkpoint(ckpt_dir)
    saved = TrainingConfig.from_dict(saved_state["config"])
    if saved.replace(max_steps=config.max_steps) != config:
        raise ValueError("the checkpoint was written with a different TrainingConfig")
    if tuple(saved_state["label_names"]) != td.label_names:
        raise ValueError(f"checkpoint labels {saved_state['label_names']} differ from data labels {td.label_names}")
    state.unet.load_state_dict(saved_state["unet"])
    state.ema.load_state_dict(saved_state["ema"])
    state.ema.to(dev)
    state.warm_start = saved_state.get("warm_start")
    state.optimizer.load_state_dict(saved_state["optimizer"])
    state.lr_scheduler.load_state_dict(saved_state["lr_scheduler"])
    state.order.load_state_dict(saved_state["data_order"])
    _set_rng_state(saved_state["rng"], state.noise_gen)
    state.step = int(saved_state["step"])
    state.wall_before = float(saved_state["wall_seconds"])
    state.losses = list(saved_state.get("losses", []))


def _save_checkpoint(
    ckpt_dir: Path | None,
    state: _TrainingState,
    config: TrainingConfig,
    td: TrainingData,
    dev: torch.device,
    wall_seconds: float,
) -> None:
    """Write the full training state atomically (no-op without a checkpoint folder)."""
    if ckpt_dir is None:
        return
    save_checkpoint_atomic(
        {
            "format": "cxrsynth-diffusion-checkpoint/1",
            "config": config.to_dict(),
            "warm_start": state.warm_start,
            "label_names": list(td.label_names),
            "data_summary": {"source": td.source, "counts": td.counts(), "num_images": len(td.images)},
            "unet": state.unet.state_dict(),
            "ema": state.ema.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "lr_scheduler": state.lr_scheduler.state_dict(),
            "data_order": state.order.state_dict(),
            "rng": _rng_state(state.noise_gen),
            "step": state.step,
            "wall_seconds": wall_seconds,
            "device": str(dev),
            "device_words": _device_words(dev),
            "losses": state.losses,
        },
        ckpt_dir,
    )


def _draw_batch(
    order: _DataOrder, noise_gen: torch.Generator, config: TrainingConfig, images_u8: torch.Tensor | None,
    latents: torch.Tensor | None, labels_t: torch.Tensor | None, null_class: int, w: World,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This rank's ``(x0, noise, t, class labels)`` of the next global batch, on the CPU.

    Every rank draws the global batch's indices, flips, noise, timesteps and label dropout from the same
    generators, then keeps its rows (:func:`~models.distributed.shard_rows`): an image gets the same draws
    whatever the world size, and one process (``w`` of size 1) draws exactly what it always did.
    """
    batch_idx = order.next_batch(config.batch_size)
    n = len(batch_idx)
    idx = shard_rows(batch_idx, w)
    if images_u8 is not None:
        x0 = images_u8[idx].to(torch.float32).unsqueeze(1).div_(127.5).sub_(1.0)
    else:
        assert latents is not None
        x0 = latents[torch.from_numpy(idx)].to(torch.float32)
    if config.horizontal_flip:  # off by default, see TrainingConfig.horizontal_flip
        flip = shard_rows(torch.rand(n, generator=noise_gen) < 0.5, w)
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    noise = shard_rows(torch.randn((n, *x0.shape[1:]), generator=noise_gen), w)
    t = shard_rows(torch.randint(0, config.num_train_timesteps, (n,), generator=noise_gen), w)
    class_labels = None
    if labels_t is not None:
        class_labels = labels_t[idx].clone()
        drop = shard_rows(torch.rand(n, generator=noise_gen) < config.label_dropout, w)
        class_labels[drop] = null_class
    return x0, noise, t, class_labels


def train_generator(
    data: str | Path | TrainingData | np.ndarray,
    out_dir: str | Path | None,
    config: TrainingConfig,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_step: OnStep = no_progress,
    *,
    labels: Sequence[int] | np.ndarray | None = None,
    label_names: Sequence[str] | None = None,
    device: str = "auto",
    preview_dir: str | Path | None = None,
    preview_every: int = 0,
    sample_grid: bool = True,
    init_from: str | Path | None = None,
    latents: torch.Tensor | None = None,
    vae: Any = None,
    autoencoder_info: dict[str, Any] | None = None,
) -> TrainingResult:
    """Train a generator and export it to ``out_dir`` in diffusers format (EMA weights).

    ``data`` is a folder (ImageFolder = class-conditional; loose images = unconditional), a
    :class:`TrainingData`, or an (N, H, W) uint8 array with ``labels`` and ``label_names``.
    With ``checkpoint_dir`` the full training state is saved every ``config.checkpoint_every``
    steps; ``resume=True`` continues from it (on CPU, bit-for-bit the same as an uninterrupted
    run). ``on_step`` may raise :class:`Canceled`: the state is checkpointed, then it propagates.
    ``out_dir=None`` skips the export (used to test resuming); ``sample_grid`` adds ``samples.png``
    to the export; ``preview_every`` > 0 writes a sample grid PNG to ``preview_dir`` that often.
    ``latents`` ((N, C, r, r), shifted and scaled to unit variance) with their ``vae`` (an
    ``AutoencoderKL``) make this the second stage of a latent generator (:mod:`models.diffusion.latent`):
    the UNet learns the latents instead of the pixels of ``data``, which stay at full size for the
    export's privacy index; the export and previews decode with ``vae`` and record ``autoencoder_info``.

    The training loop below is kept unrolled (diffusers-style): one step reads top to bottom.
    """
    td = _training_inputs(data, config, labels, label_names, latents, vae)
    dev = pick_device(device)
    w = world()
    check_global_batch(config.batch_size, w)  # the global batch, shared out over the ranks
    null_class = len(td.label_names) if td.conditional else 0
    state = _fresh_state(config, td, dev, init_from, resume)
    noise_scheduler = build_noise_scheduler(config)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume:
        _resume_state(state, ckpt_dir, config, td, dev)
    unet, ema, optimizer, lr_scheduler = state.unet, state.ema, state.optimizer, state.lr_scheduler
    order, noise_gen, losses = state.order, state.noise_gen, state.losses
    # Distributed: the forward goes through DDP (gradients averaged over the ranks). Every rank draws the
    # global batch's indices and random numbers from the same generators and keeps its rows
    # (shard_rows), so each image gets the noise, timestep and label dropout it gets in one process.
    model = wrap_ddp(unet, dev, w)
    pending_stop = False  # a cancel rank 0 saw, applied by every rank after the next step

    alphas = noise_scheduler.alphas_cumprod.to(dev)
    images_u8 = torch.from_numpy(td.images) if latents is None else None
    labels_t = torch.from_numpy(td.labels) if td.labels is not None else None
    t_start = time.perf_counter()
    total = config.max_steps
    try:
        while state.step < total:
            x0, noise, t, class_labels = _draw_batch(order, noise_gen, config, images_u8, latents, labels_t,
                                                     null_class, w)
            class_labels = class_labels.to(dev) if class_labels is not None else None
            x0, noise, t = x0.to(dev), noise.to(dev), t.to(dev)
            a = alphas[t].sqrt().view(-1, 1, 1, 1)
            s = (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
            noisy = a * x0 + s * noise
            target = noise if config.prediction_type == "epsilon" else a * noise - s * x0
            if dev.type == "cuda":
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            with autocast_for(dev):
                pred = model(noisy, t, class_labels=class_labels, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {state.step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip_norm)
            optimizer.step()
            lr_scheduler.step()
            ema.step(unet.parameters())
            state.step += 1
            loss_value, stop = agree(float(loss.item()), pending_stop, w, dev)
            losses.append(loss_value)
            if stop:
                raise Canceled()
            if ckpt_dir is not None and (state.step % config.checkpoint_every == 0 or state.step == total):
                _save_checkpoint(ckpt_dir, state, config, td, dev, state.wall_before + (time.perf_counter() - t_start))
            if preview_dir is not None and preview_every and state.step % preview_every == 0 and w.main:
                _write_preview(ema, unet, config, td, Path(preview_dir) / f"preview-{state.step:06d}.png", dev, vae)
            try:
                on_step(state.step, total, f"loss {losses[-1]:.4f} lr {lr_scheduler.get_last_lr()[0]:.2e}")
            except Canceled:
                if not w.distributed:
                    raise
                pending_stop = True
    except Canceled:
        _save_checkpoint(ckpt_dir, state, config, td, dev, state.wall_before + (time.perf_counter() - t_start))
        raise
    wall = state.wall_before + (time.perf_counter() - t_start)
    step = state.step
    result = TrainingResult(None, step, losses[-1] if losses else float("nan"), wall, str(dev), losses)
    if out_dir is not None and w.main:
        from models.diffusion.export import export_generator

        result.out_dir = export_generator(
            out_dir, unet, ema, config, td, steps=step, wall_seconds=wall, device=_device_words(dev),
            sample_grid=sample_grid, vae=vae, autoencoder_info=autoencoder_info, warm_start=state.warm_start,
        )
    return result


def export_from_checkpoint(
    checkpoint_dir: str | Path,
    data: str | Path | TrainingData,
    out_dir: str | Path,
    notes: str = "",
    sample_grid: bool = True,
    device: str | None = None,
) -> Path:
    """Export the EMA weights of a checkpoint (e.g. of an interrupted run) as a generator directory.

    ``data`` must be the training data of the run: its index and counts travel with the export.
    """
    from models.diffusion.export import export_generator

    state = load_checkpoint(checkpoint_dir)
    config = TrainingConfig.from_dict(state["config"])
    td = data if isinstance(data, TrainingData) else load_training_data(data, config.resolution, config.aspect_mode)
    if list(td.label_names) != list(state["label_names"]) or len(td.images) != state["data_summary"]["num_images"]:
        raise ValueError("data does not match the checkpoint's training data (labels or image count differ)")
    unet = build_unet(config, len(td.label_names))
    unet.load_state_dict(state["unet"])
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, model_cls=UNet2DModel, model_config=unet.config)
    ema.load_state_dict(state["ema"])
    device = device or state.get("device_words") or state.get("device", "cpu")
    return export_generator(
        out_dir, unet, ema, config, td, steps=int(state["step"]), wall_seconds=float(state["wall_seconds"]),
        device=str(device), notes=notes, sample_grid=sample_grid, warm_start=state.get("warm_start"),
    )


def _device_words(dev: torch.device) -> str:
    """Human-readable device for model cards, e.g. ``CPU, 2 cores (1 torch thread)``."""
    if dev.type == "cuda":
        return f"CUDA, {torch.cuda.get_device_name(dev)}"
    return f"CPU, {os.cpu_count()} cores ({torch.get_num_threads()} torch thread(s))"


@torch.inference_mode()
def _write_preview(
    ema: EMAModel, unet: UNet2DModel, config: TrainingConfig, td: TrainingData, path: Path,
    dev: torch.device, vae: Any = None,
) -> None:
    """Save a PNG grid sampled from the EMA weights (DPM-Solver++ 20 steps, guidance 2)."""
    from models.diffusion.export import ema_unet
    from models.diffusion.pipeline import CXRDiffusionPipeline

    model = cast(Any, ema_unet(ema, unet, dtype=torch.float32)).to(dev)
    pipe = CXRDiffusionPipeline(model, build_noise_scheduler(config), td.label_names, generator_id="preview",
                                device=dev, vae=vae)
    n_per = 8
    if td.conditional:
        labs: list[str | int] = [n for n in td.label_names for _ in range(n_per)]
        out = pipe(labels=labs, seed=1234, num_inference_steps=20, guidance_scale=2.0)
    else:
        out = pipe(num_images=2 * n_per, seed=1234, num_inference_steps=20)
    from models.diffusion.export import save_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(out.images, path, ncols=n_per)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m models.diffusion.training --data DIR --out DIR [--resume]``."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--data", required=True, help="ImageFolder (class-conditional) or folder of images")
    ap.add_argument("--out", required=True, help="generator directory to export to")
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="override max_steps")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--config", default=None, help="JSON file or string of TrainingConfig fields")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--preview-dir", default=None)
    ap.add_argument("--preview-every", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--init-from", default=None, help="generator dir to warm-start from (same architecture)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fields: dict[str, Any] = {}
    if args.config:
        text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
        fields = json.loads(text)
    if args.steps:
        fields["max_steps"] = args.steps
    if args.batch_size:
        fields["batch_size"] = args.batch_size
    config = TrainingConfig.from_dict(fields)
    t0 = time.perf_counter()
    last = [t0, 0]

    def log(step: int, total: int, message: str) -> None:
        if step % args.log_every == 0 or step == total:
            now = time.perf_counter()
            rate = (now - last[0]) / max(1, step - last[1])
            last[0], last[1] = now, step
            eta = rate * (total - step)
            print(f"{time.strftime('%H:%M:%S')} step {step}/{total} {message} {rate:.2f} s/step eta {eta / 60:.1f} min",
                  flush=True)

    result = train_generator(
        args.data, args.out, config, checkpoint_dir=args.checkpoint_dir, resume=args.resume, on_step=log,
        device=args.device, preview_dir=args.preview_dir, preview_every=args.preview_every,
        init_from=args.init_from,
    )
    print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}, {result.wall_seconds:.0f} s, "
          f"exported to {result.out_dir}", flush=True)


if __name__ == "__main__":
    main()
