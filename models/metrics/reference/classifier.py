"""Loader of the reference classifier: its ``config.json``, the timm backbone, inference, save and load.

Everything needed at run time (domain FID, PRDC, label fidelity); training lives in
:mod:`models.metrics.reference.recipe`, the model card in :mod:`models.metrics.reference.card`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.device import autocast_for, pick_device
from models.metrics.images import ImageBatch, check_images, resize_square, to_unit_float

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "weights" / "reference-classifier-64"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FORMAT_VERSION = "1"
POSITIVE_LABEL = "pneumonia"


@dataclass(frozen=True)
class ReferenceConfig:
    """What ``config.json`` of a reference classifier holds: enough to rebuild and use it."""

    timm_name: str
    in_chans: int
    resolution: int
    mean: float
    std: float
    label_names: tuple[str, ...]
    positive_label: str = POSITIVE_LABEL
    aspect_mode: str = "pad"
    version: str = FORMAT_VERSION
    training_data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)

    @property
    def positive_index(self) -> int:
        """Index of the positive (pneumonia) class among ``label_names``."""
        return self.label_names.index(self.positive_label)

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready dict written to ``config.json``."""
        d = asdict(self)
        d["label_names"] = list(self.label_names)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ReferenceConfig:
        """Read ``config.json``; raises ``ValueError`` for an unknown format version or bad labels."""
        if str(d.get("version")) != FORMAT_VERSION:
            raise ValueError(f"reference classifier config version {d.get('version')!r} != {FORMAT_VERSION!r}")
        cfg = cls(
            timm_name=str(d["timm_name"]),
            in_chans=int(d["in_chans"]),
            resolution=int(d["resolution"]),
            mean=float(d["mean"]),
            std=float(d["std"]),
            label_names=tuple(str(x) for x in d["label_names"]),
            positive_label=str(d.get("positive_label", POSITIVE_LABEL)),
            aspect_mode=str(d.get("aspect_mode", "pad")),
            version=str(d["version"]),
            training_data=dict(d.get("training_data", {})),
            training=dict(d.get("training", {})),
            validation=dict(d.get("validation", {})),
        )
        if cfg.in_chans != 1:
            raise ValueError(f"reference classifier must take grey images (in_chans=1), got {cfg.in_chans}")
        if cfg.positive_label not in cfg.label_names:
            raise ValueError(f"positive label {cfg.positive_label!r} not in {cfg.label_names}")
        return cfg


def build_backbone(timm_name: str, num_classes: int, in_chans: int = 1) -> nn.Module:
    """A randomly initialised timm classifier (``pretrained=False``: nothing is fetched from a hub)."""
    import timm

    return timm.create_model(timm_name, pretrained=False, in_chans=in_chans, num_classes=num_classes)


class ReferenceClassifier:
    """A trained reference classifier: batched, ``inference_mode`` feature extraction and prediction.

    Inputs are :data:`~models.metrics.images.ImageBatch` (uint8 ``(N, H, W)`` arrays or ``[0, 1]``
    float tensors); they are padded to square and resized to the classifier's resolution when needed.
    """

    def __init__(self, model: nn.Module, config: ReferenceConfig, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.config = config
        self.device = device

    @property
    def num_features(self) -> int:
        """Dimension of the penultimate embedding returned by :meth:`features`."""
        return int(self.model.num_features)  # type: ignore[arg-type]

    @property
    def resolution(self) -> int:
        """Side of the square images the network was trained on."""
        return self.config.resolution

    def _batches(self, images: ImageBatch, batch_size: int) -> Iterator[torch.Tensor]:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        t = check_images(images)
        for start in range(0, t.shape[0], batch_size):
            x = to_unit_float(t[start : start + batch_size].to(self.device))
            x = resize_square(x, self.config.resolution)
            yield (x - self.config.mean) / self.config.std

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_for(self.device):
            fmap = self.model.forward_features(x)  # type: ignore[operator]
            emb = self.model.forward_head(fmap, pre_logits=True)  # type: ignore[operator]
            logits = self.model.get_classifier()(emb)  # type: ignore[operator]
        return emb.float(), logits.float()

    @torch.inference_mode()
    def features_and_proba(self, images: ImageBatch, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: (penultimate embeddings ``(N, D)``, pneumonia probabilities ``(N,)``), float32 on CPU."""
        feats, probs = [], []
        for x in self._batches(images, batch_size):
            emb, logits = self._forward(x)
            feats.append(emb.cpu())
            probs.append(logits.softmax(dim=1)[:, self.config.positive_index].cpu())
        return torch.cat(feats), torch.cat(probs)

    def features(self, images: ImageBatch, batch_size: int = 256) -> torch.Tensor:
        """Penultimate (globally pooled) embeddings ``(N, D)``: the feature space of domain FID and PRDC."""
        return self.features_and_proba(images, batch_size)[0]

    def predict_proba(self, images: ImageBatch, batch_size: int = 256) -> torch.Tensor:
        """Probability of the positive label (pneumonia) for each image, ``(N,)`` float32."""
        return self.features_and_proba(images, batch_size)[1]

    def feature_module(self) -> nn.Module:
        """An ``nn.Module`` mapping image batches to embeddings, for ``torchmetrics`` FID's ``feature=``."""
        return _FeatureModule(self)


class _FeatureModule(nn.Module):
    """Adapter: torchmetrics' FID calls ``module(imgs)`` and reads ``num_features``."""

    def __init__(self, classifier: ReferenceClassifier) -> None:
        super().__init__()
        self._classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self._classifier.features(imgs)

    def train(self, mode: bool = True) -> _FeatureModule:
        # torchmetrics may toggle train mode on its children; the classifier always stays in eval mode.
        return super().train(False)


def save_reference_classifier(model: nn.Module, config: ReferenceConfig, out_dir: str | Path) -> Path:
    """Write fp16 ``model.safetensors`` (integer buffers kept) and ``config.json`` into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "version": FORMAT_VERSION})
    (out / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    return out


def load_reference_classifier(dir: str | Path | None = None, device: str = "auto") -> ReferenceClassifier:
    """Load a reference classifier directory (default: the shipped 64 px one) for inference.

    fp16 weights are upcast to fp32 (CPU inference in fp16 is slow and inexact; CUDA uses bf16 autocast).
    Raises ``FileNotFoundError`` when the directory or its files are missing.
    """
    from safetensors.torch import load_file

    root = Path(dir) if dir is not None else SHIPPED_DIR
    cfg_path, w_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"reference classifier file missing: {p}")
    config = ReferenceConfig.from_json(json.loads(cfg_path.read_text()))
    model = build_backbone(config.timm_name, len(config.label_names), config.in_chans)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(w_path)).items()}
    model.load_state_dict(state, strict=True)
    return ReferenceClassifier(model, config, pick_device(device))
