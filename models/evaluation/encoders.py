"""The encoder under evaluation: an exported encoder directory, or a random ("scratch") timm model.

``scratch`` is the baseline of every comparison (random initialisation of the same architecture),
so ``encoder="scratch"`` (ResNet-18 unless told otherwise) or ``encoder="scratch:<timm name>"``
makes it one argument away.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.device import autocast_for
from models.ssl.augment import normalize, to_unit_float
from models.ssl.backbones import backbone_kwargs, create_backbone, is_fixed_input_size
from models.ssl.export import load_encoder, read_encoder_config

SCRATCH = "scratch"
DEFAULT_SCRATCH_MODEL = "resnet18"
DEFAULT_SCRATCH_RESOLUTION = 64
# Same input convention as a freshly pretrained encoder (PretrainConfig defaults), so scratch and
# pretrained arms see identical pixels.
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.25


@dataclass
class EvalEncoder:
    """A backbone ready for downstream training plus how to feed it."""

    module: nn.Module
    model_name: str
    timm_kwargs: dict[str, Any]
    resolution: int
    mean: float
    std: float
    aspect_mode: str
    source: str
    pretraining: dict[str, Any] = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        """Width of the pooled features."""
        return int(self.module.num_features)  # type: ignore[arg-type]

    @property
    def fixed_input_size(self) -> bool:
        """True for ViT-like encoders (segmentation then uses a DPT decoder, not a U-Net)."""
        return is_fixed_input_size(self.model_name)

    def fresh_copy(self) -> nn.Module:
        """An independent copy of the backbone (fine-tuning must not alter the loaded weights)."""
        return copy.deepcopy(self.module)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for evaluation reports."""
        pre = self.pretraining
        return {
            "source": self.source,
            "architecture": self.model_name,
            "timm_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in self.timm_kwargs.items()},
            "resolution": self.resolution,
            "method": pre.get("method", SCRATCH if self.source.startswith(SCRATCH) else None),
            "pretraining_data": pre.get("data"),
            "pretraining_steps": pre.get("steps"),
        }


def resolve_encoder(
    encoder: str | Path | EvalEncoder,
    *,
    scratch_model: str = DEFAULT_SCRATCH_MODEL,
    scratch_kwargs: dict[str, Any] | None = None,
    resolution: int | None = None,
    seed: int = 0,
) -> EvalEncoder:
    """Load an encoder directory, or build a seeded random one for ``"scratch"`` / ``"scratch:<name>"``.

    ``resolution`` overrides the encoder's own (the default evaluates at the pretraining resolution).
    """
    if isinstance(encoder, EvalEncoder):
        return encoder
    text = str(encoder)
    if text == SCRATCH or text.startswith(SCRATCH + ":"):
        name = text.split(":", 1)[1] if ":" in text else scratch_model
        res = resolution or DEFAULT_SCRATCH_RESOLUTION
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = create_backbone(name, res, scratch_kwargs)
        return EvalEncoder(
            module, name, backbone_kwargs(name, res, scratch_kwargs), res, DEFAULT_MEAN, DEFAULT_STD, "pad",
            f"{SCRATCH}:{name}",
        )
    path = Path(encoder)
    if not path.is_dir():
        raise FileNotFoundError(f"encoder not found: {path} (give an encoder directory or 'scratch')")
    cfg = read_encoder_config(path)
    return EvalEncoder(
        load_encoder(path),
        cfg["architecture"],
        dict(cfg["timm_kwargs"]),
        resolution or int(cfg["resolution"]),
        float(cfg["mean"][0]),
        float(cfg["std"][0]),
        str(cfg.get("aspect_mode", "pad")),
        str(path),
        dict(cfg.get("pretraining", {})),
    )


@torch.inference_mode()
def extract_features(
    module: nn.Module,
    images: np.ndarray,
    mean: float,
    std: float,
    device: torch.device,
    batch_size: int = 64,
) -> np.ndarray:
    """Pooled features ``(N, D)`` float32 of (N, H, W) uint8 images with a frozen backbone (eval mode)."""
    module.eval()
    out: list[np.ndarray] = []
    for i in range(0, len(images), batch_size):
        x = to_unit_float(torch.from_numpy(images[i : i + batch_size]).to(device))
        with autocast_for(device):
            f = module(normalize(x, mean, std))
        out.append(f.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, int(module.num_features)), np.float32)  # type: ignore[arg-type]


@torch.inference_mode()
def extract_feature_grids(
    module: nn.Module,
    images: np.ndarray,
    mean: float,
    std: float,
    device: torch.device,
    grids: Sequence[int],
    batch_size: int = 64,
) -> dict[int, np.ndarray]:
    """Frozen features of (N, H, W) uint8 images for each readout grid, from one forward pass per batch.

    Grid 1 is the model's own pooled features (as :func:`extract_features`); grid ``k > 1`` average-pools
    the last feature map to ``k x k`` and flattens it (``k * k * C`` features), keeping the coarse layout
    a global pool throws away (where an opacity sits). ``ValueError`` for ``k > 1`` on an encoder whose
    last features are not a spatial map (a ViT's are tokens).
    """
    wanted = sorted({int(k) for k in grids})
    if not wanted or wanted[0] < 1:
        raise ValueError(f"grids must be positive integers, got {list(grids)}")
    if wanted == [1]:
        return {1: extract_features(module, images, mean, std, device, batch_size)}
    module.eval()
    out: dict[int, list[np.ndarray]] = {k: [] for k in wanted}
    for i in range(0, len(images), batch_size):
        x = to_unit_float(torch.from_numpy(images[i : i + batch_size]).to(device))
        with autocast_for(device):
            fmap = module.forward_features(normalize(x, mean, std))  # type: ignore[operator]
            if fmap.ndim != 4:
                raise ValueError(f"a {max(wanted)}x{max(wanted)} grid readout needs a spatial feature map; this "
                                 f"encoder's last features have shape {tuple(fmap.shape)}")
            for k in wanted:
                f = module.forward_head(fmap) if k == 1 else nn.functional.adaptive_avg_pool2d(fmap, k).flatten(1)  # type: ignore[operator]
                out[k].append(f.float().cpu().numpy())
    width = int(module.num_features)  # type: ignore[arg-type]
    return {k: np.concatenate(v) if v else np.zeros((0, width * k * k), np.float32) for k, v in out.items()}
