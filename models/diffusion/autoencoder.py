"""The latent generator's first stage: a grey-scale diffusers ``AutoencoderKL`` trained on crops.

Latent diffusion (Stable Diffusion, RoentGen, Cheff, MAISI) runs the diffusion model on a 4x smaller
latent grid, so 224-256 px images cost about what 64 px pixels cost. This module trains that
autoencoder on the hospital's own images (nothing comes from a hub):

* architecture: diffusers ``AutoencoderKL`` with 1 grey channel, downsampling factor
  ``2 ** (len(block_out_channels) - 1)`` (4 by default) and ``latent_channels`` latent channels. The
  mid-block self-attention is off by default: at a 56x56 latent it is a 3136-token attention that
  costs more than the whole convolutional decoder on CPU (``benchmarks/autoencoder.py`` measures it);
* the network is fully convolutional, so it trains on random ``crop_size`` crops of the full-size
  images (cheap) and runs at full size;
* loss: L1 + ``ssim_weight`` * (1 - SSIM) (torchmetrics' SSIM, not a hand-written one) + a small KL
  term, normalised per pixel as in Stable Diffusion's autoencoder (``kl_weight`` 1e-6 there too);
* resumable: the whole state (weights, optimiser, schedule, data order, RNGs) is checkpointed
  atomically, and a resumed run equals an uninterrupted one on CPU;
* the latent ``scaling_factor`` and ``shift_factor`` (diffusers config keys) are computed from the
  training data after training, as Stable Diffusion's ``scaling_factor`` was: latents are shifted and
  scaled to zero mean and unit variance before the diffusion model sees them;
* reconstruction quality is measured on held-out patients at full size against a bicubic round trip
  through 64 px (what a 64 px pixel generator plus upscaling gives at best).
"""

from __future__ import annotations

import dataclasses
import json
import math
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
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.optimization import get_cosine_schedule_with_warmup
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from models.callbacks import Canceled, OnStep, no_progress
from models.checkpoints import read_checkpoint, save_checkpoint_atomic
from models.device import pick_device

VAE_SUBFOLDER = "vae"
AUTOENCODER_JSON = "autoencoder.json"


@dataclass(frozen=True)
class AutoencoderConfig:
    """Everything that decides what an autoencoder run learns; saved into checkpoints and exports.

    ``resolution`` is the full image size the autoencoder is used at (and the size the training
    images are loaded at); training itself sees ``crop_size`` crops. ``holdout_fraction`` of the
    patients are kept out of training to measure reconstruction quality on unseen patients.
    """

    resolution: int = 224
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_attention: bool = False
    crop_size: int = 64
    batch_size: int = 16
    max_steps: int = 4500
    learning_rate: float = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip_norm: float = 1.0
    ssim_weight: float = 0.2
    kl_weight: float = 1e-6
    holdout_fraction: float = 0.1
    scale_images: int = 512
    # Decoder-only adversarial phase after the main one (``finetune_decoder``): the encoder is frozen, so
    # the latent space (and a UNet trained on it) stays valid while the decoder learns sharper detail.
    decoder_steps: int = 0
    decoder_learning_rate: float = 1e-4
    adversarial_weight: float = 0.02
    discriminator_learning_rate: float = 2e-4
    discriminator_channels: int = 32
    seed: int = 0
    checkpoint_every: int = 100
    export_fp16: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        f = self.factor
        if self.resolution % f or self.crop_size % f:
            raise ValueError(f"resolution {self.resolution} and crop_size {self.crop_size} must be divisible by "
                             f"the downsampling factor {f}")
        if not 0 < self.crop_size <= self.resolution:
            raise ValueError(f"crop_size {self.crop_size} must be in (0, resolution={self.resolution}]")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError("every block_out_channels entry must be divisible by norm_num_groups")
        if self.latent_channels < 1:
            raise ValueError("latent_channels must be >= 1")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError("holdout_fraction must be in [0, 1)")
        if self.max_steps <= 0 or self.batch_size <= 0:
            raise ValueError("max_steps and batch_size must be positive")
        if self.decoder_steps < 0 or self.adversarial_weight < 0:
            raise ValueError("decoder_steps and adversarial_weight must be >= 0")

    @property
    def factor(self) -> int:
        """Downsampling factor per side (image size / latent size)."""
        return int(2 ** (len(self.block_out_channels) - 1))

    @property
    def latent_size(self) -> int:
        """Side of the latent grid at ``resolution``."""
        return self.resolution // self.factor

    @classmethod
    def tiny(cls, **overrides: Any) -> AutoencoderConfig:
        """A ~100 kB autoencoder that trains in seconds on CPU, for tests."""
        base: dict[str, Any] = dict(
            resolution=64, block_out_channels=(8, 16, 16), norm_num_groups=8, crop_size=32, batch_size=4,
            max_steps=6, warmup_steps=1, checkpoint_every=3, learning_rate=2e-3, scale_images=16,
            holdout_fraction=0.2, discriminator_channels=8,
        )
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes: Any) -> AutoencoderConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoencoderConfig:
        """Inverse of :meth:`to_dict`; unknown keys are rejected so typos do not pass silently."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown AutoencoderConfig fields: {sorted(unknown)}")
        d = dict(d)
        for key in ("block_out_channels", "adam_betas"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def vae_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``diffusers.AutoencoderKL`` for this config (1 grey channel)."""
        n = len(self.block_out_channels)
        return dict(
            in_channels=1,
            out_channels=1,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            sample_size=self.resolution,
            mid_block_add_attention=self.mid_block_attention,
        )


def build_vae(config: AutoencoderConfig) -> AutoencoderKL:
    """A fresh autoencoder for ``config``."""
    return AutoencoderKL(**config.vae_kwargs())


# --------------------------------------------------------------------------------------------
# Data: held-out patients, seeded random crops
# --------------------------------------------------------------------------------------------


def holdout_split(
    n: int, patient_ids: Sequence[str] | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train idx, held-out idx): whole patients held out (images of one patient look alike).

    Without patient ids each image is its own patient. ``fraction == 0`` holds nothing out.
    """
    idx = np.arange(n)
    if fraction <= 0:
        return idx, idx[:0]
    groups = np.asarray(patient_ids if patient_ids is not None else [str(i) for i in range(n)])
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    k = max(1, round(fraction * len(unique)))
    held = set(rng.choice(unique, size=min(k, len(unique) - 1), replace=False).tolist())
    mask = np.array([g in held for g in groups])
    return idx[~mask], idx[mask]


class _CropSampler:
    """Epoch-wise shuffled images and random crop corners from one seeded generator (checkpointed)."""

    def __init__(self, n: int, size: int, crop: int, seed: int) -> None:
        self.n, self.size, self.crop = n, size, crop
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.generator)
        self.pos = 0
        self.epoch = 0

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image indices (B,) and crop corners (B, 2)."""
        out: list[torch.Tensor] = []
        need = batch_size
        while need:
            if self.pos >= self.n:
                self.perm = torch.randperm(self.n, generator=self.generator)
                self.pos, self.epoch = 0, self.epoch + 1
            take = min(need, self.n - self.pos)
            out.append(self.perm[self.pos : self.pos + take])
            self.pos += take
            need -= take
        corners = torch.randint(0, self.size - self.crop + 1, (batch_size, 2), generator=self.generator)
        return torch.cat(out), corners

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self.perm.clone(), "pos": self.pos,
                "epoch": self.epoch, "n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] != self.n:
            raise ValueError(f"checkpoint was trained on {state['n']} images, this data has {self.n}")
        self.generator.set_state(state["generator"])
        self.perm = state["perm"].clone()
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])


def _crops(images: torch.Tensor, idx: torch.Tensor, corners: torch.Tensor, crop: int) -> torch.Tensor:
    """(B, 1, crop, crop) float crops in [-1, 1] from (N, H, W) uint8 images."""
    out = torch.stack([images[i, y : y + crop, x : x + crop] for i, (y, x) in zip(idx.tolist(), corners.tolist(),
                                                                                    strict=True)])
    return out.unsqueeze(1).float().div_(127.5).sub_(1.0)


def to_unit(images_u8: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) float32 in [-1, 1], the autoencoder's input range."""
    return torch.from_numpy(np.asarray(images_u8, dtype=np.uint8)).unsqueeze(1).float().div(127.5).sub(1.0)


# --------------------------------------------------------------------------------------------
# Loss, latent statistics, reconstruction metrics
# --------------------------------------------------------------------------------------------


def autoencoder_loss(
    vae: AutoencoderKL, x: torch.Tensor, config: AutoencoderConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + w * (1 - SSIM) + KL per pixel; returns the loss and its parts for logging."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    rec = vae.decode(z).sample
    l1 = F.l1_loss(rec, x)
    ssim = cast(torch.Tensor, structural_similarity_index_measure(
        ((rec.clamp(-1, 1) + 1) / 2), ((x + 1) / 2), data_range=1.0))
    kl = posterior.kl().mean() / x[0].numel()
    loss = l1 + config.ssim_weight * (1.0 - ssim) + config.kl_weight * kl
    return loss, {"l1": float(l1.detach()), "ssim": float(ssim.detach()), "kl": float(kl.detach())}


@torch.inference_mode()
def encode_latents(
    vae: AutoencoderKL, images_u8: np.ndarray, batch_size: int = 8, device: torch.device | str = "cpu",
    sample: bool = False, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Raw (unscaled) latents of (N, H, W) uint8 images: the posterior mean, or a sample of it."""
    dev = torch.device(device)
    outs = []
    for s in range(0, len(images_u8), batch_size):
        x = to_unit(images_u8[s : s + batch_size]).to(dev)
        dist = vae.encode(x).latent_dist
        outs.append((dist.sample(generator=generator) if sample else dist.mode()).float().cpu())
    return torch.cat(outs)


def latent_statistics(latents: torch.Tensor) -> tuple[float, float]:
    """(shift_factor, scaling_factor): latents are used as ``(z - shift) * scale`` (zero mean, unit std)."""
    mean = float(latents.mean())
    std = float(latents.std())
    return mean, 1.0 / max(std, 1e-6)


@torch.inference_mode()
def reconstruct(vae: AutoencoderKL, images_u8: np.ndarray, batch_size: int = 8,
                device: torch.device | str = "cpu") -> np.ndarray:
    """Encode (posterior mean) and decode at full size; (N, H, W) uint8."""
    dev = torch.device(device)
    outs = []
    for s in range(0, len(images_u8), batch_size):
        x = to_unit(images_u8[s : s + batch_size]).to(dev)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        outs.append(((rec + 1) * 127.5).round().to(torch.uint8)[:, 0].cpu().numpy())
    return np.concatenate(outs)


def bicubic_round_trip(images_u8: np.ndarray, low: int = 64) -> np.ndarray:
    """(N, H, W) uint8 images down to ``low`` px and back up with PIL bicubic (the 64 px baseline).

    Downscaling uses the same PIL resize as the 64 px generator's training data
    (:func:`models.data.folders.resize_grey`).
    """
    from PIL import Image

    from models.data.folders import resize_grey

    size = images_u8.shape[-1]
    out = np.empty_like(images_u8)
    for i, im in enumerate(images_u8):
        small = resize_grey(Image.fromarray(im, mode="L"), low)
        out[i] = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC))
    return out


def reconstruction_metrics(original_u8: np.ndarray, rebuilt_u8: np.ndarray) -> dict[str, float]:
    """Mean per-image PSNR (dB) and SSIM (torchmetrics, 11x11 Gaussian window) on [0, 1] pixels."""
    a = torch.from_numpy(np.asarray(rebuilt_u8)).unsqueeze(1).float() / 255.0
    b = torch.from_numpy(np.asarray(original_u8)).unsqueeze(1).float() / 255.0
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    return {"psnr_db": float(cast(torch.Tensor, psnr).mean()), "ssim": float(cast(torch.Tensor, ssim).mean()),
            "images": len(a)}


def evaluate_autoencoder(
    vae: AutoencoderKL, images_u8: np.ndarray, device: torch.device | str = "cpu", baseline_px: int | None = None,
) -> dict[str, Any]:
    """Reconstruction of held-out images at full size beside a bicubic round trip.

    The baseline goes through 64 px (what a 64 px pixel generator plus upscaling gives at best); for
    images of 64 px or less, through the latent size.
    """
    size = int(images_u8.shape[-1])
    low = baseline_px or (64 if size > 64 else size // int(2 ** (len(vae.config["block_out_channels"]) - 1)))
    rebuilt = reconstruct(vae, images_u8, device=device)
    return {
        "autoencoder": reconstruction_metrics(images_u8, rebuilt),
        "bicubic": {**reconstruction_metrics(images_u8, bicubic_round_trip(images_u8, low)), "via_px": low},
        "resolution": size,
    }


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class AutoencoderResult:
    """What a finished (or canceled) autoencoder run produced."""

    vae: AutoencoderKL
    steps: int
    wall_seconds: float
    device: str
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    train_indices: np.ndarray | None = None
    holdout_indices: np.ndarray | None = None


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "noise": gen.get_state()}


def _set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    gen.set_state(state["noise"])


def _check_images(images: np.ndarray, config: AutoencoderConfig) -> np.ndarray:
    """``images`` as an array, refused unless square (N, H, W) uint8 at ``config.resolution``."""
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be square (N, H, W) uint8, got {images.shape} {images.dtype}")
    if images.shape[1] != config.resolution:
        raise ValueError(f"images are {images.shape[1]} px; the autoencoder config says {config.resolution}")
    return images


@dataclass
class _AutoencoderRun:
    """What an autoencoder run trains and checkpoints."""

    config: AutoencoderConfig
    dev: torch.device
    vae: AutoencoderKL
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: _CropSampler
    noise_gen: torch.Generator


def _set_up_autoencoder(config: AutoencoderConfig, n_train: int, device: str) -> _AutoencoderRun:
    """Device, seeded VAE, AdamW, warm-up/cosine schedule, crop sampler and noise generator (in this order)."""
    dev = pick_device(device)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    vae: AutoencoderKL = cast(Any, build_vae(config)).to(dev)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, betas=config.adam_betas,
                                  weight_decay=config.weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
    sampler = _CropSampler(n_train, config.resolution, config.crop_size, config.seed)
    noise_gen = torch.Generator(dev).manual_seed(config.seed + 1)
    return _AutoencoderRun(config, dev, vae, optimizer, lr_scheduler, sampler, noise_gen)


def _resume_autoencoder(run: _AutoencoderRun, ckpt_dir: Path | None) -> tuple[int, float, list[float]]:
    """Restore ``run`` from ``ckpt_dir``; (steps done, wall seconds so far, losses so far)."""
    if ckpt_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    state = read_checkpoint(ckpt_dir)
    if state.get("format") != "cxrsynth-autoencoder-checkpoint/1":
        raise ValueError(f"{ckpt_dir} does not hold an autoencoder checkpoint")
    if AutoencoderConfig.from_dict(state["config"]).replace(max_steps=run.config.max_steps) != run.config:
        raise ValueError("the checkpoint was written with a different AutoencoderConfig")
    run.vae.load_state_dict(state["vae"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    run.sampler.load_state_dict(state["sampler"])
    _set_rng_state(state["rng"], run.noise_gen)
    return int(state["step"]), float(state["wall_seconds"]), list(state["losses"])


def _save_autoencoder_checkpoint(
    ckpt_dir: Path | None, run: _AutoencoderRun, step: int, losses: list[float], wall_seconds: float
) -> None:
    """Write the full state of ``run`` atomically to ``ckpt_dir`` (nothing if ``None``)."""
    if ckpt_dir is not None:
        save_checkpoint_atomic({
            "format": "cxrsynth-autoencoder-checkpoint/1", "config": run.config.to_dict(),
            "vae": run.vae.state_dict(), "optimizer": run.optimizer.state_dict(),
            "lr_scheduler": run.lr_scheduler.state_dict(), "sampler": run.sampler.state_dict(),
            "rng": _rng_state(run.noise_gen), "step": step, "losses": losses,
            "wall_seconds": wall_seconds,
        }, ckpt_dir)


def train_autoencoder(
    images: np.ndarray,
    config: AutoencoderConfig,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_step: OnStep = no_progress,
    *,
    patient_ids: Sequence[str] | None = None,
    device: str = "auto",
    evaluate: bool = True,
) -> AutoencoderResult:
    """Train an autoencoder on (N, H, W) uint8 images at ``config.resolution``.

    Whole patients (``holdout_fraction``) are held out of training; with ``evaluate`` their
    reconstruction is measured at the end. The returned ``vae`` has ``scaling_factor`` and
    ``shift_factor`` set from the training images' latents. ``on_step`` may raise :class:`Canceled`:
    the state is checkpointed, then it propagates.
    """
    images = _check_images(images, config)
    train_idx, held_idx = holdout_split(len(images), patient_ids, config.holdout_fraction, config.seed)
    run = _set_up_autoencoder(config, len(train_idx), device)
    vae, optimizer, lr_scheduler, dev = run.vae, run.optimizer, run.lr_scheduler, run.dev
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    progress: tuple[int, float, list[float]] = _resume_autoencoder(run, ckpt_dir) if resume else (0, 0.0, [])
    step, wall_before, losses = progress
    train_images = torch.from_numpy(np.ascontiguousarray(images[train_idx]))

    t_start = time.perf_counter()
    try:
        while step < config.max_steps:
            idx, corners = run.sampler.next_batch(config.batch_size)
            x = _crops(train_images, idx, corners, config.crop_size).to(dev)
            loss, parts = autoencoder_loss(vae, x, config, run.noise_gen)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"autoencoder loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip_norm)
            optimizer.step()
            lr_scheduler.step()
            step += 1
            losses.append(float(loss.item()))
            if ckpt_dir is not None and (step % config.checkpoint_every == 0 or step == config.max_steps):
                _save_autoencoder_checkpoint(ckpt_dir, run, step, losses,
                                             wall_before + (time.perf_counter() - t_start))
            on_step(step, config.max_steps,
                    f"loss {losses[-1]:.4f} l1 {parts['l1']:.4f} ssim {parts['ssim']:.3f} kl {parts['kl']:.1f}")
    except Canceled:
        _save_autoencoder_checkpoint(ckpt_dir, run, step, losses, wall_before + (time.perf_counter() - t_start))
        raise
    wall = wall_before + (time.perf_counter() - t_start)
    vae.eval()
    set_latent_statistics(vae, images[train_idx][: config.scale_images], device=dev)
    metrics = evaluate_autoencoder(vae, images[held_idx], device=dev) if evaluate and len(held_idx) else {}
    return AutoencoderResult(vae, step, wall, str(dev), losses, metrics, train_idx, held_idx)


def build_discriminator(config: AutoencoderConfig) -> torch.nn.Module:
    """MONAI's PatchGAN discriminator (3 layers), as in MONAI's AutoencoderKL tutorials."""
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(spatial_dims=2, num_layers_d=3, channels=config.discriminator_channels,
                              in_channels=1, out_channels=1)


def _decoder_parameters(vae: AutoencoderKL) -> list[torch.nn.Parameter]:
    return [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]  # type: ignore[union-attr]


@dataclass
class _DecoderRun:
    """What a decoder phase trains and checkpoints: the VAE (encoder frozen) and a patch discriminator."""

    config: AutoencoderConfig
    dev: torch.device
    vae: AutoencoderKL
    params: list[torch.nn.Parameter]
    disc: torch.nn.Module
    adv: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sampler: _CropSampler


def _set_up_decoder(vae: AutoencoderKL, config: AutoencoderConfig, n_train: int, device: str) -> _DecoderRun:
    """Device, seed, decoder-only gradients, discriminator, adversarial loss, both AdamWs and the crop sampler."""
    from monai.losses import PatchAdversarialLoss

    dev = pick_device(device)
    torch.manual_seed(config.seed + 2)
    vae = cast(Any, vae).to(dev)
    vae.train()
    for p in vae.parameters():
        p.requires_grad_(False)
    params = _decoder_parameters(vae)
    for p in params:
        p.requires_grad_(True)
    disc = build_discriminator(config).to(dev).train()
    adv = PatchAdversarialLoss(criterion="least_squares")
    opt_g = torch.optim.AdamW(params, lr=config.decoder_learning_rate, betas=(0.5, 0.9))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=config.discriminator_learning_rate, betas=(0.5, 0.9))
    sampler = _CropSampler(n_train, config.resolution, config.crop_size, config.seed + 2)
    return _DecoderRun(config, dev, vae, params, disc, adv, opt_g, opt_d, sampler)


def _resume_decoder(run: _DecoderRun, ckpt_dir: Path | None) -> tuple[int, float, list[float]]:
    """Restore ``run`` from ``ckpt_dir``; (steps done, wall seconds so far, losses so far)."""
    if ckpt_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    state = read_checkpoint(ckpt_dir)
    if state.get("format") != "cxrsynth-decoder-checkpoint/1":
        raise ValueError(f"{ckpt_dir} does not hold a decoder checkpoint")
    run.vae.load_state_dict(state["vae"])
    run.disc.load_state_dict(state["discriminator"])
    run.opt_g.load_state_dict(state["opt_g"])
    run.opt_d.load_state_dict(state["opt_d"])
    run.sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), float(state["wall_seconds"]), list(state["losses"])


def _save_decoder_checkpoint(
    ckpt_dir: Path | None, run: _DecoderRun, step: int, losses: list[float], wall_seconds: float
) -> None:
    """Write the full state of ``run`` atomically to ``ckpt_dir`` (nothing if ``None``)."""
    if ckpt_dir is not None:
        save_checkpoint_atomic({
            "format": "cxrsynth-decoder-checkpoint/1", "config": run.config.to_dict(), "vae": run.vae.state_dict(),
            "discriminator": run.disc.state_dict(), "opt_g": run.opt_g.state_dict(), "opt_d": run.opt_d.state_dict(),
            "sampler": run.sampler.state_dict(), "torch_rng": torch.get_rng_state(), "step": step,
            "losses": losses, "wall_seconds": wall_seconds}, ckpt_dir)


def finetune_decoder(
    vae: AutoencoderKL,
    images: np.ndarray,
    config: AutoencoderConfig,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_step: OnStep = no_progress,
    *,
    patient_ids: Sequence[str] | None = None,
    device: str = "auto",
) -> AutoencoderResult:
    """Decoder-only phase: L1 + SSIM + a patch adversarial loss (MONAI) on crops, encoder frozen.

    L1 and SSIM alone reconstruct the mean of what a latent could mean, which is smooth: fine texture
    (bone trabeculae, vessel edges) comes out blurred. A patch discriminator rewards the decoder for
    detail that looks real, the recipe of Stable Diffusion's and MONAI's autoencoders. Freezing the
    encoder keeps the latents, their statistics and any UNet trained on them valid. Same held-out
    patients, checkpointing and resume contract as :func:`train_autoencoder`; runs
    ``config.decoder_steps`` steps.
    """
    if config.decoder_steps <= 0:
        raise ValueError("config.decoder_steps must be positive for a decoder phase")
    images = np.asarray(images)
    train_idx, held_idx = holdout_split(len(images), patient_ids, config.holdout_fraction, config.seed)
    run = _set_up_decoder(vae, config, len(train_idx), device)
    vae, disc, adv, opt_g, opt_d, dev = run.vae, run.disc, run.adv, run.opt_g, run.opt_d, run.dev
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    progress: tuple[int, float, list[float]] = _resume_decoder(run, ckpt_dir) if resume else (0, 0.0, [])
    step, wall_before, losses = progress
    train_images = torch.from_numpy(np.ascontiguousarray(images[train_idx]))

    t_start = time.perf_counter()
    try:
        while step < config.decoder_steps:
            idx, corners = run.sampler.next_batch(config.batch_size)
            x = _crops(train_images, idx, corners, config.crop_size).to(dev)
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mode()
            rec = vae.decode(z).sample
            l1 = F.l1_loss(rec, x)
            ssim = cast(torch.Tensor, structural_similarity_index_measure(
                (rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2, data_range=1.0))
            g_adv = cast(torch.Tensor, adv(disc(rec)[-1], target_is_real=True, for_discriminator=False))
            loss_g = l1 + config.ssim_weight * (1 - ssim) + config.adversarial_weight * g_adv
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            torch.nn.utils.clip_grad_norm_(run.params, config.grad_clip_norm)
            opt_g.step()
            d_fake = cast(torch.Tensor, adv(disc(rec.detach())[-1], target_is_real=False, for_discriminator=True))
            d_real = cast(torch.Tensor, adv(disc(x)[-1], target_is_real=True, for_discriminator=True))
            loss_d = 0.5 * (d_fake + d_real)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            step += 1
            losses.append(float(loss_g.detach()))
            if not np.isfinite(losses[-1]):
                raise FloatingPointError(f"decoder loss is {losses[-1]} at step {step}")
            if ckpt_dir is not None and (step % config.checkpoint_every == 0 or step == config.decoder_steps):
                _save_decoder_checkpoint(ckpt_dir, run, step, losses, wall_before + (time.perf_counter() - t_start))
            on_step(step, config.decoder_steps, f"l1 {float(l1.detach()):.4f} ssim {float(ssim.detach()):.3f} "
                                                f"adv {float(g_adv.detach()):.3f} disc {float(loss_d.detach()):.3f}")
    except Canceled:
        _save_decoder_checkpoint(ckpt_dir, run, step, losses, wall_before + (time.perf_counter() - t_start))
        raise
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(True)
    metrics = evaluate_autoencoder(vae, images[held_idx], device=dev) if len(held_idx) else {}
    return AutoencoderResult(vae, step, wall_before + (time.perf_counter() - t_start), str(dev), losses, metrics,
                             train_idx, held_idx)


def set_latent_statistics(vae: AutoencoderKL, images_u8: np.ndarray, device: torch.device | str = "cpu") -> None:
    """Compute ``shift_factor`` / ``scaling_factor`` from images' latents and store them in the config."""
    shift, scale = latent_statistics(encode_latents(vae, images_u8, device=device))
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)


def vae_from_checkpoint(checkpoint_dir: str | Path) -> tuple[AutoencoderKL, AutoencoderConfig, dict[str, Any]]:
    """The autoencoder of a checkpoint (weights as trained, latent statistics not yet set)."""
    state = read_checkpoint(checkpoint_dir)
    if state.get("format") != "cxrsynth-autoencoder-checkpoint/1":
        raise ValueError(f"{checkpoint_dir} does not hold an autoencoder checkpoint")
    config = AutoencoderConfig.from_dict(state["config"])
    vae = build_vae(config)
    vae.load_state_dict(state["vae"])
    return vae.eval(), config, state


def save_vae(vae: AutoencoderKL, out_dir: str | Path, config: AutoencoderConfig, info: dict[str, Any]) -> Path:
    """Write ``out_dir`` (``AutoencoderKL.save_pretrained``, fp16 if configured) plus ``autoencoder.json``."""
    out = Path(out_dir)
    model = vae
    if config.export_fp16:
        model = cast(Any, build_vae(config))
        model.register_to_config(**{k: vae.config[k] for k in ("scaling_factor", "shift_factor")})
        model.load_state_dict(vae.state_dict())
        model = model.to(torch.float16)
    model.save_pretrained(out)
    (out / AUTOENCODER_JSON).write_text(json.dumps({"config": config.to_dict(), **info}, indent=2) + "\n")
    return out


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """Load an exported autoencoder folder (``AutoencoderKL.from_pretrained``) as ``dtype``."""
    vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype)
    if vae.config.get("scaling_factor") is None or not math.isfinite(float(vae.config["scaling_factor"])):
        raise ValueError(f"{path}: the autoencoder has no latent scaling_factor")
    return cast(AutoencoderKL, vae).eval()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m models.diffusion.autoencoder --data DIR --out DIR [--resume]``."""
    import argparse

    from models.diffusion.training import load_training_data

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--data", required=True, help="image folder (ImageFolder or loose images)")
    ap.add_argument("--out", required=True, help="folder to save the autoencoder to (diffusers format)")
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="override max_steps")
    ap.add_argument("--config", default=None, help="JSON file or string of AutoencoderConfig fields")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fields: dict[str, Any] = {}
    if args.config:
        text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
        fields = json.loads(text)
    if args.steps:
        fields["max_steps"] = args.steps
    config = AutoencoderConfig.from_dict(fields)
    td = load_training_data(args.data, config.resolution)
    last = [time.perf_counter(), 0]

    def log(step: int, total: int, message: str) -> None:
        if step % args.log_every == 0 or step == total:
            now = time.perf_counter()
            rate = (now - last[0]) / max(1, step - last[1])
            last[0], last[1] = now, step
            print(f"{time.strftime('%H:%M:%S')} step {step}/{total} {message} {rate:.2f} s/step "
                  f"eta {rate * (total - step) / 60:.1f} min", flush=True)

    result = train_autoencoder(td.images, config, args.checkpoint_dir, args.resume, log,
                               patient_ids=td.patient_ids, device=args.device)
    save_vae(result.vae, args.out, config, {"steps": result.steps, "wall_seconds": result.wall_seconds,
                                            "device": result.device, "source": td.source,
                                            "heldout": result.metrics})
    print(json.dumps(result.metrics, indent=2), flush=True)
    print(f"done: {result.steps} steps, {result.wall_seconds:.0f} s, saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
