"""The reference pneumonia classifier: the feature space of domain FID / PRDC and the judge of label fidelity.

An Inception network trained on ImageNet knows nothing of chest X-rays, so FID in its feature space says
little about whether synthetic radiographs look like real ones. This module trains a small timm CNN
(``in_chans=1``, never hub weights) on *real* images only (an ImageFolder ``NORMAL/``, ``PNEUMONIA/``),
with a patient-level stratified validation split, a class-balanced loss and light augmentations, and
ships it as fp16 safetensors + ``config.json`` + a model card. At run time
:func:`load_reference_classifier` gives :class:`ReferenceClassifier` with ``features`` (the pooled
penultimate embedding) and ``predict_proba`` (pneumonia probability).

Train the shipped one (CPU, in the background)::

    python -m models.metrics.reference --data ../shared/data/kermany-pneumonia \
        --out models/weights/reference-classifier-64 --model resnet10t --resolution 64 --epochs 6
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.callbacks import OnStep, no_progress
from models.device import autocast_for, pick_device
from models.metrics.images import ImageBatch, check_images, resize_square, to_unit_float

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "weights" / "reference-classifier-64"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FORMAT_VERSION = "1"
POSITIVE_LABEL = "pneumonia"

DATA_SOURCES = (
    'Kermany D., Zhang K., Goldbaum M. (2018), "Labeled Optical Coherence Tomography (OCT) and Chest X-Ray '
    'Images for Classification", Mendeley Data v2, doi:10.17632/rscbjbr9sj.2 - CC BY 4.0 (train split; the '
    "official test split was not used)."
)


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


# --------------------------------------------------------------------------------------------- training


def _binary_scores(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """AUC, accuracy at 0.5 and balanced accuracy (torchmetrics) of positive-class probabilities."""
    from torchmetrics.functional.classification import (
        binary_accuracy,
        binary_auroc,
        binary_recall,
        binary_specificity,
    )

    t = targets.long()
    sens = float(binary_recall(probs, t))
    spec = float(binary_specificity(probs, t))
    return {
        "auc": round(float(binary_auroc(probs, t)), 4),
        "accuracy": round(float(binary_accuracy(probs, t)), 4),
        "balanced_accuracy": round((sens + spec) / 2.0, 4),
        "sensitivity": round(sens, 4),
        "specificity": round(spec, 4),
    }


def _cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_reference_classifier(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    timm_name: str = "resnet10t",
    resolution: int = 64,
    epochs: int = 6,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: str = "auto",
    on_step: OnStep = no_progress,
    log: Callable[[str], None] = print,
) -> ReferenceConfig:
    """Train on a real ImageFolder, validate on a patient-level split, ship fp16 weights + config + card.

    Class balance: cross-entropy weighted by inverse class frequency. Augmentations (kornia, per
    sample): small affine (+-7 deg, 6 % shift, +-10 % scale) and brightness/contrast jitter; no flips
    (a mirrored chest has its heart on the wrong side). A fixed cosine schedule runs for ``epochs`` and
    the *last* epoch is shipped (no checkpoint picked on the validation split, so its figures are not
    optimistically selected). Validation metrics in the config are re-measured on the saved fp16 weights.
    """
    import kornia.augmentation as K

    from models.data.folders import images_to_array, list_image_folder, patient_split

    t_start = time.time()
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = pick_device(device)
    data_dir = Path(data_dir)

    records = list_image_folder(data_dir)
    if any(r.label is None for r in records):
        raise ValueError(f"{data_dir}: the reference classifier needs an ImageFolder with label folders")
    label_names = tuple(sorted({r.label for r in records if r.label is not None}))
    if POSITIVE_LABEL not in label_names or len(label_names) != 2:
        raise ValueError(f"{data_dir}: expected label folders normal/{POSITIVE_LABEL}, got {label_names}")
    labels = np.array([label_names.index(r.label or "") for r in records], dtype=np.int64)
    train_idx, val_idx = patient_split(records, val_fraction=val_fraction, seed=seed)
    log(f"data {data_dir}: {len(records)} images, train {len(train_idx)}, val {len(val_idx)} (patient split)")

    images = images_to_array([r.path for r in records], resolution, mode="pad", threads=2)
    x_all = torch.from_numpy(images).unsqueeze(1)  # uint8 (N, 1, R, R), 5k x 64^2 = 20 MB
    y_all = torch.from_numpy(labels)
    x_tr, y_tr = x_all[train_idx], y_all[train_idx]
    x_va, y_va = x_all[val_idx], y_all[val_idx]
    train_unit = x_tr.float() / 255.0
    mean, std = float(train_unit.mean()), float(train_unit.std())
    del train_unit
    log(f"loaded {resolution}px images in {time.time() - t_start:.1f}s; mean {mean:.4f} std {std:.4f}")

    counts = torch.bincount(y_tr, minlength=len(label_names)).float()
    class_weights = counts.sum() / (len(label_names) * counts)
    model = build_backbone(timm_name, len(label_names)).to(dev)
    augment = nn.Sequential(
        K.RandomAffine(degrees=7.0, translate=(0.06, 0.06), scale=(0.9, 1.1), p=0.9),
        K.ColorJiggle(brightness=0.15, contrast=0.15, p=0.8),
    ).to(dev)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights.to(dev))
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = min(steps_per_epoch, total_steps // 10 + 1)
    gen = torch.Generator().manual_seed(seed)

    config = ReferenceConfig(
        timm_name=timm_name, in_chans=1, resolution=resolution, mean=mean, std=std, label_names=label_names
    )
    pos = config.positive_index

    def evaluate(m: nn.Module) -> dict[str, float]:
        clf = ReferenceClassifier(m, config, dev)
        probs = clf.predict_proba(x_va, batch_size=256)
        return _binary_scores(probs, (y_va == pos).long())

    step = 0
    history: list[dict[str, Any]] = []
    for epoch in range(epochs):
        model.train()
        t_epoch, seen, loss_sum = time.time(), 0, 0.0
        order = torch.randperm(len(train_idx), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x = x_tr[idx].to(dev).float() / 255.0
            with torch.no_grad():
                x = augment(x).clamp(0.0, 1.0)
            x = (x - mean) / std
            for g in optimiser.param_groups:
                g["lr"] = _cosine_lr(step, total_steps, warmup, lr)
            with autocast_for(dev):
                loss = loss_fn(model(x).float(), y_tr[idx].to(dev))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            seen += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
            on_step(step, total_steps, f"epoch {epoch + 1}/{epochs} loss {float(loss.detach()):.4f}")
        val = evaluate(model)
        rate = seen / max(1e-9, time.time() - t_epoch)
        history.append({"epoch": epoch + 1, "train_loss": round(loss_sum / max(1, seen), 4), **val})
        log(
            f"epoch {epoch + 1}/{epochs} loss {loss_sum / max(1, seen):.4f} val auc {val['auc']:.4f} "
            f"acc {val['accuracy']:.4f} bal_acc {val['balanced_accuracy']:.4f} ({rate:.0f} img/s, "
            f"{time.time() - t_start:.0f}s elapsed)"
        )

    wall = time.time() - t_start
    n_patients = len({r.patient_id for r in records})
    per_label = {name: int((labels == i).sum()) for i, name in enumerate(label_names)}
    config = ReferenceConfig(
        timm_name=timm_name,
        in_chans=1,
        resolution=resolution,
        mean=round(mean, 6),
        std=round(std, 6),
        label_names=label_names,
        training_data={
            "folder": data_dir.name,
            "images": len(records),
            "images_per_label": per_label,
            "patients": n_patients,
            "train_images": len(train_idx),
            "val_images": len(val_idx),
            "val_images_per_label": {n: int((y_va == i).sum()) for i, n in enumerate(label_names)},
            "split": f"patient-level, label-stratified (StratifiedGroupKFold), val_fraction={val_fraction}, "
            f"seed={seed}",
            "aspect_mode": "pad",
            "sources": [DATA_SOURCES],
            "licence": "CC BY 4.0",
        },
        training={
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": f"AdamW lr={lr} weight_decay={weight_decay}, cosine schedule, {warmup} warmup steps",
            "loss": "cross-entropy weighted by inverse class frequency "
            + str({n: round(float(w), 4) for n, w in zip(label_names, class_weights, strict=True)}),
            "augmentations": "kornia RandomAffine(deg 7, translate 0.06, scale 0.9-1.1, p 0.9), "
            "ColorJiggle(brightness 0.15, contrast 0.15, p 0.8); no flips",
            "seed": seed,
            "parameters": sum(p.numel() for p in model.parameters()),
            "num_features": int(model.num_features),  # type: ignore[arg-type]
            "wall_time_s": round(wall, 1),
            "device": "CPU 2 cores" if dev.type == "cpu" else str(torch.cuda.get_device_name(dev)),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "history": history,
        },
    )
    save_reference_classifier(model, config, out_dir)
    shipped = load_reference_classifier(out_dir, device=str(dev))
    val_fp16 = evaluate(shipped.model)
    config = replace(
        config,
        validation={
            **val_fp16,
            "images": len(val_idx),
            "positives": int((y_va == pos).sum()),
            "threshold": 0.5,
            "measured_on": "shipped fp16 weights (computed in fp32), patient-level validation split",
        },
    )
    save_reference_classifier(model, config, out_dir)
    write_model_card(config, out_dir)
    log(f"shipped to {out_dir}: val {val_fp16} wall {wall:.0f}s")
    return config


def write_model_card(config: ReferenceConfig, out_dir: str | Path) -> Path:
    """Write the model card ``README.md`` from a config (data sources, licence, settings, measured metrics)."""
    out = Path(out_dir)
    td, tr, va = config.training_data, config.training, config.validation
    size_mb = (out / WEIGHTS_FILE).stat().st_size / 1e6 if (out / WEIGHTS_FILE).exists() else float("nan")
    lines = [
        f"# Reference pneumonia classifier, {config.resolution}x{config.resolution} (version {config.version})",
        "",
        "The yardstick of `models/metrics`: its penultimate embedding is the feature space of *domain FID* and",
        "precision/recall/density/coverage, and its pneumonia probability judges *label fidelity* of conditional",
        "samples. It is **not** a diagnostic device and must not be used on patients.",
        "",
        "## Model",
        f"- timm `{config.timm_name}`, `in_chans={config.in_chans}`, randomly initialised (`pretrained=False`),",
        f"  {tr.get('parameters', '?')} parameters, {tr.get('num_features', '?')}-d penultimate embedding,",
        f"  {len(config.label_names)} classes {list(config.label_names)}; positive label `{config.positive_label}`.",
        f"- Input: grey {config.resolution}x{config.resolution}, padded to square; "
        f"normalisation `(x/255 - {config.mean}) / {config.std}`.",
        f"- Weights: `{WEIGHTS_FILE}`, fp16 safetensors ({size_mb:.1f} MB); load with",
        "  `models.metrics.load_reference_classifier(dir)` (upcast to fp32).",
        "",
        "## Training data (real images only)",
        f"- {td.get('images')} images from `{td.get('folder')}` ({td.get('images_per_label')}), "
        f"{td.get('patients')} patients.",
        f"- Split: {td.get('split')}: {td.get('train_images')} train / {td.get('val_images')} validation images "
        f"({td.get('val_images_per_label')}).",
        "- Sources and licences (this model is a derived work):",
        *[f"  - {s}" for s in td.get("sources", [])],
        "",
        "## Training",
        f"- {tr.get('epochs')} epochs, batch {tr.get('batch_size')}, {tr.get('optimizer')}.",
        f"- Loss: {tr.get('loss')}.",
        f"- Augmentations: {tr.get('augmentations')}.",
        f"- Seed {tr.get('seed')}; device {tr.get('device')} ({tr.get('torch_threads')} torch threads, "
        f"torch {tr.get('torch')}); wall time {tr.get('wall_time_s')} s.",
        "",
        "## Measured validation metrics",
        f"On the patient-level validation split ({va.get('images')} images, {va.get('positives')} pneumonia), "
        f"{va.get('measured_on')}, threshold {va.get('threshold')}:",
        "",
        "| AUC | accuracy | balanced accuracy | sensitivity | specificity |",
        "|---|---|---|---|---|",
        f"| {va.get('auc')} | {va.get('accuracy')} | {va.get('balanced_accuracy')} | {va.get('sensitivity')} | "
        f"{va.get('specificity')} |",
        "",
        "The last epoch is shipped (no checkpoint selection on the validation split). The official Kermany test",
        "split is withheld from the project; these figures are on a split carved from the training data.",
        "",
        "## Limitations",
        "- Paediatric (1-5 years) anterior-posterior radiographs from one centre (Guangzhou); features and",
        "  probabilities are not calibrated for adult or other-site images.",
        f"- At {config.resolution} px fine texture is gone; the classifier sees global opacity patterns.",
        "- Several Kermany images share a patient; the split keeps each patient on one side.",
        "",
        "## Reproduce",
        "```",
        f"python -m models.metrics.reference --data ../shared/data/{td.get('folder')} --out {out.as_posix()} \\",
        f"    --model {config.timm_name} --resolution {config.resolution} --epochs {tr.get('epochs')} "
        f"--batch-size {tr.get('batch_size')} --seed {tr.get('seed')} --threads {tr.get('torch_threads')}",
        "```",
        "",
    ]
    path = out / CARD_FILE
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    """CLI: train and ship a reference classifier (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", required=True, help="ImageFolder with normal/ and pneumonia/ (real images)")
    parser.add_argument("--out", default=str(SHIPPED_DIR))
    parser.add_argument("--model", default="resnet10t", help="timm model name")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("CXR_TORCH_THREADS", "2")))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_reference_classifier(
        args.data,
        args.out,
        timm_name=args.model,
        resolution=args.resolution,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        log=lambda s: print(s, flush=True),
    )


if __name__ == "__main__":
    main()
