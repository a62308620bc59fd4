"""Export of a trained generator in diffusers format, plus its training index and model card.

A generator directory holds, at its root::

    config.json, diffusion_pytorch_model.safetensors   UNet2DModel.save_pretrained (EMA weights)
    scheduler_config.json                              DDPMScheduler.save_pretrained
    cxrsynth.json                                      labels -> class ids, resolution, provenance
    training_index.safetensors                         SHA-256 + 16x16 embedding per training image
    privacy_index.safetensors, privacy_calibration.json  memorisation gate features + thresholds
    README.md                                          model card

so ``UNet2DModel.from_pretrained(dir)`` and ``DDPMScheduler.from_pretrained(dir)`` work without
this project, and :class:`models.diffusion.pipeline.CXRDiffusionPipeline` reads ``cxrsynth.json``
for the label mapping.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

# Concrete module imports (not the lazy top-level ``diffusers``) so mypy sees the real classes.
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.numpy import load_file as load_numpy_safetensors
from safetensors.numpy import save_file as save_numpy_safetensors

from models.checkpoints import atomic_directory
from models.diffusion.config import TrainingConfig
from models.provenance import data_sources_for

if TYPE_CHECKING:
    from models.diffusion.training import TrainingData

CXRSYNTH_JSON = "cxrsynth.json"
TRAINING_INDEX = "training_index.safetensors"
INDEX_EMBED_SIZE = 16
FORMAT = "cxrsynth-generator/1"



# --------------------------------------------------------------------------------------------
# Training index (for the privacy gate): hashes and small embeddings, never the images
# --------------------------------------------------------------------------------------------


def index_embeddings(images: np.ndarray, size: int = INDEX_EMBED_SIZE) -> np.ndarray:
    """(N, size*size) float16 embeddings: area-downsampled, per-image zero-mean unit-variance pixels.

    Intensity normalisation makes the nearest-neighbour search of the privacy gate insensitive to
    global brightness / contrast shifts, which a memorised copy could still have.
    """
    x = torch.from_numpy(np.asarray(images, dtype=np.uint8)).float().unsqueeze(1) / 255.0
    x = F.adaptive_avg_pool2d(x, size).flatten(1)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-3)
    return x.numpy().astype(np.float16)


def image_sha256(image: np.ndarray) -> str:
    """SHA-256 hex digest of an image's uint8 pixels (row-major), the content hash of the index."""
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


@dataclass(frozen=True)
class TrainingIndex:
    """Per training image: SHA-256 of its pixels at the training resolution, a small embedding, label."""

    sha256: list[str]
    embeddings: np.ndarray  # (N, D) float16
    labels: np.ndarray  # (N,) int64, -1 when unlabelled
    embedding: str  # how the embedding was computed
    resolution: int


def save_training_index(images: np.ndarray, labels: np.ndarray | None, resolution: int, path: Path) -> Path:
    """Write ``training_index.safetensors`` for (N, H, W) uint8 training images."""
    digests = np.stack(
        [np.frombuffer(bytes.fromhex(image_sha256(im)), dtype=np.uint8) for im in images]
    )
    lab = np.full(len(images), -1, dtype=np.int64) if labels is None else labels.astype(np.int64)
    save_numpy_safetensors(
        {"sha256": digests, "embeddings": index_embeddings(images), "labels": lab},
        str(path),
        metadata={
            "format": "cxrsynth-training-index/1",
            "embedding": f"adaptive average pool to {INDEX_EMBED_SIZE}x{INDEX_EMBED_SIZE} of pixels/255, "
            "then per-image zero mean, unit std; float16",
            "hash": "sha256 of the uint8 pixels (row-major) at the training resolution",
            "resolution": str(resolution),
        },
    )
    return path


def load_training_index(generator_dir: str | Path) -> TrainingIndex:
    """Read the training index shipped with a generator (for the privacy gate)."""
    from safetensors import safe_open

    path = Path(generator_dir) / TRAINING_INDEX
    if not path.is_file():
        raise FileNotFoundError(f"no training index at {path}")
    tensors = load_numpy_safetensors(str(path))
    with safe_open(str(path), framework="np") as fh:
        meta = fh.metadata() or {}
    return TrainingIndex(
        sha256=[bytes(row).hex() for row in tensors["sha256"]],
        embeddings=tensors["embeddings"],
        labels=tensors["labels"],
        embedding=meta.get("embedding", ""),
        resolution=int(meta.get("resolution", "0")),
    )


def write_privacy_index(generator_dir: Path, data: TrainingData, device: str = "auto") -> bool:
    """Privacy index + calibrated thresholds of the memorisation gate (:mod:`models.privacy.index`).

    The leave-one-out calibration skips the same patient when ``data.patient_ids`` is known (a training
    folder: ids from the file names) and only exact duplicates otherwise (an in-memory array); which one
    is recorded in ``privacy_calibration.json``. Returns False (and logs why) when the set is too small to
    calibrate: the generator then works without a gate and its datasets are recorded ``not_run``.
    """
    import logging

    from models.privacy.index import build_privacy_index, save_privacy_index

    try:
        index, calibration = build_privacy_index(
            data.images, labels=data.labels, patient_ids=data.patient_ids, source=data.source,
            device=device)
    except ValueError as exc:
        logging.getLogger(__name__).warning("no privacy index for %s: %s", generator_dir, exc)
        return False
    save_privacy_index(generator_dir, index, calibration)
    return True


# --------------------------------------------------------------------------------------------
# Weights and metadata
# --------------------------------------------------------------------------------------------


def ema_unet(ema: EMAModel, unet: UNet2DModel, dtype: torch.dtype = torch.float32) -> UNet2DModel:
    """A new UNet holding the EMA weights (the training UNet is left untouched)."""
    model = UNet2DModel.from_config(unet.config)
    assert isinstance(model, UNet2DModel)
    ema.copy_to(model.parameters())
    # Buffers (none in UNet2DModel today) are not tracked by EMA: take the live ones.
    for (_, b_dst), (_, b_src) in zip(model.named_buffers(), unet.named_buffers(), strict=True):
        b_dst.copy_(b_src)
    # nn.Module.to directly: diffusers' ModelMixin.to warns about fp32-pinned modules on every dtype
    # cast, and UNet2DModel has none.
    return torch.nn.Module.to(model, dtype=dtype).eval()


def read_generator_metadata(generator_dir: str | Path) -> dict[str, Any]:
    """Read ``cxrsynth.json`` of a generator directory."""
    path = Path(generator_dir) / CXRSYNTH_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{generator_dir} is not a cxrsynth generator (no {CXRSYNTH_JSON})")
    meta: dict[str, Any] = json.loads(path.read_text())
    return meta


def export_generator(
    out_dir: str | Path,
    unet: UNet2DModel,
    ema: EMAModel,
    config: TrainingConfig,
    data: TrainingData,
    *,
    steps: int,
    wall_seconds: float,
    device: str,
    notes: str = "",
    sample_grid: bool = True,
    vae: Any = None,
    autoencoder_info: Mapping[str, Any] | None = None,
    warm_start: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete generator directory (built in a temp dir, then moved into place).

    ``warm_start`` (``{"from": name, "steps": n}``) records the generator this one continued, and makes
    ``training.total_steps`` the UNet's whole budget.

    With ``vae`` (a latent generator) the weights go to the diffusers component folders ``unet/``,
    ``vae/`` and ``scheduler/``; a pixel generator keeps them at the root, as every earlier release.
    """
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        dtype = torch.float16 if config.export_fp16 else torch.float32
        model = ema_unet(ema, unet, dtype=dtype)
        if vae is not None:
            from models.diffusion.autoencoder import AutoencoderConfig, save_vae

            ae_config = AutoencoderConfig.from_dict(dict((autoencoder_info or {})["config"]))
            model.save_pretrained(tmp / "unet", safe_serialization=True)
            DDPMScheduler(**config.scheduler_kwargs()).save_pretrained(tmp / "scheduler")
            save_vae(vae, tmp / "vae", ae_config.replace(export_fp16=config.export_fp16),
                     {k: v for k, v in (autoencoder_info or {}).items() if k != "config"})
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            DDPMScheduler(**config.scheduler_kwargs()).save_pretrained(tmp)
        resolution = int(data.images.shape[1])
        save_training_index(data.images, data.labels, resolution, tmp / TRAINING_INDEX)
        write_privacy_index(tmp, data)
        meta = _metadata(config, data, steps=steps, wall_seconds=wall_seconds, device=device,
                         dtype=str(dtype).removeprefix("torch."))
        if vae is not None:
            meta.update(_latent_metadata(vae, resolution, autoencoder_info or {}))
        if warm_start:
            meta["training"]["warm_start"] = dict(warm_start)
            meta["training"]["total_steps"] = int(warm_start["steps"]) + steps
        (tmp / CXRSYNTH_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        if sample_grid:
            _export_sample_grid(tmp)
        (tmp / "README.md").write_text(model_card(meta, notes=notes, has_grid=sample_grid))
    return out


def _metadata(
    config: TrainingConfig, data: TrainingData, *, steps: int, wall_seconds: float, device: str, dtype: str
) -> dict[str, Any]:
    labels = {name: i for i, name in enumerate(data.label_names)}
    return {
        "format": FORMAT,
        "kind": "pixel",
        "resolution": config.resolution,
        "channels": 1,
        "labels": labels,
        "null_class_id": len(labels) if labels else None,
        "conditional": bool(labels),
        "prediction_type": config.prediction_type,
        "beta_schedule": config.beta_schedule,
        "num_train_timesteps": config.num_train_timesteps,
        "normalisation": "x = uint8 / 127.5 - 1 (pixel range [-1, 1]); output = round((x + 1) * 127.5)",
        "aspect_mode": config.aspect_mode,
        "weights_dtype": dtype,
        "training_data": {
            "source": data.source,
            "num_images": len(data.images),
            "counts": data.counts(),
        },
        "training": {
            "steps": steps,
            "batch_size": config.batch_size,
            "wall_seconds": round(wall_seconds, 1),
            "device": device,
            "config": config.to_dict(),
        },
        "index": {"file": TRAINING_INDEX, "embedding_size": INDEX_EMBED_SIZE},
    }


def _warm_start_line(meta: Mapping[str, Any]) -> str:
    """Card line of a warm-started generator: where it started and its whole UNet budget."""
    warm = meta["training"].get("warm_start")
    if not warm:
        return ""
    return (f"\n- Warm-started from `{warm['from']}` ({warm['steps']:,} steps): "
            f"{meta['training']['total_steps']:,} UNet steps in all.")


def _latent_metadata(vae: Any, resolution: int, info: Mapping[str, Any]) -> dict[str, Any]:
    """``cxrsynth.json`` keys of a latent generator: image size, latent grid, autoencoder record."""
    cfg = vae.config
    return {
        "kind": "latent",
        "resolution": resolution,
        "latent": {
            "resolution": resolution // 2 ** (len(cfg["block_out_channels"]) - 1),
            "channels": int(cfg["latent_channels"]),
            "scaling_factor": float(cfg["scaling_factor"]),
            "shift_factor": float(cfg.get("shift_factor") or 0.0),
        },
        "components": {"unet": "unet", "vae": "vae", "scheduler": "scheduler"},
        "autoencoder": {k: v for k, v in info.items()},
        "normalisation": "image x = uint8 / 127.5 - 1; latent = (vae.encode(x).mode() - shift_factor) * "
                         "scaling_factor; output = round((vae.decode(latent / scaling_factor + shift_factor) + 1) "
                         "* 127.5)",
    }


def _export_sample_grid(generator_dir: Path) -> None:
    from models.diffusion.pipeline import CXRDiffusionPipeline

    pipe = CXRDiffusionPipeline.from_pretrained(generator_dir, device="cpu")
    if pipe.label_names:
        labs: list[str | int] = [n for n in pipe.label_names for _ in range(8)]
        out = pipe(labels=labs, seed=0, num_inference_steps=20, guidance_scale=2.0)
    else:
        out = pipe(num_images=16, seed=0, num_inference_steps=20)
    save_grid(out.images, generator_dir / "samples.png", ncols=8)


def save_grid(images: np.ndarray, path: str | Path, ncols: int = 8, pad: int = 2) -> Path:
    """Save (N, H, W) uint8 images as one PNG grid (rows of ``ncols``)."""
    n, h, w = images.shape
    rows = math.ceil(n / ncols)
    grid = np.full((rows * (h + pad) + pad, ncols * (w + pad) + pad), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
    Image.fromarray(grid, mode="L").save(path)
    return Path(path)


def _model_section(meta: Mapping[str, Any], cfg: Mapping[str, Any], labels: str) -> str:
    """How to load the generator and what its networks are, per kind (pixel or latent)."""
    unet = (f"`UNet2DModel`, block_out_channels {tuple(cfg['block_out_channels'])}, {cfg['layers_per_block']} "
            f"layer(s) per block, self-attention at the {cfg['attention_levels']} lowest resolution(s); EMA weights "
            f"({meta['weights_dtype']}).")
    common = f"""- Class labels: {labels}; null class id {meta['null_class_id']} (classifier-free guidance, trained by
  label dropout p={cfg['label_dropout']}).
- Objective: {meta['prediction_type']}, beta schedule `{meta['beta_schedule']}`, {meta['num_train_timesteps']}
  train steps. Normalisation: {meta['normalisation']}. Aspect ratio: `{meta['aspect_mode']}`.
"""
    if meta.get("kind") != "latent":
        return f"""diffusers format: `UNet2DModel.from_pretrained(dir)` and `DDPMScheduler.from_pretrained(dir)` load
it; `models.diffusion.CXRDiffusionPipeline.from_pretrained(dir)` adds labels, seeds per image and samplers.

## Model
- {unet.replace("`UNet2DModel`, ", "`UNet2DModel`, 1 channel, ")}
{common}"""
    lat, ae = meta["latent"], meta.get("autoencoder", {})
    grid = f"{lat['channels']}x{lat['resolution']}x{lat['resolution']}"
    acfg = ae.get("config", {})
    held = ae.get("heldout") or {}
    rec = ""
    if held:
        a, b = held["autoencoder"], held.get("bicubic", {})
        rec = (f"\n- Reconstruction of {a['images']} held-out real images (whole patients kept out of training) at "
               f"{held['resolution']} px: PSNR {a['psnr_db']:.2f} dB, SSIM {a['ssim']:.3f}; a bicubic round trip "
               f"through {b.get('via_px')} px gets {b.get('psnr_db', float('nan')):.2f} dB, "
               f"SSIM {b.get('ssim', float('nan')):.3f}.")
    return f"""Latent diffusion, diffusers components: `UNet2DModel.from_pretrained(dir, subfolder="unet")`,
`AutoencoderKL.from_pretrained(dir, subfolder="vae")`, `DDPMScheduler.from_pretrained(dir, subfolder="scheduler")`;
`models.diffusion.CXRDiffusionPipeline.from_pretrained(dir)` adds labels, seeds per image, samplers and decoding.

## Model
- Autoencoder: `AutoencoderKL`, 1 channel, block_out_channels {tuple(acfg.get('block_out_channels', ()))}, factor
  {meta['resolution'] // lat['resolution']}, {lat['channels']} latent channels, latent shift {lat['shift_factor']:.4f}
  and scale {lat['scaling_factor']:.4f} (from the training images); trained {ae.get('steps', 0):,} steps on
  {acfg.get('crop_size')} px crops with L1 + {acfg.get('ssim_weight')} x (1 - SSIM) + {acfg.get('kl_weight')} x KL,
  {ae.get('wall_seconds', 0):,.0f} s on {ae.get('device', '?')}.{rec}
- Denoiser: {unet.replace("`UNet2DModel`, ", f"`UNet2DModel` on {grid} latents, ")}
{common}"""


def model_card(meta: Mapping[str, Any], notes: str = "", has_grid: bool = False) -> str:
    """Markdown model card from ``cxrsynth.json`` metadata."""
    cfg = meta["training"]["config"]
    counts = ", ".join(f"{k}: {v:,}" for k, v in meta["training_data"]["counts"].items())
    labels = ", ".join(f"`{k}` = {v}" for k, v in meta["labels"].items()) or "none (unconditional)"
    grid = (
        "\n![samples](samples.png)\n\nRows: one per label, DPM-Solver++ 20 steps, guidance 2, seed 0.\n"
        if has_grid
        else ""
    )
    return f"""# cxrsynth generator: {meta['training_data']['source']} at {meta['resolution']} px

Diffusion model that generates synthetic grey-scale chest X-rays ({meta['resolution']}x{meta['resolution']}).
{_model_section(meta, cfg, labels)}
## Training
- Data: `{meta['training_data']['source']}`, {meta['training_data']['num_images']:,} images ({counts}).
  No horizontal flips (anatomy is not mirror-symmetric).
- {meta['training']['steps']:,} steps at batch {cfg['batch_size']}, AdamW lr {cfg['learning_rate']} with
  {cfg['warmup_steps']} warm-up steps and cosine decay, grad clip {cfg['grad_clip_norm']}, EMA decay {cfg['ema_decay']}.
- Wall time {meta['training']['wall_seconds']:,.0f} s on {meta['training']['device']}.{_warm_start_line(meta)}
{grid}
## Privacy
`training_index.safetensors` holds, per training image, the SHA-256 of its pixels at the training
resolution and a 16x16 intensity-normalised embedding (float16). `privacy_index.safetensors` holds the
features the memorisation gate (`models.privacy`) searches (a 14x14 pixel vector and a copy-detection
embedding per image, fp16) and `privacy_calibration.json` its thresholds, calibrated on how close real
images of other patients are to the training set. Features, never the images. Every generated image
closer to a training image than the thresholds allow is replaced by a new sample.

## Data sources and licences
The weights are a derived work of the training data, licensed CC BY 4.0:

{data_sources_for(meta['training_data']['source'])}

## Notes
{notes or "Research use only; not a medical device. Synthetic images can carry the biases of the training data."}
"""


def write_model_card(generator_dir: str | Path, notes: str) -> Path:
    """Rewrite a generator's ``README.md`` from its ``cxrsynth.json`` with new free-text notes.

    Used to add measured observations (quality, training history) after the export.
    """
    root = Path(generator_dir)
    meta = read_generator_metadata(root)
    path = root / "README.md"
    path.write_text(model_card(meta, notes=notes, has_grid=(root / "samples.png").is_file()))
    return path
