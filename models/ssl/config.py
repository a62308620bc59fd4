"""Configuration of a self-supervised pretraining run (method, backbone, crops, optimiser, schedules).

Defaults follow DINO (Caron et al. 2021) as used by the product paper (Hosseini & Serag 2025: DINO,
ViT-S/16) scaled down where the original values assume ImageNet and 8 GPUs: a smaller prototype
count (the head's ``output_dim``) suits tens of thousands of images, and the warm-ups are in steps,
not epochs, because synthetic sets have no natural epoch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from models.data.folders import AspectMode
from models.device import PRECISIONS, Precision
from models.ssl_methods import SSLMethod, check_ssl_method

# Backbones the product documents and tests; any timm model with ``in_chans`` and ``num_classes=0``
# works (e.g. ``test_vit`` for tests), these are just the ones the paper table uses.
SUPPORTED_BACKBONES = ("vit_small_patch16_224", "resnet18", "resnet50")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that decides what a pretraining run learns; saved in checkpoints and the export.

    ``backbone_kwargs`` go to ``timm.create_model`` (e.g. ``channels`` / ``stem_width`` for a thin
    ResNet in tests); ``img_size`` is set from ``resolution`` for fixed-input-size models (ViT).
    ``norm_mean`` / ``norm_std`` normalise ``pixels / 255`` before the backbone and are written to the
    exported ``config.json`` so downstream users feed the encoder the same way.
    """

    method: SSLMethod = "dino"
    backbone: str = "resnet18"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    resolution: int = 64
    aspect_mode: AspectMode = "pad"
    norm_mean: float = 0.5
    norm_std: float = 0.25
    # --- multi-crop (DINO) / two views (SimCLR)
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    n_local_crops: int = 6
    # None: DINO's 96/224 ratio of the global size, rounded to a multiple of 16 (ViT patch size).
    local_resolution: int | None = None
    # --- DINO head and loss
    dino_hidden_dim: int = 2048
    dino_bottleneck_dim: int = 256
    dino_output_dim: int = 4096
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    momentum_start: float = 0.996  # teacher EMA momentum, cosine schedule to momentum_end
    momentum_end: float = 1.0
    freeze_last_layer_steps: int = 0
    # --- SimCLR head and loss
    simclr_hidden_dim: int = 2048
    simclr_output_dim: int = 128
    simclr_temperature: float = 0.1
    # --- optimisation
    max_steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 5e-4
    min_learning_rate: float = 1e-6
    weight_decay: float = 0.04
    warmup_steps: int = 50
    grad_clip_norm: float = 3.0
    seed: int = 0
    checkpoint_every: int = 100
    # bf16 autocast: ``auto`` uses it on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), where a
    # ResNet-18 step runs ~1.7x faster; ``fp32`` forces exact fp32 (the loss is fp32 either way).
    precision: Precision = "auto"
    # --- data loading: sets up to this size (N * resolution^2 bytes) are decoded into RAM once,
    # larger ones stream from disk through a DataLoader with ``num_workers`` processes.
    cache_limit_mb: int = 512
    num_workers: int = 0
    # --- export
    export_fp16: bool = False

    def __post_init__(self) -> None:
        check_ssl_method(self.method)  # the registry: models/ssl_methods.py
        if self.resolution < 16:
            raise ValueError("resolution must be >= 16")
        if self.max_steps <= 0 or self.batch_size <= 0:
            raise ValueError("max_steps and batch_size must be positive")
        if self.method == "simclr" and self.batch_size < 2:
            raise ValueError("SimCLR needs batch_size >= 2 (the other images are the negatives)")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError("warmup_steps must be in [0, max_steps]")
        if self.n_local_crops < 0:
            raise ValueError("n_local_crops must be >= 0")
        for name in ("global_crop_scale", "local_crop_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1")
        if not 0.0 <= self.momentum_start <= self.momentum_end <= 1.0:
            raise ValueError("need 0 <= momentum_start <= momentum_end <= 1")
        if self.norm_std <= 0:
            raise ValueError("norm_std must be positive")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    @property
    def local_size(self) -> int:
        """Side of the local crops in pixels."""
        if self.local_resolution is not None:
            return self.local_resolution
        return max(16, round(self.resolution * 96 / 224 / 16) * 16)

    @classmethod
    def tiny(cls, **overrides: Any) -> PretrainConfig:
        """A thin ResNet-18 at 32 px with small heads that trains in a second on CPU, for tests."""
        base: dict[str, Any] = dict(
            backbone="resnet18",
            backbone_kwargs={"channels": (8, 16, 32, 64), "stem_width": 8},
            resolution=32,
            local_resolution=16,
            n_local_crops=2,
            dino_hidden_dim=64,
            dino_bottleneck_dim=32,
            dino_output_dim=128,
            simclr_hidden_dim=64,
            simclr_output_dim=32,
            max_steps=6,
            batch_size=8,
            learning_rate=1e-3,
            warmup_steps=1,
            checkpoint_every=2,
        )
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes: Any) -> PretrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["backbone_kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.backbone_kwargs.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are rejected so typos do not pass silently."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown PretrainConfig fields: {sorted(unknown)}")
        d = dict(d)
        for key in ("global_crop_scale", "local_crop_scale"):
            if key in d:
                d[key] = tuple(d[key])
        if "backbone_kwargs" in d:
            d["backbone_kwargs"] = {k: tuple(v) if isinstance(v, list) else v for k, v in d["backbone_kwargs"].items()}
        return cls(**d)
