"""Batched, on-device augmentations of grey chest radiographs with kornia (SSL views and fine-tuning).

Every transform runs on whole ``(B, 1, H, W)`` float batches on the training device with per-image
random parameters, so the data loader only decodes uint8 pixels and the GPU does the rest.

What is in, and why (each line of :func:`xray_augmentation` repeats the reason briefly):

* Random resized crop: radiographs differ in collimation, field of view and patient size; crops teach
  invariance to framing. Global crops keep >= 40% of the image so most of the lung field survives.
* Small rotation (+-10 degrees): patient positioning tilts the thorax a few degrees; larger angles
  never occur in PA/AP films and would waste capacity.
* Brightness / contrast / gamma: exposure (kVp, mAs), detector and vendor look-up tables change the
  grey-level curve from site to site; the anatomy does not.
* Gaussian blur: detector sharpness, focal-spot size and downsampling differ between machines.
* Solarize (DINO's second global view only): inverts the bright range; a mild "polarity" change
  that also occurs for real (MONOCHROME1 vs MONOCHROME2 DICOMs shown without their LUT).

What is out, and why:

* No hue / saturation / colour jitter and no grey-scale conversion: the images have one channel,
  colour is undefined.
* No horizontal flip by default: chest anatomy is not mirror-symmetric (heart, aortic knob and
  stomach bubble on the patient's left, liver dome on the right); flip invariance would erase
  laterality, which is itself a finding (dextrocardia, side of a consolidation).
* No vertical flip or large rotations: never seen in clinical chest films.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import kornia.augmentation as K
import torch
from kornia.augmentation.container.params import ParamItem
from torch import nn

from models.distributed import World, shard_rows


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of one view's augmentation; probabilities are per image."""

    size: int
    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation_degrees: float = 10.0
    rotation_p: float = 0.5
    brightness: float = 0.2  # factor in [1 - b, 1 + b]
    contrast: float = 0.2
    intensity_p: float = 0.8
    gamma: tuple[float, float] = (0.8, 1.25)
    gamma_p: float = 0.5
    blur_p: float = 0.5
    blur_sigma_at_224: tuple[float, float] = (0.1, 2.0)  # DINO's range, scaled with the crop size
    solarize_p: float = 0.0
    horizontal_flip_p: float = 0.0  # off on purpose, see the module docstring

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError("size must be >= 8")
        for name in ("rotation_p", "intensity_p", "gamma_p", "blur_p", "solarize_p", "horizontal_flip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]")


def blur_params(cfg: AugmentConfig) -> tuple[int, tuple[float, float]]:
    """Blur sigma scaled from DINO's 224 px range to this crop size, and an odd kernel covering 3 sigma."""
    scale = cfg.size / 224
    lo = max(0.1, cfg.blur_sigma_at_224[0] * scale)
    hi = max(lo, cfg.blur_sigma_at_224[1] * scale)
    kernel = max(3, 2 * math.ceil(3 * hi) + 1)
    return kernel, (lo, hi)


def xray_augmentation(cfg: AugmentConfig) -> K.AugmentationSequential:
    """The kornia pipeline of one view (float ``[0, 1]`` in, float ``[0, 1]`` at ``cfg.size`` out)."""
    kernel, sigma = blur_params(cfg)
    b, c = cfg.brightness, cfg.contrast
    ops: list[Any] = [
        # Framing / collimation / patient size vary: crop and rescale to the view size.
        K.RandomResizedCrop((cfg.size, cfg.size), scale=cfg.crop_scale, ratio=cfg.crop_ratio),
        # Positioning tilts the chest a few degrees; never more than ~10 in PA/AP films.
        K.RandomRotation(degrees=cfg.rotation_degrees, p=cfg.rotation_p),
        # Exposure and vendor grey-level curves differ: brightness, contrast, then gamma.
        K.RandomBrightness(brightness=(1 - b, 1 + b), p=cfg.intensity_p),
        K.RandomContrast(contrast=(1 - c, 1 + c), p=cfg.intensity_p),
        K.RandomGamma(gamma=cfg.gamma, p=cfg.gamma_p),
    ]
    if cfg.blur_p > 0:
        # Detector sharpness and resampling differ between machines.
        ops.append(K.RandomGaussianBlur(kernel_size=(kernel, kernel), sigma=sigma, p=cfg.blur_p))
    if cfg.solarize_p > 0:
        # Inverted bright range (MONOCHROME1 shown without its LUT); DINO's second global view only.
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=cfg.solarize_p))
    if cfg.horizontal_flip_p > 0:
        # Off by default: anatomy is not mirror-symmetric (see module docstring); opt-in only.
        ops.append(K.RandomHorizontalFlip(p=cfg.horizontal_flip_p))
    return K.AugmentationSequential(*ops)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 1, H, W)`` or ``(B, H, W)`` pixels -> float32 ``(B, 1, H, W)`` in ``[0, 1]``."""
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected (B, 1, H, W) grey images, got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


class XRayAugment(nn.Module):
    """One augmented view of a batch: ``(B, 1, H, W)`` uint8 or ``[0, 1]`` float -> float ``[0, 1]``."""

    def __init__(self, cfg: AugmentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pipeline = xray_augmentation(cfg)

    def forward(self, images: torch.Tensor, w: World | None = None) -> torch.Tensor:
        """The augmented batch; in a distributed run ``images`` is this rank's share of the global batch."""
        x = to_unit_float(images)
        if w is None or not w.distributed:
            return self.pipeline(x).clamp_(0.0, 1.0)
        # Draw the parameters of the whole global batch (the same on every rank: same seed, same draws),
        # then apply this rank's rows: each image gets the augmentation it would get in one process.
        params = self.pipeline.forward_parameters(torch.Size((x.shape[0] * w.size, *x.shape[1:])))
        return self.pipeline(x, params=_shard_params(params, w, x.shape)).clamp_(0.0, 1.0)


def _shard_params(params: list[ParamItem], w: World, local_shape: torch.Size) -> list[ParamItem]:
    """This rank's rows of kornia's per-image parameters of a global batch.

    kornia has no notion of a distributed batch; every per-image tensor it draws has the batch first, and
    ``forward_input_shape`` (the shape it was drawn for) must become this rank's shape.
    """
    out = []
    for item in params:
        if isinstance(item.data, list):
            out.append(ParamItem(item.name, _shard_params(item.data, w, local_shape)))
            continue
        data = {k: (torch.tensor(tuple(local_shape)) if k == "forward_input_shape" else shard_rows(v, w))
                for k, v in (item.data or {}).items()}
        out.append(ParamItem(item.name, data))
    return out


class MultiViewAugment(nn.Module):
    """Several independently augmented views of the same batch (SSL): a list of ``[0, 1]`` tensors."""

    def __init__(self, views: list[AugmentConfig]) -> None:
        super().__init__()
        if not views:
            raise ValueError("need at least one view")
        self.views = nn.ModuleList(XRayAugment(v) for v in views)

    def forward(self, images: torch.Tensor, w: World | None = None) -> list[torch.Tensor]:
        """The views of a batch (this rank's share of the global batch when ``w`` is distributed)."""
        x = to_unit_float(images)
        return [view(x, w) for view in self.views]


def dino_views(
    global_size: int,
    local_size: int,
    n_local: int,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
) -> MultiViewAugment:
    """DINO multi-crop: 2 global views (first always blurred, second rarely blurred but sometimes
    solarized, as in Caron et al. 2021) and ``n_local`` small local views (blur p=0.5)."""
    g1 = AugmentConfig(size=global_size, crop_scale=global_scale, blur_p=1.0)
    g2 = AugmentConfig(size=global_size, crop_scale=global_scale, blur_p=0.1, solarize_p=0.2)
    loc = AugmentConfig(size=local_size, crop_scale=local_scale, blur_p=0.5)
    return MultiViewAugment([g1, g2] + [loc] * n_local)


def simclr_views(size: int, crop_scale: tuple[float, float] = (0.4, 1.0)) -> MultiViewAugment:
    """SimCLR: two views from the same distribution (blur p=0.5, no solarize)."""
    cfg = AugmentConfig(size=size, crop_scale=crop_scale, blur_p=0.5)
    return MultiViewAugment([cfg, cfg])


def finetune_augmentation(size: int) -> XRayAugment:
    """Mild augmentation for supervised fine-tuning: keeps >= 70% of the image, no blur/solarize."""
    return XRayAugment(
        AugmentConfig(size=size, crop_scale=(0.7, 1.0), crop_ratio=(0.9, 1.1), brightness=0.1, contrast=0.1,
                      intensity_p=0.5, gamma=(0.9, 1.1), gamma_p=0.3, blur_p=0.0)
    )


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(x - mean) / std`` on ``[0, 1]`` pixels: the encoder's input convention (in its config.json)."""
    return (images - mean) / std


def shift_robust_augmentation(size: int) -> XRayAugment:
    """Stronger fine-tuning augmentation against a change of acquisition (site, period, device).

    Compared with :func:`finetune_augmentation`: wider exposure changes (brightness and contrast
    +-30%, gamma 0.7-1.5, on 80% / 50% of the images) for other kVp/mAs and look-up tables; Gaussian
    blur on 30% for other detector sharpness and resampling; random resized crops keeping 50-100% of
    the image at aspect 0.8-1.25 (zoom) for other collimation, patient size and the upstream squash to a
    square; +-10 degree tilt. Still no flip (laterality) and no solarize (not a fine-tuning view).
    Per-image random parameters on the whole batch, on the training device.
    """
    return XRayAugment(
        AugmentConfig(size=size, crop_scale=(0.5, 1.0), crop_ratio=(0.8, 1.25), rotation_degrees=10.0,
                      rotation_p=0.5, brightness=0.3, contrast=0.3, intensity_p=0.8, gamma=(0.7, 1.5),
                      gamma_p=0.5, blur_p=0.3)
    )
