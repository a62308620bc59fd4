"""The training recipe of the reference classifier: real ImageFolder in, fp16 weights + config + card out.

Steps of :func:`train_reference_classifier`: load the images with a patient-level split
(:func:`_load_data`), build model, augmentations, optimiser and class-balanced loss (:func:`_build_recipe`),
train a fixed cosine schedule (:func:`_train`, one :func:`_train_epoch` per epoch), describe the run
(:func:`_trained_config`) and ship it, re-measuring validation on the saved fp16 weights (:func:`_ship`).
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.callbacks import OnStep, no_progress
from models.device import autocast_for, pick_device
from models.metrics.reference.card import write_model_card
from models.metrics.reference.classifier import (
    POSITIVE_LABEL,
    ReferenceClassifier,
    ReferenceConfig,
    build_backbone,
    load_reference_classifier,
    save_reference_classifier,
)

DATA_SOURCES = (
    'Kermany D., Zhang K., Goldbaum M. (2018), "Labeled Optical Coherence Tomography (OCT) and Chest X-Ray '
    'Images for Classification", Mendeley Data v2, doi:10.17632/rscbjbr9sj.2 - CC BY 4.0 (train split; the '
    "official test split was not used)."
)

Log = Callable[[str], None]


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


@dataclass(frozen=True)
class _Hyperparameters:
    """The settings of one training run (all recorded in the shipped config)."""

    timm_name: str
    resolution: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    val_fraction: float
    seed: int


@dataclass(frozen=True)
class _ReferenceData:
    """A real ImageFolder in memory: uint8 ``(N, 1, R, R)`` images, a patient-level train / val split."""

    records: list[Any]  # models.data.folders.ImageRecord
    label_names: tuple[str, ...]
    labels: np.ndarray
    train_idx: Any
    val_idx: Any
    x_tr: torch.Tensor
    y_tr: torch.Tensor
    x_va: torch.Tensor
    y_va: torch.Tensor
    mean: float  # of the training images in [0, 1]
    std: float


@dataclass
class _Recipe:
    """Model, augmentations, optimiser, loss and schedule of a run."""

    model: nn.Module
    augment: nn.Module
    optimiser: torch.optim.Optimizer
    loss_fn: nn.Module
    class_weights: torch.Tensor
    steps_per_epoch: int
    total_steps: int
    warmup: int
    gen: torch.Generator  # order of the training images


def _load_data(data_dir: Path, hp: _Hyperparameters, log: Log, t_start: float) -> _ReferenceData:
    """List the ImageFolder (exactly ``normal`` / ``pneumonia``), split it by patient, load it at ``resolution``."""
    from models.data.folders import images_to_array, list_image_folder, patient_split

    records = list_image_folder(data_dir)
    if any(r.label is None for r in records):
        raise ValueError(f"{data_dir}: the reference classifier needs an ImageFolder with label folders")
    label_names = tuple(sorted({r.label for r in records if r.label is not None}))
    if POSITIVE_LABEL not in label_names or len(label_names) != 2:
        raise ValueError(f"{data_dir}: expected label folders normal/{POSITIVE_LABEL}, got {label_names}")
    labels = np.array([label_names.index(r.label or "") for r in records], dtype=np.int64)
    train_idx, val_idx = patient_split(records, val_fraction=hp.val_fraction, seed=hp.seed)
    log(f"data {data_dir}: {len(records)} images, train {len(train_idx)}, val {len(val_idx)} (patient split)")

    images = images_to_array([r.path for r in records], hp.resolution, mode="pad", threads=2)
    x_all = torch.from_numpy(images).unsqueeze(1)  # uint8 (N, 1, R, R), 5k x 64^2 = 20 MB
    y_all = torch.from_numpy(labels)
    x_tr, y_tr = x_all[train_idx], y_all[train_idx]
    x_va, y_va = x_all[val_idx], y_all[val_idx]
    train_unit = x_tr.float() / 255.0
    mean, std = float(train_unit.mean()), float(train_unit.std())
    del train_unit
    log(f"loaded {hp.resolution}px images in {time.time() - t_start:.1f}s; mean {mean:.4f} std {std:.4f}")
    return _ReferenceData(records, label_names, labels, train_idx, val_idx, x_tr, y_tr, x_va, y_va, mean, std)


def _build_recipe(data: _ReferenceData, hp: _Hyperparameters, dev: torch.device) -> _Recipe:
    """Randomly initialised backbone, kornia augmentations (no flips), AdamW, inverse-frequency weighted loss."""
    import kornia.augmentation as K

    counts = torch.bincount(data.y_tr, minlength=len(data.label_names)).float()
    class_weights = counts.sum() / (len(data.label_names) * counts)
    model = build_backbone(hp.timm_name, len(data.label_names)).to(dev)
    augment = nn.Sequential(
        K.RandomAffine(degrees=7.0, translate=(0.06, 0.06), scale=(0.9, 1.1), p=0.9),
        K.ColorJiggle(brightness=0.15, contrast=0.15, p=0.8),
    ).to(dev)
    optimiser = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights.to(dev))
    steps_per_epoch = math.ceil(len(data.train_idx) / hp.batch_size)
    total_steps = hp.epochs * steps_per_epoch
    warmup = min(steps_per_epoch, total_steps // 10 + 1)
    gen = torch.Generator().manual_seed(hp.seed)
    return _Recipe(model, augment, optimiser, loss_fn, class_weights, steps_per_epoch, total_steps, warmup, gen)


def _validate(model: nn.Module, config: ReferenceConfig, dev: torch.device, data: _ReferenceData) -> dict[str, float]:
    """Scores on the validation split, normalised with ``config``'s mean / std (puts ``model`` in eval mode)."""
    clf = ReferenceClassifier(model, config, dev)
    probs = clf.predict_proba(data.x_va, batch_size=256)
    return _binary_scores(probs, (data.y_va == config.positive_index).long())


def _train_epoch(
    recipe: _Recipe,
    data: _ReferenceData,
    hp: _Hyperparameters,
    dev: torch.device,
    *,
    epoch: int,
    step: int,
    on_step: OnStep,
) -> tuple[int, int, float]:
    """One pass over the training images in a seeded order; returns (global step, images seen, summed loss)."""
    seen, loss_sum = 0, 0.0
    order = torch.randperm(len(data.train_idx), generator=recipe.gen)
    for b in range(recipe.steps_per_epoch):
        idx = order[b * hp.batch_size : (b + 1) * hp.batch_size]
        if len(idx) < 2:  # BatchNorm needs two samples
            continue
        x = data.x_tr[idx].to(dev).float() / 255.0
        with torch.no_grad():
            x = recipe.augment(x).clamp(0.0, 1.0)
        x = (x - data.mean) / data.std
        for g in recipe.optimiser.param_groups:
            g["lr"] = _cosine_lr(step, recipe.total_steps, recipe.warmup, hp.lr)
        with autocast_for(dev):
            loss = recipe.loss_fn(recipe.model(x).float(), data.y_tr[idx].to(dev))
        recipe.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        recipe.optimiser.step()
        step += 1
        seen += len(idx)
        loss_sum += float(loss.detach()) * len(idx)
        on_step(step, recipe.total_steps, f"epoch {epoch + 1}/{hp.epochs} loss {float(loss.detach()):.4f}")
    return step, seen, loss_sum


def _train(
    recipe: _Recipe,
    data: _ReferenceData,
    config: ReferenceConfig,
    hp: _Hyperparameters,
    dev: torch.device,
    *,
    on_step: OnStep,
    log: Log,
    t_start: float,
) -> list[dict[str, Any]]:
    """All epochs of the cosine schedule, validating after each; returns the per-epoch history."""
    step = 0
    history: list[dict[str, Any]] = []
    for epoch in range(hp.epochs):
        recipe.model.train()
        t_epoch = time.time()
        step, seen, loss_sum = _train_epoch(recipe, data, hp, dev, epoch=epoch, step=step, on_step=on_step)
        val = _validate(recipe.model, config, dev, data)
        rate = seen / max(1e-9, time.time() - t_epoch)
        history.append({"epoch": epoch + 1, "train_loss": round(loss_sum / max(1, seen), 4), **val})
        log(
            f"epoch {epoch + 1}/{hp.epochs} loss {loss_sum / max(1, seen):.4f} val auc {val['auc']:.4f} "
            f"acc {val['accuracy']:.4f} bal_acc {val['balanced_accuracy']:.4f} ({rate:.0f} img/s, "
            f"{time.time() - t_start:.0f}s elapsed)"
        )
    return history


def _training_data_entry(data: _ReferenceData, data_dir: Path, hp: _Hyperparameters) -> dict[str, Any]:
    """``training_data`` of the config: the folder, counts, the split and the data's sources and licence."""
    names = data.label_names
    return {
        "folder": data_dir.name,
        "images": len(data.records),
        "images_per_label": {name: int((data.labels == i).sum()) for i, name in enumerate(names)},
        "patients": len({r.patient_id for r in data.records}),
        "train_images": len(data.train_idx),
        "val_images": len(data.val_idx),
        "val_images_per_label": {n: int((data.y_va == i).sum()) for i, n in enumerate(names)},
        "split": f"patient-level, label-stratified (StratifiedGroupKFold), val_fraction={hp.val_fraction}, "
        f"seed={hp.seed}",
        "aspect_mode": "pad",
        "sources": [DATA_SOURCES],
        "licence": "CC BY 4.0",
    }


def _training_entry(
    recipe: _Recipe,
    data: _ReferenceData,
    hp: _Hyperparameters,
    dev: torch.device,
    wall: float,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """``training`` of the config: the recipe's settings, the machine and the per-epoch history."""
    model = recipe.model
    weights = {n: round(float(w), 4) for n, w in zip(data.label_names, recipe.class_weights, strict=True)}
    return {
        "epochs": hp.epochs,
        "batch_size": hp.batch_size,
        "optimizer": f"AdamW lr={hp.lr} weight_decay={hp.weight_decay}, cosine schedule, "
        f"{recipe.warmup} warmup steps",
        "loss": "cross-entropy weighted by inverse class frequency " + str(weights),
        "augmentations": "kornia RandomAffine(deg 7, translate 0.06, scale 0.9-1.1, p 0.9), "
        "ColorJiggle(brightness 0.15, contrast 0.15, p 0.8); no flips",
        "seed": hp.seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_features": int(model.num_features),  # type: ignore[arg-type]
        "wall_time_s": round(wall, 1),
        "device": "CPU 2 cores" if dev.type == "cpu" else str(torch.cuda.get_device_name(dev)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "history": history,
    }


def _ship(
    recipe: _Recipe, config: ReferenceConfig, data: _ReferenceData, out_dir: str | Path, dev: torch.device
) -> tuple[ReferenceConfig, dict[str, float]]:
    """Save fp16 weights, re-measure validation on them, save the config with it, write the model card."""
    save_reference_classifier(recipe.model, config, out_dir)
    shipped = load_reference_classifier(out_dir, device=str(dev))
    val_fp16 = _validate(shipped.model, config, dev, data)
    config = replace(
        config,
        validation={
            **val_fp16,
            "images": len(data.val_idx),
            "positives": int((data.y_va == config.positive_index).sum()),
            "threshold": 0.5,
            "measured_on": "shipped fp16 weights (computed in fp32), patient-level validation split",
        },
    )
    save_reference_classifier(recipe.model, config, out_dir)
    write_model_card(config, out_dir)
    return config, val_fp16


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
    log: Log = print,
) -> ReferenceConfig:
    """Train on a real ImageFolder, validate on a patient-level split, ship fp16 weights + config + card.

    Class balance: cross-entropy weighted by inverse class frequency. Augmentations (kornia, per
    sample): small affine (+-7 deg, 6 % shift, +-10 % scale) and brightness/contrast jitter; no flips
    (a mirrored chest has its heart on the wrong side). A fixed cosine schedule runs for ``epochs`` and
    the *last* epoch is shipped (no checkpoint picked on the validation split, so its figures are not
    optimistically selected). Validation metrics in the config are re-measured on the saved fp16 weights.
    """
    hp = _Hyperparameters(timm_name, resolution, epochs, batch_size, lr, weight_decay, val_fraction, seed)
    t_start = time.time()
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = pick_device(device)
    data_dir = Path(data_dir)
    data = _load_data(data_dir, hp, log, t_start)
    recipe = _build_recipe(data, hp, dev)
    # Training-time config: validation normalises with the unrounded mean / std the model trains with.
    config = ReferenceConfig(
        timm_name=timm_name, in_chans=1, resolution=resolution, mean=data.mean, std=data.std,
        label_names=data.label_names,
    )
    history = _train(recipe, data, config, hp, dev, on_step=on_step, log=log, t_start=t_start)
    wall = time.time() - t_start
    config = ReferenceConfig(
        timm_name=timm_name,
        in_chans=1,
        resolution=resolution,
        mean=round(data.mean, 6),
        std=round(data.std, 6),
        label_names=data.label_names,
        training_data=_training_data_entry(data, data_dir, hp),
        training=_training_entry(recipe, data, hp, dev, wall, history),
    )
    config, val_fp16 = _ship(recipe, config, data, out_dir, dev)
    log(f"shipped to {out_dir}: val {val_fp16} wall {wall:.0f}s")
    return config
