"""Feature extractors of the gate's embedding test: a shipped network named in the privacy index.

Two kinds of network can serve, both shipped under ``models/weights`` and loaded with plain timm:

* ``encoder``: an SSL encoder directory (``models.ssl.export`` format). The default is the shipped
  **copy detector** (``copy-detector-64``): SimCLR on the Kermany training images with small crops,
  shifts, rotations, intensity changes and blur as the views, so that a shifted or re-windowed copy of
  an image lands next to it while other patients' images do not (the recipe of SSCD, Pizzi et al.,
  CVPR 2022, scaled down).
* ``reference-classifier``: the pneumonia classifier of the fidelity metrics. Measured
  (``docs/results/privacy_gate.md``, baselines): as the embedding test it caught 0-5% of shifted,
  noised, contrast- or gamma-changed copies (its features are built to tell pneumonia from normal,
  not one radiograph from another), against 71-100% for the copy detector. It is the fallback when
  the copy detector is not installed.

The privacy index records the kind, the folder name and the SHA-256 of the weights; the gate refuses
to compare features from a different network (:class:`EmbeddingMismatch`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from models.device import pick_device
from models.files import file_sha256

WEIGHTS_ROOT = Path(__file__).resolve().parents[1] / "weights"
COPY_DETECTOR = "copy-detector-64"
REFERENCE_CLASSIFIER = "reference-classifier-64"
FEATURE_BLOCK = 32  # images per forward pass, fixed so an image's features never depend on its batch mates


class EmbeddingMismatch(ValueError):
    """The privacy index was built with a different network than the one available now."""


class Embedder(Protocol):
    """Maps uint8 ``(N, H, W)`` images to float32 ``(N, D)`` features; ``spec`` names the network."""

    spec: dict[str, str]

    def __call__(self, images: np.ndarray) -> torch.Tensor: ...


def _fixed_blocks(images: np.ndarray, forward: Any, block: int = FEATURE_BLOCK) -> torch.Tensor:
    """Run ``forward`` on fixed-shape blocks (the last padded with copies of its last image)."""
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"expected a non-empty uint8 (N, H, W) array, got {images.dtype} {images.shape}")
    outs = []
    for s in range(0, len(images), block):
        x = images[s : s + block]
        m = len(x)
        if m < block:
            x = np.concatenate([x, np.repeat(x[-1:], block - m, axis=0)])
        outs.append(forward(np.ascontiguousarray(x))[:m])
    return torch.cat(outs)


@dataclass
class EncoderEmbedder:
    """Pooled features of an SSL encoder directory (``model.safetensors`` + ``config.json``)."""

    model: torch.nn.Module
    resolution: int
    mean: float
    std: float
    device: torch.device
    spec: dict[str, str]

    @torch.inference_mode()
    def _forward(self, x: np.ndarray) -> torch.Tensor:
        from models.metrics.images import resize_square

        t = torch.from_numpy(x).to(self.device).float().div_(255.0).unsqueeze(1)
        t = resize_square(t, self.resolution)
        return self.model((t - self.mean) / self.std).float().cpu()

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        return _fixed_blocks(images, self._forward)


@dataclass
class ClassifierEmbedder:
    """Penultimate features of the reference classifier (the fallback; see the module docstring)."""

    classifier: Any
    spec: dict[str, str]

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        return _fixed_blocks(images, lambda x: self.classifier.features(x, batch_size=FEATURE_BLOCK))


def default_embedding_name() -> str:
    """The shipped copy detector when present, else the reference classifier."""
    return COPY_DETECTOR if (WEIGHTS_ROOT / COPY_DETECTOR / "config.json").is_file() else REFERENCE_CLASSIFIER


def load_embedder(name: str | None = None, device: str = "auto", root: Path = WEIGHTS_ROOT) -> Embedder:
    """Load the shipped network ``name`` (default :func:`default_embedding_name`) for the embedding test.

    Raises ``FileNotFoundError`` when its folder is missing.
    """
    name = name or default_embedding_name()
    folder = root / name
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"embedding network {name!r} not found under {root}")
    dev = pick_device(device)
    cfg: dict[str, Any] = json.loads(cfg_path.read_text())
    spec = {"name": name, "sha256": file_sha256(weights)}
    if "timm_name" in cfg:  # reference classifier config
        from models.metrics.reference import load_reference_classifier

        spec["kind"] = "reference-classifier"
        return ClassifierEmbedder(load_reference_classifier(folder, device=str(dev)), spec)
    from models.ssl.export import load_encoder

    spec["kind"] = "encoder"
    model = load_encoder(folder, device=dev)
    return EncoderEmbedder(model, int(cfg["resolution"]), float(cfg["mean"][0]), float(cfg["std"][0]), dev, spec)


def load_embedder_for(spec: dict[str, str], device: str = "auto", root: Path = WEIGHTS_ROOT) -> Embedder:
    """The network a privacy index was built with; :class:`EmbeddingMismatch` if its weights changed."""
    try:
        embedder = load_embedder(spec["name"], device=device, root=root)
    except FileNotFoundError as exc:
        raise EmbeddingMismatch(f"the privacy index needs embedding network {spec.get('name')!r}: {exc}") from exc
    if embedder.spec["sha256"] != spec.get("sha256"):
        raise EmbeddingMismatch(
            f"embedding network {spec['name']!r} changed since the privacy index was built "
            f"(weights sha256 {embedder.spec['sha256'][:12]} != {str(spec.get('sha256'))[:12]}); rebuild the index "
            "with `cxrsynth privacy-index`")
    return embedder
